"""The actions loop's decisions (actions/judge.py, guardrails.py, loop.py), with the store, the
control plane and the instance runner faked here, the clock passed in, and SQLite in memory.

The SQL of actions/samples.py against real stores is tests/test_loop_samples.py."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace

import numpy as np
import pytest

from actions.controlplane import OverrideError
from actions.guardrails import Guardrails
from actions.judge import judge, judge_subsets
from actions.loop import JUDGE_WINDOWS, Loop, LoopHealth, apportion, restore_toward, shift_away
from actions.model import Alert
from actions.samples import SubsetSample, failed, sample_sql
from actions.scaling import ScaleError
from core.contracts import WINDOW_SECONDS, ActionDecision, AnomalyEvent, Override, ServiceRouting
from core.loopspec import ActionsSpec, RoutingSpec, ScalingSpec
from core.storeclient import StoreError

T0 = 1_764_400_000.5  # half a second into a window: ticks a second apart land in each window
HEALTHY = LoopHealth(store_ok=True, scorer_ok=True, kafka_ok=True)
BLIND = LoopHealth(store_ok=False, scorer_ok=True, kafka_ok=True, detail="store: connection refused")
SPEC = RoutingSpec()


def sample(subset: str, median_ms: float, n: int, errors: int = 0, seed: int = 0) -> SubsetSample:
    rng = np.random.default_rng(seed)
    return SubsetSample(subset, rng.lognormal(np.log(median_ms), 0.3, n), n, errors)


# --- the judge ----------------------------------------------------------------------------


def test_a_clearly_slower_canary_fails_with_its_evidence() -> None:
    j = judge(sample("v2", 80, 200, seed=1), sample("v1", 20, 200, seed=2), SPEC)
    assert j.verdict == "fail"
    e = j.evidence
    assert (e.n_canary, e.n_baseline) == (200, 200)
    assert e.median_ratio == pytest.approx(4, rel=0.2) and e.p_latency < 1e-30 and e.u_statistic > 0.9 * 200 * 200
    assert "slower" in j.reason and "Mann-Whitney" in j.reason
    assert json.loads(json.dumps(j.to_json()))["verdict"] == "fail"


def test_equal_subsets_pass() -> None:
    judged = judge_subsets([sample("v1", 20, 300, 3, seed=1), sample("v2", 20, 300, 4, seed=2)], SPEC)
    assert [j.verdict for j in judged] == ["pass", "pass"]
    ties = SubsetSample("v2", np.full(50, 5.0), 50, 0)  # every latency the same: no NaN reaches the evidence
    assert judge(ties, replace(ties, subset="v1"), SPEC).evidence.p_latency == 1.0


def test_too_few_requests_is_unknown_not_pass() -> None:
    j = judge(sample("v2", 500, SPEC.min_samples - 1, seed=1), sample("v1", 20, 500, seed=2), SPEC)
    assert j.verdict == "unknown" and "too little traffic" in j.reason
    assert j.evidence.p_latency is None


def test_both_subsets_bad_makes_neither_worse_than_the_other() -> None:
    judged = judge_subsets([sample("v1", 90, 300, 60, seed=1), sample("v2", 90, 300, 60, seed=2)], SPEC)
    assert [j.verdict for j in judged] == ["pass", "pass"]


def test_a_significant_but_small_difference_is_below_the_effect_floor() -> None:
    # 10% slower over thousands of requests: significant, but not x1.5.
    j = judge(sample("v2", 22, 5000, seed=1), sample("v1", 20, 5000, seed=2), SPEC)
    assert j.evidence.p_latency < SPEC.p_value and j.verdict == "pass"


def test_more_errors_fail_on_the_two_proportion_test() -> None:
    j = judge(sample("v2", 20, 400, errors=60, seed=1), sample("v1", 20, 400, errors=4, seed=2), SPEC)
    assert j.verdict == "fail" and "failing more" in j.reason
    assert j.evidence.z_errors > 5 and j.evidence.p_errors < 1e-6
    # The same rates on too small a difference (+4%, floor +5%) pass.
    assert judge(sample("v2", 20, 4000, errors=200), sample("v1", 20, 4000, errors=40), SPEC).verdict == "pass"


def test_three_subsets_are_each_judged_against_the_others_pooled() -> None:
    three = [sample("v1", 20, 200, seed=1), sample("v2", 20, 200, seed=2), sample("v3", 70, 200, seed=3)]
    judged = judge_subsets(three, SPEC)
    assert [(j.subset, j.baseline, j.verdict) for j in judged] == [
        ("v1", "v2+v3", "pass"), ("v2", "v1+v3", "pass"), ("v3", "v1+v2", "fail")]


def test_errors_are_5xx_and_resets() -> None:
    assert failed(503, "") and failed(200, "UF,URX") and failed(0, "UC")
    assert not failed(404, "") and not failed(200, "DC") and not failed(200, "")


def test_sample_sql_takes_only_mesh_names_and_ints() -> None:
    sql = sample_sql("payments", ["v1", "v2"], 100, 130, cap=50)
    assert "upstream_cluster IN ('outbound|payments|v1', 'outbound|payments|v2')" in sql
    assert "time_us >= 100000000 AND time_us < 130000000" in sql and "LIMIT 50 BY upstream_cluster" in sql
    for bad in ("pay'ments", "Payments", "a|b", "x" * 64, ""):
        with pytest.raises(ValueError, match="not a mesh name"):
            sample_sql(bad, ["v1"], 100, 130)
        with pytest.raises(ValueError, match="not a mesh name"):
            sample_sql("payments", ["v1", bad], 100, 130)
    with pytest.raises(ValueError, match="start_s"):
        sample_sql("payments", ["v1"], "100; DROP", 130)  # type: ignore[arg-type]


# --- the arithmetic of weights ------------------------------------------------------------


def test_weights_shift_in_steps_down_to_the_floor_and_always_sum_to_100() -> None:
    w = {"v1": 50, "v2": 50}
    assert shift_away(w, "v2", 25, 0) == {"v1": 75, "v2": 25}
    assert shift_away({"v1": 75, "v2": 25}, "v2", 25, 0) == {"v1": 100, "v2": 0}
    assert shift_away({"v1": 80, "v2": 20}, "v2", 25, 10) == {"v1": 90, "v2": 10}
    assert shift_away({"v1": 90, "v2": 10}, "v2", 25, 10) == {"v1": 90, "v2": 10}
    three = shift_away({"v1": 34, "v2": 33, "v3": 33}, "v3", 25, 0)
    assert three == {"v1": 47, "v2": 45, "v3": 8} and sum(three.values()) == 100
    assert apportion(7, {"a": 0, "b": 0}) == {"a": 4, "b": 3}


def test_restoring_steps_back_to_the_declared_split() -> None:
    declared = {"v1": 50, "v2": 50}
    assert restore_toward({"v1": 100, "v2": 0}, declared, "v2", 25) == {"v1": 75, "v2": 25}
    assert restore_toward({"v1": 75, "v2": 25}, declared, "v2", 25) == declared
    three = restore_toward({"v1": 60, "v2": 40, "v3": 0}, {"v1": 40, "v2": 30, "v3": 30}, "v3", 20)
    assert three == {"v1": 47, "v2": 33, "v3": 20}
    assert restore_toward({"v1": 100, "v2": 0}, {"v1": 50, "v3": 50}, "v2", 25) == {"v1": 50, "v3": 50}


# --- guardrails ---------------------------------------------------------------------------


def test_guardrails_apply_in_order_and_the_budget_slides_with_the_hour() -> None:
    db = sqlite3.connect(":memory:")
    spec = ActionsSpec(mode="on", budget_per_service_hour=2, budget_per_mesh_hour=3)
    g = Guardrails(db, spec)
    assert g.check("payments", T0, 1000).allowed
    g.record("payments", T0, 1000, shadow=False)
    assert g.check("payments", T0 + 1, 1000).guardrail == "hold_down"
    check = g.check("payments", T0 + 20, 1020)
    assert check.allowed and dict(check.figures)["since_last_step_s"] == 20
    g.record("payments", T0 + 20, 1020, shadow=False)
    refused = g.check("payments", T0 + 40, 1040)
    assert refused.guardrail == "budget_service" and "2 steps in the last hour" in refused.detail
    g.record("orders", T0 + 40, 1040, shadow=False)
    assert g.check("catalog", T0 + 60, 1060).guardrail == "budget_mesh"
    assert g.check("payments", T0 + 3600.5, 4600).allowed  # the first step left the hour
    g.set_frozen(True, "alice", T0)
    assert g.check("catalog", T0 + 7200, 8200).guardrail == "freeze"  # freeze before anything else
    g.set_frozen(False, "alice", T0)
    g.set_mode("catalog", "shadow", "bob", T0)
    shadowed = g.check("catalog", T0 + 7200, 8200)
    assert (shadowed.allowed, shadowed.guardrail) == (False, "mode") and "would have" in shadowed.detail
    g.set_mode("catalog", "off", "bob", T0)
    assert g.check("catalog", T0 + 7200, 8200).detail == "the mode of catalog is off"


def test_an_operators_mode_holds_until_the_spec_changes_that_value() -> None:
    db = sqlite3.connect(":memory:")
    g = Guardrails(db, ActionsSpec(mode="shadow"))
    g.set_mode("payments", "on", "alice", T0)
    assert g.mode_of("payments") == "on" and g.mode_of("orders") == "shadow"
    g.update_spec(ActionsSpec(mode="shadow", freeze=True))  # another change: the operator's mode stays
    assert g.mode_of("payments") == "on" and g.frozen() is not None
    g.set_frozen(False, "alice", T0)
    assert g.frozen() is None  # the operator's unfreeze is the latest instruction
    g.update_spec(ActionsSpec(mode="off"))  # the spec's value for payments changed: the spec wins again
    assert g.mode_of("payments") == "off" and g.mode_settings() == {}
    with pytest.raises(ValueError, match="not one of"):
        g.set_mode("payments", "auto", "alice", T0)  # type: ignore[arg-type]


# --- the loop, with fakes -----------------------------------------------------------------


class FakeOverrides:
    """The control plane's overrides API for one split service (and its callers' view)."""

    def __init__(self, service: str = "payments", declared: dict[str, int] | None = None):
        self.service = service
        self.declared = declared or {"v1": 50, "v2": 50}
        self.override: Override | None = None
        self.puts: list[Override] = []
        self.clears: list[str] = []
        self.down = False

    @property
    def effective(self) -> dict[str, int]:
        return dict(self.override.weights) if self.override else dict(self.declared)

    def routing(self) -> list[ServiceRouting]:
        if self.down:
            raise OverrideError("GET http://127.0.0.1:1/overrides: connection refused")
        return [ServiceRouting(service=self.service, subsets=tuple(self.declared),
                               instances=tuple((s, 1) for s in self.declared), callers=("orders",),
                               declared=tuple(self.declared.items()), effective=tuple(self.effective.items()),
                               override=self.override)]

    def put(self, override: Override) -> None:
        if self.down:
            raise OverrideError("PUT http://127.0.0.1:1/overrides/payments: 504 sidecars did not ACK: orders-1")
        assert sum(w for _, w in override.weights) == 100 and Override.from_json(override.to_json())
        self.override = replace(override, by="actions", created_at=1.0)
        self.puts.append(override)

    def clear(self, service: str) -> None:
        self.override = None
        self.clears.append(service)


class FakeSamples:
    """Requests per subset in proportion to the weight in force: ``rate`` per judged range."""

    def __init__(self, overrides: FakeOverrides, rate: int = 600):
        self.overrides = overrides
        self.rate = rate
        self.median_ms = {"v1": 20.0, "v2": 20.0}
        self.error: Exception | None = None
        self.ranges: list[tuple[int, int]] = []

    def samples(self, service: str, subsets: list[str], start_s: int, end_s: int) -> list[SubsetSample]:
        if self.error:
            raise self.error
        self.ranges.append((start_s, end_s))
        weights = self.overrides.effective
        return [sample(s, self.median_ms[s], self.rate * weights[s] // 100, seed=start_s + i)
                for i, s in enumerate(subsets)]


class FakeScaler:
    def __init__(self, counts: dict[str, int]):
        self.counts = dict(counts)
        self.calls: list[tuple[str, int]] = []

    def instances(self, service: str) -> int:
        return self.counts[service]

    def scale(self, service: str, count: int) -> None:
        if count > 10:
            raise ScaleError(f"{service}: no room for {count} instances")
        self.calls.append((service, count))
        self.counts[service] = count


class Harness:
    def __init__(self, db: sqlite3.Connection | None = None, **spec: object):
        self.db = db or sqlite3.connect(":memory:")
        self.spec = ActionsSpec(**spec)  # type: ignore[arg-type]
        self.overrides = FakeOverrides()
        self.samples = FakeSamples(self.overrides)
        self.scaler = FakeScaler({"payments": 2, "frontend": 1})
        self.decisions: list[ActionDecision] = []
        self.alerts: list[Alert] = []
        self.inhibits: list[tuple[str, float]] = []
        self.loop = self.new_loop()

    def new_loop(self) -> Loop:
        """A loop on the same state (as after a restart)."""
        return Loop(self.db, self.spec, self.samples, self.overrides, self.scaler, self.decisions.append,
                    self.alerts.append, lambda service, until: self.inhibits.append((service, until)))

    def run(self, start: float, end: float, health: LoopHealth = HEALTHY) -> None:
        """A tick a second, as the process's rounds."""
        t = start
        while t < end:
            self.loop.tick(t, health)
            t += 1.0

    def of(self, outcome: str, action: str | None = None) -> list[ActionDecision]:
        return [d for d in self.decisions if d.outcome == outcome and (action is None or d.action == action)]


def anomaly(state: str, window: float, service: str = "payments", feature: str = "latency_p95_ms",
            anomaly_id: str = "a1") -> AnomalyEvent:
    w = int(window) // WINDOW_SECONDS * WINDOW_SECONDS
    return AnomalyEvent(v=1, event_id=f"{anomaly_id}-{state}", time_us=w * 1_000_000, service=service,
                        anomaly_id=anomaly_id, state=state, window=w, score=4.2, threshold=1.3, peak_score=4.2,
                        windows=2, explanation=f"{feature} up", detector="pca", model_version="v1",
                        causes=json.dumps([{"feature": feature, "share": 0.8, "value": 90.0, "normal": 20.0}]))


def weights_after(d: ActionDecision) -> dict[str, int]:
    return json.loads(d.after)["weights"]


def test_a_latency_fault_on_v2_moves_its_weight_away_stepwise_respecting_the_hold_down() -> None:
    h = Harness(mode="on")
    h.samples.median_ms["v2"] = 80.0
    h.loop.on_anomaly(anomaly("open", T0), T0)
    h.run(T0, T0 + 60)
    acted = h.of("acted")
    assert [weights_after(d) for d in acted] == [{"v1": 75, "v2": 25}, {"v1": 100, "v2": 0}]
    assert [d.time_us / 1e6 for d in acted] == [T0, T0 + 20]  # the first tick, then the hold-down
    assert h.overrides.effective == {"v1": 100, "v2": 0}
    assert [o.id for o in h.overrides.puts] == [d.override_id for d in acted]
    first = acted[0]
    assert (first.action, first.verdict, first.anomaly_id, first.by, first.mode) == (
        "shift_weight", "fail", "a1", "actions", "on")
    assert json.loads(first.before) == {"weights": {"v1": 50, "v2": 50}}
    assert first.reason.startswith(
        "Shifted 25% of the traffic to payments away from v2 (v1 50%/v2 50% -> v1 75%/v2 25%): v2 is slower")
    evidence = json.loads(first.evidence)
    assert evidence["anomaly"]["score"] == 4.2 and evidence["anomaly"]["threshold"] == 1.3
    window = int(T0) // 10 * 10
    assert evidence["range"] == {"start_s": window - JUDGE_WINDOWS * 10, "end_s": window}
    v2 = next(j for j in evidence["judgements"] if j["subset"] == "v2")
    assert v2["verdict"] == "fail" and v2["p_latency"] < 0.01 and v2["median_ratio"] > 3 and v2["n_canary"] == 300
    assert evidence["guardrail"]["allowed"] is True and evidence["guardrail"]["budget_per_service_hour"] == 6
    # The window between the two steps was refused by the hold-down, and said so.
    held_down = h.of("refused")
    assert [d.guardrail for d in held_down] == ["hold_down"]
    assert held_down[0].reason.startswith("Did not shift 25% of the traffic to payments away from v2")
    assert h.inhibits == [("payments", T0 + 20), ("payments", T0 + 40)]
    assert h.alerts == []
    assert h.loop.decisions(2)[0] == h.decisions[-1]  # the CLI's view: newest first
    assert h.loop.status().routing[0].drained == "v2"


def test_a_judgement_reads_no_window_from_before_the_last_step() -> None:
    """Pooled across a change of split, a fault that hits every subset alike looks worse on the
    subset whose weight rose (its requests lean to the later, faulty windows: Simpson's
    paradox, seen on the demo mesh).  After a step, judgements read only later windows."""
    h = Harness(mode="on")
    h.samples.median_ms["v2"] = 80.0
    h.loop.on_anomaly(anomaly("open", T0), T0)
    h.run(T0, T0 + 60)
    steps = h.of("acted", "shift_weight")
    assert len(steps) == 2
    stepped_in = json.loads(steps[0].evidence)["window"]
    after_step = [start for start, end in h.samples.ranges if end > stepped_in]
    assert after_step and min(after_step) >= stepped_in + 10, h.samples.ranges
    second = json.loads(steps[1].evidence)["range"]
    assert second == {"start_s": stepped_in + 10, "end_s": second["end_s"]} and second["end_s"] > second["start_s"]


def test_a_judgement_reads_no_window_from_before_the_override_in_force_was_set() -> None:
    h = Harness(mode="on")
    h.overrides.override = Override(service="payments", id="op-1", reason="by hand", weights=(("v1", 60), ("v2", 40)),
                                    by="cli", created_at=T0 + 12)
    h.loop.on_anomaly(anomaly("open", T0 + 25), T0 + 25)
    h.run(T0 + 25, T0 + 45)
    set_in = int(T0 + 12) // WINDOW_SECONDS * WINDOW_SECONDS
    assert h.samples.ranges and min(start for start, _ in h.samples.ranges) == set_in + WINDOW_SECONDS


def test_shadow_mode_changes_nothing_and_records_what_it_would_have_done() -> None:
    h = Harness()  # shadow is the default
    h.samples.median_ms["v2"] = 80.0
    h.loop.on_anomaly(anomaly("open", T0), T0)
    h.run(T0, T0 + 60)
    assert h.overrides.puts == [] and h.overrides.effective == {"v1": 50, "v2": 50} and h.inhibits == []
    shadowed = h.of("shadowed")
    assert [weights_after(d) for d in shadowed] == [{"v1": 75, "v2": 25}, {"v1": 100, "v2": 0}]
    assert [d.time_us / 1e6 for d in shadowed] == [T0, T0 + 20]  # as mode on would have, hold-down included
    assert all(d.mode == "shadow" and d.guardrail == "mode" and d.override_id == "" for d in shadowed)
    assert shadowed[0].reason.startswith("Would have shifted 25% of the traffic to payments away from v2")
    assert json.loads(shadowed[0].evidence)["judgements"]
    assert h.of("acted") == []


def test_a_fault_on_every_subset_moves_nothing_and_alerts_once() -> None:
    h = Harness(mode="on")
    h.samples.median_ms.update(v1=80.0, v2=80.0)
    h.loop.on_anomaly(anomaly("open", T0), T0)
    h.run(T0, T0 + 60)
    assert h.overrides.puts == [] and h.of("acted") == []
    assert [(a.key, a.firing) for a in h.alerts] == [("payments/mesh_wide", True)]
    noted = h.of("noted", "alert")
    assert len(noted) == 1 and "no subset is worse than the others" in noted[0].reason
    h.loop.on_anomaly(anomaly("resolved", T0 + 60), T0 + 60)
    assert [(a.key, a.firing) for a in h.alerts] == [("payments/mesh_wide", True), ("payments/mesh_wide", False)]


def test_an_unhealthy_loop_holds_and_says_it_is_blind_until_it_sees_again() -> None:
    h = Harness(mode="on")
    h.samples.median_ms["v2"] = 80.0
    h.loop.on_anomaly(anomaly("open", T0), T0)
    h.run(T0, T0 + 30, BLIND)
    assert h.overrides.puts == [] and h.of("acted") == []
    assert [(a.key, a.firing, a.service) for a in h.alerts] == [("mesh/loop_blind", True, "mesh")]
    held = h.of("held")
    assert held[0].service == "mesh" and "store: connection refused" in held[0].reason
    # One held decision per window for the anomalous service.
    assert [(d.service, d.verdict, d.guardrail) for d in held[1:]] == [("payments", "unknown", "blind")] * 3
    assert h.loop.status().blind
    h.run(T0 + 30, T0 + 31)
    assert [(a.key, a.firing) for a in h.alerts][-1] == ("mesh/loop_blind", False)
    h.run(T0 + 40, T0 + 41)  # the next window: it sees, judges and moves
    assert [weights_after(d) for d in h.of("acted")] == [{"v1": 75, "v2": 25}]


def test_too_little_traffic_or_an_unreadable_store_holds_with_a_reason() -> None:
    h = Harness(mode="on")
    h.samples.median_ms["v2"] = 80.0
    h.samples.rate = 30  # 15 per subset: fewer than min_samples
    h.loop.on_anomaly(anomaly("open", T0), T0)
    h.run(T0, T0 + 10)
    h.samples.error = StoreError("the sink at http://127.0.0.1:1/query is not reachable")
    h.run(T0 + 10, T0 + 20)
    h.overrides.down = True
    h.samples.error = None
    h.run(T0 + 20, T0 + 30)
    assert h.overrides.puts == []
    held = h.of("held")
    assert [(d.verdict, d.guardrail) for d in held] == [("unknown", "unknown")] * 3
    assert "too little traffic" in held[0].reason and "not reachable" in held[1].reason
    assert "routing cannot be read" in held[2].reason
    assert h.alerts == []  # the detector and the store are fine: not blind, only unsure


def test_after_the_anomaly_the_subset_is_restored_stepwise_and_the_override_cleared() -> None:
    h = Harness(mode="on")
    h.samples.median_ms["v2"] = 80.0
    h.loop.on_anomaly(anomaly("open", T0), T0)
    h.run(T0, T0 + 30)
    assert h.overrides.effective == {"v1": 100, "v2": 0}
    h.samples.median_ms["v2"] = 20.0  # the fault is over
    resolved = T0 + 100
    h.run(T0 + 30, resolved)
    h.loop.on_anomaly(anomaly("resolved", resolved), resolved)
    h.run(resolved, resolved + 59)
    assert len(h.of("acted", "restore_weight")) == 0  # not before restore_after_s
    h.run(resolved + 59, resolved + 200)
    restored = h.of("acted", "restore_weight")
    assert [weights_after(d) for d in restored] == [{"v1": 75, "v2": 25}, {"v1": 50, "v2": 50}]
    assert restored[0].time_us / 1e6 == resolved + 60
    assert restored[1].time_us / 1e6 == resolved + 120  # healthy restore_after_s again, at 25%
    assert restored[0].anomaly_id == "" and [d.verdict for d in restored] == ["", "pass"]  # at 0%: nothing to judge
    assert restored[0].reason.startswith(
        "Moved 25% of the traffic to payments back to v2 (v1 100%/v2 0% -> v1 75%/v2 25%)")
    assert h.overrides.clears == ["payments"] and h.overrides.override is None
    assert restored[1].override_id == "" and "the declared split" in restored[1].reason
    assert h.loop.status().routing == ()
    n = len(h.decisions)
    h.run(resolved + 200, resolved + 400)
    assert len(h.decisions) == n  # the episode is over: nothing more to say


def test_a_subset_that_fails_again_while_restored_is_drained_again_and_waits_longer() -> None:
    h = Harness(mode="on")
    h.samples.median_ms["v2"] = 80.0
    h.loop.on_anomaly(anomaly("open", T0), T0)
    h.run(T0, T0 + 30)
    h.loop.on_anomaly(anomaly("resolved", T0 + 30), T0 + 30)  # v2 drained: the detector sees nothing wrong
    h.run(T0 + 30, T0 + 91)
    assert h.overrides.effective == {"v1": 75, "v2": 25}  # a restoring step, into a still-broken v2
    h.run(T0 + 91, T0 + 120)
    assert h.overrides.effective == {"v1": 100, "v2": 0}  # the judge alone drains it again
    relapse = h.of("acted", "shift_weight")[-1]
    assert relapse.time_us / 1e6 == T0 + 110 and "while being restored" in relapse.reason
    assert h.loop.status().routing[0].relapses == 1
    h.samples.median_ms["v2"] = 20.0
    h.run(T0 + 120, T0 + 229)
    assert h.overrides.effective == {"v1": 100, "v2": 0}  # 2 x restore_after_s now
    h.run(T0 + 229, T0 + 240)
    assert h.overrides.effective == {"v1": 75, "v2": 25}


def test_an_exhausted_budget_refuses_and_says_so() -> None:
    h = Harness(mode="on", budget_per_service_hour=1)
    h.samples.median_ms["v2"] = 80.0
    h.loop.on_anomaly(anomaly("open", T0), T0)
    h.run(T0, T0 + 60)
    assert [weights_after(d) for d in h.of("acted")] == [{"v1": 75, "v2": 25}]
    budget = [d for d in h.of("refused") if d.guardrail == "budget_service"]
    assert budget and "used its budget: 1 steps in the last hour (at most 1)" in budget[0].reason
    assert json.loads(budget[0].evidence)["guardrail"]["steps_service_hour"] == 1


def test_a_frozen_mesh_changes_nothing_until_unfrozen() -> None:
    h = Harness(mode="on")
    h.samples.median_ms["v2"] = 80.0
    h.loop.freeze("alice", T0 - 1)
    h.loop.on_anomaly(anomaly("open", T0), T0)
    h.run(T0, T0 + 20)
    assert h.overrides.puts == []
    assert [d.guardrail for d in h.of("refused")] == ["freeze", "freeze"]
    assert "greymesh actions freeze` by alice" in h.of("refused")[0].reason
    assert h.loop.status().frozen == "alice"
    h.loop.unfreeze("alice", T0 + 20)
    h.run(T0 + 20, T0 + 21)
    assert [weights_after(d) for d in h.of("acted")] == [{"v1": 75, "v2": 25}]
    assert [d.reason for d in h.of("noted")] == ["the mesh frozen by alice: nothing automated changes it",
                                                 "the mesh unfrozen by alice"]


def test_revert_restores_the_before_and_leaves_that_anomaly_alone() -> None:
    h = Harness(mode="on")
    h.samples.median_ms["v2"] = 80.0
    h.loop.on_anomaly(anomaly("open", T0), T0)
    h.run(T0, T0 + 11)
    shift, held_down = h.of("acted")[0], h.of("refused")[0]
    with pytest.raises(ValueError, match="was refused: it changed nothing"):
        h.loop.revert(held_down.event_id, "alice", T0 + 11)
    revert = h.loop.revert(shift.event_id, "alice", T0 + 11)
    assert (revert.action, revert.outcome, revert.by) == ("revert", "acted", "alice")
    assert json.loads(revert.after) == {"weights": {"v1": 50, "v2": 50}} and shift.event_id in revert.reason
    assert h.overrides.clears == ["payments"] and h.overrides.effective == {"v1": 50, "v2": 50}
    h.run(T0 + 11, T0 + 120)
    assert len(h.overrides.puts) == 1 and len(h.of("acted", "shift_weight")) == 1
    with pytest.raises(ValueError, match="no decision"):
        h.loop.revert("nope", "alice", T0)


def test_revert_of_a_later_step_puts_the_earlier_override_back() -> None:
    h = Harness(mode="on")
    h.samples.median_ms["v2"] = 80.0
    h.loop.on_anomaly(anomaly("open", T0), T0)
    h.run(T0, T0 + 30)
    second = h.of("acted")[1]
    revert = h.loop.revert(second.event_id, "alice", T0 + 30)
    assert h.overrides.effective == {"v1": 75, "v2": 25} and h.overrides.puts[-1].id == revert.override_id
    h.overrides.down = True
    failed_revert = h.loop.revert(h.of("acted")[0].event_id, "alice", T0 + 31)
    assert failed_revert.outcome == "failed" and "connection refused" in failed_revert.reason


def test_a_restarted_loop_fed_the_same_events_takes_no_step_twice(tmp_path) -> None:
    path = tmp_path / "state.db"
    h = Harness(db=sqlite3.connect(path), mode="on")
    h.samples.median_ms["v2"] = 80.0
    h.loop.on_anomaly(anomaly("open", T0), T0)
    h.run(T0, T0 + 3)
    h.db.commit()
    h.db.close()
    assert len(h.overrides.puts) == 1
    h.db = sqlite3.connect(path)  # kill -9 and start again: the same state, the same events
    h.loop = h.new_loop()
    for t in (T0 + 3, T0 + 4):
        h.loop.on_anomaly(anomaly("open", T0), t)
        h.loop.tick(t, HEALTHY)
    assert len(h.overrides.puts) == 1
    h.run(T0 + 5, T0 + 20)  # the next window is the hold-down's, as before the restart
    assert len(h.overrides.puts) == 1 and h.of("refused")[0].guardrail == "hold_down"
    # A resolved anomaly replayed with its open event stays resolved.
    h.loop.on_anomaly(anomaly("resolved", T0 + 20), T0 + 20)
    h.loop.on_anomaly(anomaly("open", T0), T0 + 21)
    assert h.loop.status().open_anomalies == ()


def test_an_hour_of_normal_traffic_acts_on_nothing_and_alerts_nobody() -> None:
    h = Harness(mode="on")
    h.loop.on_anomaly(anomaly("open", T0, feature="authz_denial_ratio", anomaly_id="authz"), T0)  # not the loop's
    h.run(T0, T0 + 3600)
    assert h.decisions == [] and h.alerts == [] and h.overrides.puts == [] and h.scaler.calls == []
    assert h.samples.ranges == []  # nothing was even judged


def test_load_scales_out_to_the_cap_then_back_in_after_the_stabilization_window() -> None:
    h = Harness(mode="on", scaling=ScalingSpec(max_instances=3, stabilization_s=300, ttl_s=1800))
    h.loop.on_anomaly(anomaly("open", T0, service="frontend", feature="request_rate", anomaly_id="load1"), T0)
    h.run(T0, T0 + 120)
    assert h.scaler.calls == [("frontend", 2), ("frontend", 3)]
    outs = h.of("acted", "scale_out")
    assert [d.time_us / 1e6 for d in outs] == [T0, T0 + 20]
    assert json.loads(outs[0].before) == {"instances": 1} and json.loads(outs[0].after) == {"instances": 2}
    assert outs[0].verdict == "" and outs[0].anomaly_id == "load1"  # frontend has no split to judge
    h.loop.on_anomaly(anomaly("resolved", T0 + 120, service="frontend", anomaly_id="load1"), T0 + 120)
    h.run(T0 + 120, T0 + 420)
    assert h.scaler.counts["frontend"] == 3  # not before stabilization_s
    h.run(T0 + 420, T0 + 440, BLIND)
    assert h.scaler.counts["frontend"] == 3  # never while blind
    h.run(T0 + 440, T0 + 450)
    assert h.scaler.calls[-1] == ("frontend", 1)
    scale_in = h.of("acted", "scale_in")[0]
    assert scale_in.time_us / 1e6 == T0 + 440 and "no load anomaly for" in scale_in.reason
    assert h.loop.status().scaling == ()


def test_a_service_whose_subset_fails_its_canary_is_not_scaled_out() -> None:
    h = Harness(mode="on")
    h.samples.median_ms["v2"] = 80.0
    h.loop.on_anomaly(anomaly("open", T0, feature="request_rate", anomaly_id="load1"), T0)
    h.run(T0, T0 + 30)
    assert h.scaler.calls == []
    refused = h.of("refused", "scale_out")
    assert [d.guardrail for d in refused] == ["canary"] * 3 and "v2 is slower" in refused[0].reason


def test_a_scale_out_that_does_not_help_lapses_after_its_ttl() -> None:
    h = Harness(mode="on", scaling=ScalingSpec(max_instances=2, stabilization_s=300, ttl_s=60))
    h.loop.on_anomaly(anomaly("open", T0, service="frontend", feature="request_rate", anomaly_id="load1"), T0)
    h.run(T0, T0 + 200)
    assert h.scaler.calls == [("frontend", 2), ("frontend", 1)]
    lapsed = h.of("acted", "scale_in")[0]
    assert lapsed.time_us / 1e6 == T0 + 60 and "lease 60s" in lapsed.reason


def test_a_scaler_that_refuses_is_a_failed_decision() -> None:
    h = Harness(mode="on", scaling=ScalingSpec(max_instances=20))
    h.scaler.counts["frontend"] = 10
    h.loop.on_anomaly(anomaly("open", T0, service="frontend", feature="request_rate", anomaly_id="load1"), T0)
    h.run(T0, T0 + 1)
    failed_ = h.of("failed")
    assert len(failed_) == 1 and "no room for 11 instances" in failed_[0].reason
    assert h.loop.status().scaling == ()


def test_mode_off_is_not_even_judged_and_mode_changes_are_recorded() -> None:
    h = Harness(mode="on")
    h.samples.median_ms["v2"] = 80.0
    h.loop.set_mode("payments", "off", "alice", T0 - 1)
    h.loop.on_anomaly(anomaly("open", T0), T0)
    h.run(T0, T0 + 30)
    assert h.samples.ranges == [] and h.overrides.puts == []
    assert [d.reason for d in h.decisions] == ["the mode of payments set to off (was on) by alice"]
    with pytest.raises(ValueError, match="not a service name"):
        h.loop.set_mode("Pay'ments", "on", "alice", T0)
