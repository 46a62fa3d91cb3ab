"""The loop closed on the demo mesh, the issue's scenarios one after another on one mesh
(each waits for the anomalies of the one before to resolve).

NOT RUN BY `make test`: run it by hand, `.venv/bin/python -m pytest -s tests/scenarios_actions.py`
(~14 min).  Every scenario passed on this machine, but whether one does depends on the PCA
thresholds of a model trained on the mesh's first 17 windows, which vary several-fold between
runs (payments 30 to 800; issue 14): a run misses a fault, or an anomaly never resolves, about
one time in two.  CI runs the scenario that needs no model (tests/test_actions_e2e.py).

1. a latency fault on payments v2 (split 50/50, mode on) is drained away from v2 and, once
   gone, the declared split is restored, with no failed request; the actions process is
   killed -9 mid-episode on the way (8): one incident, the override kept;
2. a fault on v1 and v2 alike: an alert that it is mesh-wide, and no move;
3. the same slow v2 in shadow mode: recorded with its evidence, the mesh unchanged;
4. an error burst on payments: one PagerDuty incident, triggered then resolved, the
   receivers' 429s (Slack's Retry-After) honoured;
5. a load surge at the front door: frontend scaled out, then back after stabilization;
6. the scorer stopped (SIGSTOP): the loop is blind, says so, and moves nothing.

(7, an hour of normal traffic making no decision and paging nobody, is replayed from a
recording in tests/test_actions_replay.py.)  Anomalies come from a PCA model trained on the
mesh's own first minutes; receivers are loopback servers with PagerDuty's and Slack's
documented contracts (tests/support/receivers.py)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from core import credentials
from core.contracts import WINDOW_SECONDS
from core.datadir import write_atomic
from greymesh.demo.service import knobs_path
from tests.support.mesh import DEMO_SPEC, Mesh, get, running_mesh, wait_for
from tests.support.receivers import PagerDutyEvents, SlackWebhook

RPS = 20
FAULT_MS = 300
RESOLVE_S = 150  # 6 calm windows close an anomaly; the scorer's lateness and a window's slack on top


@pytest.fixture(scope="module")
def receivers() -> Iterator[tuple[SlackWebhook, PagerDutyEvents]]:
    with SlackWebhook() as slack, PagerDutyEvents() as pd:
        yield slack, pd


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, receivers: tuple[SlackWebhook, PagerDutyEvents]) -> Iterator[Mesh]:
    slack, pd = receivers
    work = tmp_path_factory.mktemp("actions")
    secrets = work / "receiver-secrets"
    credentials.issue(secrets / "slack", slack.url)
    credentials.issue(secrets / "pd", uuid.uuid4().hex)
    doc = yaml.safe_load(DEMO_SPEC.read_text())
    doc["services"]["payments"]["routes"][0]["split"] = {"v1": 50, "v2": 50}
    doc["actions"] = {"mode": "shadow", "services": {"payments": {"mode": "on"}}, "hold_down": "20s",
                      "routing": {"step": 25, "floor": 0, "restore_after": "20s"},
                      "scaling": {"max_instances": 3, "stabilization": "30s", "ttl": "10m"}}
    doc["alerts"] = {"group_wait": "0s", "group_interval": "5s",
                     "receivers": {"chat": {"slack": {"webhook_url_file": str(secrets / "slack")}},
                                   "oncall": {"pagerduty": {"routing_key_file": str(secrets / "pd"),
                                                            "url": pd.enqueue_url, "change_url": pd.change_url}}},
                     "routes": [{"services": ["payments"], "receivers": ["oncall", "chat"]},
                                {"receivers": ["chat"]}]}
    with running_mesh(work, doc, "delta", up_args=("--rps", str(RPS))) as m:
        yield m


def closed_windows(mesh: Mesh, service: str) -> int:
    rows = mesh.query(f"SELECT count() AS n FROM service_windows WHERE service = '{service}' "
                      f"AND window < toDateTime({int(time.time()) - 5 - WINDOW_SECONDS})")
    return int(rows[0]["n"])


def decisions(mesh: Mesh, service: str, since: float = 0.0) -> list[dict]:
    out = mesh.cli("actions", "list", "--service", service, "--limit", "500", "--json").stdout
    return [d for d in map(json.loads, out.splitlines()) if d["time_us"] / 1e6 >= since]


def routing(mesh: Mesh, service: str = "payments") -> dict:
    doc = mesh.api(f"http://127.0.0.1:{mesh.ports()['controlplane.admin']}/overrides")
    return next(s for s in doc["services"] if s["service"] == service)


def failed_requests(mesh: Mesh) -> int:
    outcomes = json.loads((mesh.data_dir / "loadgen.json").read_text())["outcomes"]
    return sum(n for status, n in outcomes.items() if status != "200")


def knob(mesh: Mesh, service: str, subset: str | None = None, **knobs: float) -> Path:
    path = knobs_path(mesh.data_dir, service, subset)
    write_atomic(path, json.dumps(knobs))
    return path


def calm(mesh: Mesh) -> None:
    """No anomaly open: the next scenario starts from a quiet mesh."""
    wait_for(lambda: not mesh.status()["ml"]["open_now"], RESOLVE_S, "every anomaly to resolve")


def incidents(pd: PagerDutyEvents, service: str) -> list:
    """The incidents of ``service``'s anomalies (dedup_key: "<service>/<kind>@<episode start>")."""
    return [i for i in pd.incidents if i.dedup_key.startswith(f"{service}/") and "/mesh_wide@" not in i.dedup_key]


def anomalies_opened(mesh: Mesh, service: str, since: float) -> int:
    rows = mesh.query(f"SELECT uniqExact(anomaly_id) AS n FROM anomalies WHERE service = '{service}' "
                      f"AND state = 'open' AND window >= {int(since) - 3 * WINDOW_SECONDS}")
    return int(rows[0]["n"])


def pid_of(mesh: Mesh, workload: str) -> int:
    pid = mesh.status()["processes"][workload]["pid"]
    assert pid, f"{workload} is not running"
    return pid


def instances(mesh: Mesh, service: str) -> int:
    return sum(len(v) for k, v in mesh.status()["instances"].items() if k.split("/")[0] == service)


def test_a_model_trained_on_this_mesh_is_scoring(mesh: Mesh) -> None:
    # The thresholds of a model trained on 17 windows vary several-fold from run to run (issue 14):
    # trained on steady windows only they came out tight enough (payments 30 against ~270) for
    # an anomaly never to resolve; with the start included, a spike can set one 8x its usual.
    wait_for(lambda: closed_windows(mesh, "payments") >= 17, 360, "17 windows of payments traffic")
    trained = mesh.cli("ml", "train", "--since", "15m", "--detector", "pca", timeout=300)
    assert "saved model v0001" in trained.stdout, trained.stdout
    print("\n" + trained.stdout)
    wait_for(lambda: mesh.status()["ml"]["model_version"] == "v0001", 30, "the scorer to load v0001")
    status = mesh.status()["actions"]
    assert not status["loop"]["blind"], status["health"]


def test_a_slow_canary_is_drained_then_restored_with_one_incident_and_no_failed_request(
        mesh: Mesh, receivers: tuple[SlackWebhook, PagerDutyEvents]) -> None:
    slack, pd = receivers
    failed_before = failed_requests(mesh)
    injected = time.time()
    fault = knob(mesh, "payments", "v2", latency_ms=FAULT_MS)
    try:
        wait_for(lambda: routing(mesh)["effective"].get("v2", 50) < 50, 150, "the loop to shift weight away from v2")
        first_shift_s = time.time() - injected
        override = routing(mesh)["override"]
        assert override["by"] == "actions" and override["weights"]["v2"] < 50
        acted = [d for d in decisions(mesh, "payments") if d["action"] == "shift_weight" and d["outcome"] == "acted"]
        evidence = json.loads(acted[-1]["evidence"])
        judged = {j["subset"]: j for j in evidence["judgements"]}
        assert judged["v2"]["verdict"] == "fail" and judged["v1"]["verdict"] == "pass", evidence
        print(f"\nfault -> first shift: {first_shift_s:.1f}s")
        shown = mesh.cli("actions", "show", acted[-1]["event_id"]).stdout
        assert "shift_weight" in shown and '"judgements"' in shown and "p_latency" in shown, shown

        # kill -9 mid-episode: the supervisor restarts it; the override stays, the episode goes on.
        killed = pid_of(mesh, "actions")
        os.kill(killed, signal.SIGKILL)
        wait_for(lambda: mesh.status()["processes"]["actions"]["ready"] and pid_of(mesh, "actions") != killed, 60,
                 "the actions process restarted")
        assert routing(mesh)["override"] is not None, "the override was lost with the process"
        wait_for(lambda: routing(mesh)["effective"].get("v2") == 0, 90, "v2 drained to 0")
    finally:
        fault.unlink(missing_ok=True)
    drained_at = time.time()

    # The fault is gone: the anomaly resolves (6 calm windows), then each step back waits 20 s healthy.
    wait_for(lambda: routing(mesh)["override"] is None, 300, "the declared split back (override cleared)")
    print(f"drained -> declared split again: {time.time() - drained_at:.1f}s")
    assert routing(mesh)["effective"] == {"v1": 50, "v2": 50}
    restored = [d for d in decisions(mesh, "payments") if d["action"] == "restore_weight" and d["outcome"] == "acted"]
    assert restored and json.loads(restored[-1]["after"])["weights"]["v2"] > 0
    assert failed_requests(mesh) == failed_before, "a request failed while the loop moved traffic"

    # One incident for the payments episode, across the kill, resolved once the fault cleared.
    wait_for(lambda: incidents(pd, "payments") and all(i.resolved for i in incidents(pd, "payments")), 120,
             "the payments incident resolved")
    assert len(incidents(pd, "payments")) == anomalies_opened(mesh, "payments", injected), \
        "one incident per anomaly episode, none doubled by the kill"
    assert pd.changes, "the loop's moves go to PagerDuty as change events"
    assert any("payments" in json.dumps(m) for m in slack.messages)

    # An operator's revert of the first shift goes through the same path and is recorded as theirs.
    reverted = mesh.cli("actions", "revert", acted[-1]["event_id"])
    assert " revert " in reverted.stdout and " acted " in reverted.stdout, reverted.stdout
    revert = next(d for d in decisions(mesh, "payments") if d["action"] == "revert")
    assert revert["by"] == "cli" and json.loads(revert["after"]) == {"weights": {"v1": 50, "v2": 50}}
    assert routing(mesh)["effective"] == {"v1": 50, "v2": 50}

    # Every decision is in the audit stream (Kafka -> store), with its inputs.
    ids = {d["event_id"] for d in acted + restored + [revert]}
    wait_for(lambda: ids <= {r["event_id"] for r in mesh.query(
        "SELECT event_id FROM actions WHERE service = 'payments'")}, 60, "the decisions in the store")
    calm(mesh)


def test_a_fault_on_every_subset_alerts_and_moves_nothing(mesh: Mesh) -> None:
    since = time.time()
    fault = knob(mesh, "payments", latency_ms=FAULT_MS)  # the service's knobs: v1 and v2 alike
    try:
        wait_for(lambda: any(d["action"] == "alert" for d in decisions(mesh, "payments", since)), 150,
                 "the loop to say the fault is mesh-wide")
        assert routing(mesh)["override"] is None
        assert not [d for d in decisions(mesh, "payments", since) if d["outcome"] == "acted"]
        firing = mesh.cli("alerts", "list").stdout
        assert "payments/mesh_wide" in firing, firing
    finally:
        fault.unlink(missing_ok=True)
    calm(mesh)


def test_in_shadow_mode_the_same_fault_is_recorded_not_acted_on(mesh: Mesh) -> None:
    mesh.cli("actions", "mode", "payments", "shadow")
    since = time.time()
    fault = knob(mesh, "payments", "v2", latency_ms=FAULT_MS)
    try:
        wait_for(lambda: any(d["outcome"] == "shadowed" for d in decisions(mesh, "payments", since)), 150,
                 "a shadowed decision")
        assert routing(mesh)["override"] is None, "shadow mode changed the mesh"
        shadowed = next(d for d in decisions(mesh, "payments", since) if d["outcome"] == "shadowed")
        assert shadowed["action"] == "shift_weight" and shadowed["guardrail"] == "mode"
        assert json.loads(shadowed["evidence"])["judgements"], "a shadowed decision keeps its evidence"
    finally:
        fault.unlink(missing_ok=True)
    status = mesh.cli("status").stdout
    assert "actions: mode shadow (payments shadow)" in status, status
    calm(mesh)


def test_an_error_burst_pages_once_and_the_receivers_rate_limits_are_honoured(
        mesh: Mesh, receivers: tuple[SlackWebhook, PagerDutyEvents]) -> None:
    slack, pd = receivers
    slack_before, pd_before = len(slack.received), len(pd.received)
    slack.answer_next(1, 429, retry_after=3)
    pd.answer_next(1, 429)
    since = time.time()
    before = {i.dedup_key for i in incidents(pd, "payments")}
    fault = knob(mesh, "payments", error_ratio=0.5)  # v1 and v2 alike: an alert, no move

    def burst() -> list:
        return [i for i in incidents(pd, "payments") if i.dedup_key not in before]
    try:
        wait_for(lambda: bool(burst()), 150, "a PagerDuty incident for the payments errors")
    finally:
        fault.unlink(missing_ok=True)
    wait_for(lambda: all(i.resolved for i in burst()), RESOLVE_S + 30, "the incident resolved after recovery")
    assert len(burst()) == anomalies_opened(mesh, "payments", since) == 1, [i.summaries for i in burst()]
    assert burst()[0].dedup_key.startswith("payments/errors@")

    # The 429s were answered, and the retries waited: Slack its Retry-After, PagerDuty a backoff.
    for contract, wait_s in ((slack, 3.0), (pd, 1.0)):
        after = contract.received[slack_before if contract is slack else pd_before:]
        throttled = next(i for i, r in enumerate(after) if r.status == 429)
        assert len(after) > throttled + 1, "no retry after the 429"
        assert after[throttled + 1].at - after[throttled].at >= wait_s * 0.9
        assert after[throttled + 1].body == after[throttled].body, "the retry is the same message"
    calm(mesh)


def test_a_load_surge_at_the_front_door_scales_frontend_out_then_back(mesh: Mesh) -> None:
    mesh.cli("actions", "mode", "frontend", "on")
    assert instances(mesh, "frontend") == 1
    stop = threading.Event()

    def surge() -> None:
        url = mesh.entrypoint
        while not stop.is_set():
            get(url)

    threads = [threading.Thread(target=surge, daemon=True) for _ in range(4)]  # ~5x the load
    for t in threads:
        t.start()
    try:
        wait_for(lambda: instances(mesh, "frontend") >= 2, 180, "frontend scaled out")
        out = [d for d in decisions(mesh, "frontend") if d["action"] == "scale_out" and d["outcome"] == "acted"]
        assert out and json.loads(out[-1]["before"]) == {"instances": 1}
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    wait_for(lambda: instances(mesh, "frontend") == 1, RESOLVE_S + 120, "frontend scaled back in")
    back = [d for d in decisions(mesh, "frontend") if d["action"] == "scale_in" and d["outcome"] == "acted"]
    assert back and json.loads(back[-1]["after"]) == {"instances": 1}
    calm(mesh)


def test_with_the_scorer_stopped_the_loop_is_blind_says_so_and_moves_nothing(
        mesh: Mesh, receivers: tuple[SlackWebhook, PagerDutyEvents]) -> None:
    slack, _ = receivers
    scorer = pid_of(mesh, "scorer")
    since = time.time()
    os.kill(scorer, signal.SIGSTOP)
    try:
        wait_for(lambda: mesh.status()["actions"]["loop"]["blind"], 60, "the loop to see it is blind")
        assert "scorer" in mesh.status()["actions"]["health"]["detail"]
        wait_for(lambda: any("loop_blind" in json.dumps(m) or "blind" in json.dumps(m) for m in slack.messages),
                 30, "the loop-blind alert on Slack")
        assert "BLIND" in mesh.cli("status", check=False).stdout
    finally:
        os.kill(scorer, signal.SIGCONT)
    wait_for(lambda: not mesh.status()["actions"]["loop"]["blind"], 60, "the loop to see again")
    moved = [d for s in ("payments", "frontend") for d in decisions(mesh, s, since) if d["outcome"] == "acted"]
    assert moved == []
