"""The loop: anomalies in, guarded routing and scaling steps out, every decision with its evidence.

Pure decision logic: the store, the control plane and the instance runner are behind
Protocols (:class:`~actions.samples.SampleSource`, :class:`OverridesApi`,
:class:`~actions.scaling.Scaler`), the clock is an argument, the state is SQLite (``loop_*``
tables, committed by the caller in the transaction of the round), and decisions and alerts
leave through callbacks.  actions/service.py wires it to Kafka, the sink and the control plane.

**Routing** (anomaly kinds latency and errors, on a service whose split has two or more
subsets with weight).  Once per analysis window the subsets are judged on the callers'
requests of the last :data:`JUDGE_WINDOWS` windows (actions/judge.py):

- exactly one subset fails and the others pass: shift ``step_percent`` of weight away from
  it (never below ``floor_percent``), through an override of the control plane.  That opens
  an *episode* of the service, which lasts until its split is the declared one again;
- no subset fails, or several do: the fault is not one subset's (mesh-wide); no move, an
  alert ``<service>/mesh_wide`` once per anomaly;
- a subset unknown (too little traffic), or the store unreadable: hold (no move), recorded.

Once no routing anomaly is open, the drained subset must stay healthy (not failing its
judgement; with no traffic to judge, the detector's silence counts) for ``restore_after_s``
before each step back toward the declared split; at the declared split the override is
cleared.  A subset that fails again while being restored is shifted away again (a
relapse), and each relapse lengthens the wait by another ``restore_after_s``, as Envoy
lengthens a re-ejected host's ejection.

**Scaling** (anomaly kind load).  Once per window: unless a subset of the service fails its
judgement (then scaling would feed the bad subset), one more instance, up to
``max_instances``.  Back to the instances before the episode once no load anomaly has been
open for ``stabilization_s``.  Each scale-out is a lease of ``ttl_s``: a load anomaly still
open that long after the last scale-out was not load that instances fix, so the instances
are given back and that anomaly is left to people.

**Unknown.**  While :class:`LoopHealth` is not ok (store, scorer or Kafka), nothing moves in
either direction, services with an open anomaly get a ``held`` decision per window, and the
alert ``mesh/loop_blind`` fires until the loop sees again.

**Guardrails** (actions/guardrails.py) decide whether a step is made (``acted``), recorded
as "would have" (``shadowed``) or not made (``refused``).  Mode ``off`` services are not
even judged.

**Restarts.**  Anomalies, episodes and the last window each service was judged in are
rows, so a restarted loop fed the same events again takes no step twice: a step is taken
at most once per service, concern and analysis window.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from actions.controlplane import OverrideError
from actions.guardrails import Check, Guardrails
from actions.judge import Judgement, judge_subsets
from actions.model import Alert, anomaly_kind
from actions.samples import SampleSource
from actions.scaling import ScaleError, Scaler
from core.contracts import NAME_RULE, VERSION, WINDOW_SECONDS, ActionDecision, AnomalyEvent, Outcome, Override, \
    ServiceRouting
from core.jsonhttp import ACTIONS
from core.loopspec import ActionsSpec, Mode
from core.storeclient import StoreError

JUDGE_WINDOWS = 3  # windows of requests per judgement: enough samples at a few requests per second
ROUTING_KINDS = ("latency", "errors")  # what moving weight away from one subset can fix
LOAD_KINDS = ("load",)
MESH = "mesh"  # the "service" of decisions and alerts about the whole loop
BLIND_KEY = f"{MESH}/loop_blind"
KEPT_DECISIONS = 10_000  # for the CLI; the whole trail is on Kafka and in the store
KEPT_ANOMALIES_S = 86_400.0  # resolved anomalies are forgotten after a day

_SCHEMA = """
CREATE TABLE IF NOT EXISTS loop_anomalies (
    anomaly_id TEXT PRIMARY KEY, service TEXT NOT NULL, kind TEXT NOT NULL, state TEXT NOT NULL,
    window INTEGER NOT NULL, score REAL NOT NULL, threshold REAL NOT NULL, peak_score REAL NOT NULL,
    windows INTEGER NOT NULL, resolved_at REAL, alerted INTEGER NOT NULL DEFAULT 0,
    dismissed INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS loop_anomalies_open ON loop_anomalies (state, service);
CREATE TABLE IF NOT EXISTS loop_routing (
    service TEXT PRIMARY KEY, anomaly_id TEXT NOT NULL, drained TEXT NOT NULL, weights TEXT NOT NULL,
    started_at REAL NOT NULL, healthy_since REAL, restores INTEGER NOT NULL, relapses INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS loop_scaling (
    service TEXT PRIMARY KEY, anomaly_id TEXT NOT NULL, baseline INTEGER NOT NULL, instances INTEGER NOT NULL,
    raised_at REAL NOT NULL, calm_since REAL);
CREATE TABLE IF NOT EXISTS loop_windows (service TEXT NOT NULL, concern TEXT NOT NULL, window INTEGER NOT NULL,
                                         PRIMARY KEY (service, concern));
CREATE TABLE IF NOT EXISTS loop_alerts (key TEXT PRIMARY KEY, service TEXT NOT NULL, since REAL NOT NULL);
CREATE TABLE IF NOT EXISTS loop_decisions (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE,
                                           service TEXT NOT NULL, event TEXT NOT NULL);
"""


class OverridesApi(Protocol):
    """The control plane's overrides API (actions/controlplane.py); each call raises
    OverrideError when refused or unreachable."""

    def routing(self) -> list[ServiceRouting]: ...

    def put(self, override: Override) -> object: ...

    def clear(self, service: str) -> object: ...


@dataclass(frozen=True)
class LoopHealth:
    """Whether the loop can see: the store answers, the scorer scores, Kafka is read in time."""

    store_ok: bool
    scorer_ok: bool
    kafka_ok: bool
    detail: str = ""  # what is wrong, for a person

    @property
    def ok(self) -> bool:
        return self.store_ok and self.scorer_ok and self.kafka_ok


@dataclass(frozen=True)
class Anomaly:
    """An anomaly as the loop keeps it."""

    anomaly_id: str
    service: str
    kind: str
    state: str
    window: int
    score: float
    threshold: float
    peak_score: float
    windows: int
    resolved_at: float | None
    alerted: bool
    dismissed: bool


@dataclass(frozen=True)
class RoutingEpisode:
    """A service whose split the loop moved (or, in shadow, would have), until it is declared again."""

    service: str
    anomaly_id: str
    drained: str  # the subset weight was shifted away from
    weights: tuple[tuple[str, int], ...]  # the split as the loop left it
    started_at: float
    healthy_since: float | None  # since when the drained subset has not failed, once no anomaly is open
    restores: int  # restoring steps taken
    relapses: int  # shifts away after a restoring step


@dataclass(frozen=True)
class ScalingEpisode:
    service: str
    anomaly_id: str
    baseline: int  # instances before the first scale-out
    instances: int  # as the loop left them
    raised_at: float  # the last scale-out (its lease runs from here)
    calm_since: float | None  # since when no load anomaly is open


@dataclass(frozen=True)
class LoopStatus:
    blind: bool
    frozen: str  # "" or who froze it
    default_mode: str
    modes: tuple[tuple[str, str], ...]  # (service, mode) set by operators
    open_anomalies: tuple[tuple[str, str, str], ...]  # (service, kind, anomaly id)
    routing: tuple[RoutingEpisode, ...]
    scaling: tuple[ScalingEpisode, ...]

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["modes"] = dict(self.modes)
        doc["routing"] = [asdict(e) | {"weights": dict(e.weights)} for e in self.routing]
        return doc


# --- the arithmetic of weights ----------------------------------------------------------


def apportion(total: int, shares: dict[str, int]) -> dict[str, int]:
    """``total`` whole units spread over ``shares``' keys in proportion to their values (equally
    when all are 0), by largest remainder, ties to the first key."""
    keys = list(shares)
    base = sum(shares.values())
    exact = [total * shares[k] / base if base else total / len(keys) for k in keys]
    given = [int(x) for x in exact]
    by_remainder = sorted(range(len(keys)), key=lambda i: (-(exact[i] - given[i]), i))
    for i in by_remainder[: total - sum(given)]:
        given[i] += 1
    return dict(zip(keys, given))


def shift_away(weights: dict[str, int], bad: str, step: int, floor: int) -> dict[str, int]:
    """``step`` points of weight from ``bad`` to the others (in proportion to theirs), never
    leaving ``bad`` below ``floor``; the weights still sum to what they did."""
    moved = min(step, weights[bad] - floor)
    if moved <= 0:
        return dict(weights)
    gains = apportion(moved, {s: w for s, w in weights.items() if s != bad})
    return {s: w - moved if s == bad else w + gains[s] for s, w in weights.items()}


def restore_toward(weights: dict[str, int], declared: dict[str, int], drained: str, step: int) -> dict[str, int]:
    """``step`` points back to ``drained``, taken from the subsets above their declared weight
    (in proportion to their excess); the declared split itself once within a step of it."""
    if set(weights) != set(declared) or drained not in declared or declared[drained] - weights[drained] <= step:
        return dict(declared)
    excess = {s: max(0, w - declared[s]) for s, w in weights.items() if s != drained}
    takes = apportion(step, excess)
    return {s: w + step if s == drained else w - takes[s] for s, w in weights.items()}


@dataclass(frozen=True)
class _Step:
    """What a step does, in words: "shift" / "shifted" + "25% of payments' traffic away from v2 (...)"."""

    verb: str
    past: str
    what: str

    def reason(self, outcome: Outcome, why: str) -> str:
        return {"acted": f"{self.past.capitalize()} {self.what}: {why}",
                "shadowed": f"Would have {self.past} {self.what}: {why}",
                "refused": f"Did not {self.verb} {self.what}: {why}",
                }.get(outcome, f"Could not {self.verb} {self.what}: {why}")


def _window_of(now: float) -> int:
    return int(now) // WINDOW_SECONDS * WINDOW_SECONDS


def _split(weights: dict[str, int]) -> str:
    return "/".join(f"{s} {w}%" for s, w in weights.items())


class Loop:
    def __init__(self, db: sqlite3.Connection, spec: ActionsSpec, samples: SampleSource, overrides: OverridesApi,
                 scaler: Scaler, emit: Callable[[ActionDecision], None], alert: Callable[[Alert], None],
                 inhibit: Callable[[str, float], None]):
        """``emit`` gets every decision, ``alert`` the loop's own alerts (mesh-wide, blind),
        ``inhibit(service, until)`` is told when a routing step was made, so that the notifier
        mutes the symptoms that step is expected to cause until then."""
        self.db = db
        self.spec = spec
        self.samples, self.overrides, self.scaler = samples, overrides, scaler
        self.emit, self.alert, self.inhibit = emit, alert, inhibit
        self.guardrails = Guardrails(db, spec)
        db.executescript(_SCHEMA)
        self._view: dict[str, ServiceRouting] | str | None = None  # this tick's routing, or why it is missing

    def update_spec(self, spec: ActionsSpec) -> None:
        self.spec = spec
        self.guardrails.update_spec(spec)

    # -- input -----------------------------------------------------------------------------

    def on_anomaly(self, event: AnomalyEvent, now: float) -> None:
        """Record an anomaly's open or resolved event.  Idempotent: an event seen again (a
        replay after a restart) changes nothing, and a resolved anomaly never reopens."""
        if event.state == "open":
            self.db.execute(
                "INSERT INTO loop_anomalies (anomaly_id, service, kind, state, window, score, threshold, peak_score, "
                "windows) VALUES (?, ?, ?, 'open', ?, ?, ?, ?, ?) ON CONFLICT (anomaly_id) DO NOTHING",
                (event.anomaly_id, event.service, anomaly_kind(event), event.window, event.score, event.threshold,
                 event.peak_score, event.windows))
            return
        self.db.execute(
            "INSERT INTO loop_anomalies (anomaly_id, service, kind, state, window, score, threshold, peak_score, "
            "windows, resolved_at) VALUES (?, ?, ?, 'resolved', ?, ?, ?, ?, ?, ?) ON CONFLICT (anomaly_id) DO UPDATE "
            "SET state = 'resolved', window = excluded.window, score = excluded.score, peak_score = "
            "excluded.peak_score, windows = excluded.windows, resolved_at = excluded.resolved_at "
            "WHERE state = 'open'",
            (event.anomaly_id, event.service, anomaly_kind(event), event.window, event.score, event.threshold,
             event.peak_score, event.windows, now))
        key = f"{event.service}/mesh_wide"
        if self._open_anomaly(event.service, ROUTING_KINDS) is None and self._firing(key):
            self._resolve(key, event.service, "mesh_wide", f"{event.service}: the anomaly resolved", now)

    def kind_of(self, anomaly_id: str) -> str | None:
        """The kind an anomaly was recorded with when it opened (a resolve event's own causes
        describe the calm window that closed it, not the fault), None when unknown."""
        row = self.db.execute("SELECT kind FROM loop_anomalies WHERE anomaly_id = ?", (anomaly_id,)).fetchone()
        return row[0] if row else None

    def tick(self, now: float, health: LoopHealth) -> None:
        """Decide what this analysis window calls for (at most once per service and window)."""
        window = _window_of(now)
        self._view = None
        self.db.execute("DELETE FROM loop_anomalies WHERE state = 'resolved' AND resolved_at < ?",
                        (now - KEPT_ANOMALIES_S,))
        if not health.ok:
            self._blind(now, window, health)
            return
        if self._firing(BLIND_KEY):
            self._resolve(BLIND_KEY, MESH, "loop_blind", "the loop sees again: store, scorer and Kafka are healthy",
                          now)
        for service in self._services():
            if self.guardrails.mode_of(service) == "off":
                continue
            routing_anomaly = self._open_anomaly(service, ROUTING_KINDS)
            if (routing_anomaly or self._routing_episode(service)) and self._claim(service, "routing", window):
                self._route(service, routing_anomaly, now, window)
            load_anomaly = self._open_anomaly(service, LOAD_KINDS)
            if (load_anomaly or self._scaling_episode(service)) and self._claim(service, "scaling", window):
                self._scale(service, load_anomaly, now, window)

    # -- operators' commands -----------------------------------------------------------------

    def revert(self, decision_id: str, by: str, now: float) -> ActionDecision:
        """Put back the state an acted decision changed from (weights or instances), and leave
        its anomaly to people (the loop takes no more steps for it).  ValueError when there is
        nothing to revert."""
        done = self.decision(decision_id)
        if done is None:
            raise ValueError(f"no decision {decision_id!r}; `greymesh actions list` shows them")
        if done.outcome != "acted":
            raise ValueError(f"decision {decision_id} was {done.outcome}: it changed nothing, so nothing is reverted")
        before, after = json.loads(done.before or "{}"), json.loads(done.after or "{}")
        service, decision = done.service, uuid.uuid4().hex
        outcome: Outcome = "acted"
        try:
            if "weights" in before:
                target = {str(s): int(w) for s, w in before["weights"].items()}
                what = f"weights back to {_split(target)}"
                declared = dict(self._routing_of(service).declared)
                if target == declared:
                    self.overrides.clear(service)
                else:
                    self.overrides.put(Override(service=service, id=decision, weights=tuple(target.items()),
                                                reason=f"revert of {decision_id} by {by}"))
                self._set_routing_weights(service, target, declared)
            elif "instances" in before:
                target_n = int(before["instances"])
                what = f"{target_n} instances"
                self.scaler.scale(service, target_n)
                self._set_scaling_instances(service, target_n)
            else:
                raise ValueError(f"decision {decision_id} ({done.action}) changed nothing a revert can put back")
        except (OverrideError, ScaleError) as exc:
            outcome, reason = "failed", f"could not revert {decision_id} ({what}): {exc}"
        else:
            reason = f"reverted {decision_id} ({done.action}) by {by}: {what}"
            self.db.execute("UPDATE loop_anomalies SET dismissed = 1 WHERE anomaly_id = ?", (done.anomaly_id,))
        return self._decide(service, "", "revert", outcome, now, before=after, after=before, by=by,
                            override_id=decision if outcome == "acted" and "weights" in before else "",
                            reason=reason, evidence={"reverts": decision_id})

    def set_mode(self, service: str, mode: Mode, by: str, now: float) -> None:
        if not NAME_RULE.fullmatch(service):
            raise ValueError(f"service: {service!r} is not a service name (a DNS label)")
        was = self.guardrails.mode_of(service)
        self.guardrails.set_mode(service, mode, by, now)
        self._decide(service, "", "none", "noted", now, mode=mode, by=by,
                     reason=f"the mode of {service} set to {mode} (was {was}) by {by}")

    def freeze(self, by: str, now: float) -> None:
        self.guardrails.set_frozen(True, by, now)
        self._decide(MESH, "", "none", "noted", now, by=by,
                     reason=f"the mesh frozen by {by}: nothing automated changes it")

    def unfreeze(self, by: str, now: float) -> None:
        self.guardrails.set_frozen(False, by, now)
        still = self.guardrails.frozen()
        self._decide(MESH, "", "none", "noted", now, by=by,
                     reason=f"the mesh unfrozen by {by}" + (" (the spec still freezes it)" if still else ""))

    # -- reading ---------------------------------------------------------------------------

    def decisions(self, limit: int = 20, service: str | None = None) -> list[ActionDecision]:
        """The newest decisions first (of one service when given)."""
        where, args = ("WHERE service = ?", (service,)) if service else ("", ())
        rows = self.db.execute(f"SELECT event FROM loop_decisions {where} ORDER BY seq DESC LIMIT ?", (*args, limit))
        return [ActionDecision(**json.loads(event)) for (event,) in rows]

    def decision(self, decision_id: str) -> ActionDecision | None:
        row = self.db.execute("SELECT event FROM loop_decisions WHERE event_id = ?", (decision_id,)).fetchone()
        return ActionDecision(**json.loads(row[0])) if row else None

    def status(self) -> LoopStatus:
        frozen = self.guardrails.frozen()
        return LoopStatus(
            blind=self._firing(BLIND_KEY), frozen="" if frozen is None else frozen.by, default_mode=self.spec.mode,
            modes=tuple((s, m.value) for s, m in self.guardrails.mode_settings().items()),
            open_anomalies=tuple(self.db.execute("SELECT service, kind, anomaly_id FROM loop_anomalies "
                                                 "WHERE state = 'open' ORDER BY service, window").fetchall()),
            routing=tuple(self._routing_episode(s) for (s,) in self.db.execute(
                "SELECT service FROM loop_routing ORDER BY service").fetchall()),
            scaling=tuple(self._scaling_episode(s) for (s,) in self.db.execute(
                "SELECT service FROM loop_scaling ORDER BY service").fetchall()))

    # -- blind -----------------------------------------------------------------------------

    def _blind(self, now: float, window: int, health: LoopHealth) -> None:
        why = health.detail or ", ".join(name for name, ok in (("store", health.store_ok), ("scorer", health.scorer_ok),
                                                                ("kafka", health.kafka_ok)) if not ok) + " unhealthy"
        if not self._firing(BLIND_KEY):
            self._fire(BLIND_KEY, MESH, "loop_blind", "error", f"the actions loop is blind ({why}): it holds every "
                       "routing and scaling move until it sees again", now, (("health", json.dumps(asdict(health))),))
            self._decide(MESH, "", "none", "held", now, verdict="unknown", guardrail="blind",
                         reason=f"the loop is blind ({why}): every move holds", evidence={"health": asdict(health)})
        for service in self._services():
            if self.guardrails.mode_of(service) == "off":
                continue
            for concern, kinds, action in (("routing", ROUTING_KINDS, "shift_weight"),
                                           ("scaling", LOAD_KINDS, "scale_out")):
                anomaly = self._open_anomaly(service, kinds)
                if anomaly is not None and self._claim(service, concern, window):
                    self._decide(service, anomaly.anomaly_id, action, "held", now, window=window, verdict="unknown",
                                 guardrail="blind", evidence={"anomaly": _anomaly_json(anomaly),
                                                              "health": asdict(health)},
                                 reason=f"{service}: anomalous, but the loop is blind ({why}): no move")

    # -- routing ---------------------------------------------------------------------------

    def _route(self, service: str, anomaly: Anomaly | None, now: float, window: int) -> None:
        mode = self.guardrails.mode_of(service)
        episode = self._routing_episode(service)
        action = "shift_weight" if anomaly else "restore_weight"
        view = self._routing_view()
        if isinstance(view, str):
            if anomaly is not None:
                self._decide(service, anomaly.anomaly_id, action, "held", now, window=window, verdict="unknown",
                             guardrail="unknown", evidence={"anomaly": _anomaly_json(anomaly)},
                             reason=f"{service}: the control plane's routing cannot be read ({view}): no move")
            return
        routing = view.get(service)
        if routing is None or len(routing.effective) < 2:  # no split (any more): nothing to move or restore
            self.db.execute("DELETE FROM loop_routing WHERE service = ?", (service,))
            return
        weights = dict(episode.weights) if episode and mode == "shadow" else dict(routing.effective)
        declared = dict(routing.declared)
        if anomaly is not None:
            if episode is not None:
                self.db.execute("UPDATE loop_routing SET healthy_since = NULL WHERE service = ?", (service,))
            if not anomaly.dismissed:
                self._shift(service, anomaly, episode, routing, weights, mode, now, window)
            return
        if episode is None:
            return
        if weights == declared:  # the override went (an apply of the operator's, a revert): done
            self.db.execute("DELETE FROM loop_routing WHERE service = ?", (service,))
            return
        self._restore(service, episode, routing, weights, declared, mode, now, window)

    def _shift(self, service: str, anomaly: Anomaly, episode: RoutingEpisode | None, routing: ServiceRouting,
               weights: dict[str, int], mode: Mode, now: float, window: int) -> None:
        live = [s for s, w in weights.items() if w > 0]
        if len(live) < 2:
            return  # everything is on one subset already
        judged = self._judge(service, live, anomaly, "shift_weight", mode, now, window)
        if judged is None:
            return
        unknown = [j for j in judged if j.verdict == "unknown"]
        if unknown:
            self._decide(service, anomaly.anomaly_id, "shift_weight", "held", now, window=window, mode=mode,
                         verdict="unknown", guardrail="unknown", before={"weights": weights},
                         evidence=self._evidence(service, anomaly, window, judged),
                         reason=f"{service}: anomalous, but the judge cannot tell ({unknown[0].reason}): no move")
            return
        fails = [j for j in judged if j.verdict == "fail"]
        if len(fails) != 1 or (episode is not None and episode.drained != fails[0].subset):
            self._mesh_wide(service, anomaly, judged, fails, mode, now, window)
            return
        bad = fails[0]
        after = shift_away(weights, bad.subset, self.spec.routing.step_percent, self.spec.routing.floor_percent)
        if after == weights:
            return  # at the floor already: nothing left to move
        step = _Step("shift", "shifted", f"{weights[bad.subset] - after[bad.subset]}% of the traffic to {service} "
                                         f"away from {bad.subset} ({_split(weights)} -> {_split(after)})")
        outcome = self._move(service, anomaly, routing, weights, after, mode, now, window, "shift_weight", step,
                             f"{bad.reason}; anomaly score {anomaly.score:.3g} over threshold {anomaly.threshold:.3g}",
                             judged)
        if outcome not in ("acted", "shadowed"):
            return
        if episode is None:
            self.db.execute("INSERT INTO loop_routing VALUES (?, ?, ?, ?, ?, NULL, 0, 0)",
                            (service, anomaly.anomaly_id, bad.subset, json.dumps(after), now))
        else:  # after restoring steps, a shift away is a relapse (counted once, however many steps it takes)
            self.db.execute("UPDATE loop_routing SET weights = ?, healthy_since = NULL, relapses = relapses + "
                            "(restores > 0), restores = 0 WHERE service = ?", (json.dumps(after), service))

    def _restore(self, service: str, episode: RoutingEpisode, routing: ServiceRouting, weights: dict[str, int],
                 declared: dict[str, int], mode: Mode, now: float, window: int) -> None:
        drained = episode.drained
        healthy_since = now if episode.healthy_since is None else episode.healthy_since
        self.db.execute("UPDATE loop_routing SET healthy_since = ? WHERE service = ?", (healthy_since, service))
        live = [s for s, w in weights.items() if w > 0]
        judged: tuple[Judgement, ...] = ()
        if drained in live and len(live) >= 2:
            found = self._judge(service, live, None, "restore_weight", mode, now, window)
            if found is None:
                return
            judged = found
            mine = next(j for j in judged if j.subset == drained)
            if mine.verdict == "fail":  # a relapse: away again, and a longer wait before the next try
                self.db.execute("UPDATE loop_routing SET healthy_since = ? WHERE service = ?", (now, service))
                after = shift_away(weights, drained, self.spec.routing.step_percent, self.spec.routing.floor_percent)
                if after != weights:
                    step = _Step("shift", "shifted",
                                 f"{weights[drained] - after[drained]}% of the traffic to {service} away from "
                                 f"{drained} again ({_split(weights)} -> {_split(after)})")
                    if self._move(service, None, routing, weights, after, mode, now, window, "shift_weight", step,
                                  f"{mine.reason}, while being restored", judged) in ("acted", "shadowed"):
                        self.db.execute("UPDATE loop_routing SET weights = ?, relapses = relapses + (restores > 0), "
                                        "restores = 0 WHERE service = ?", (json.dumps(after), service))
                return
        wait = self.spec.routing.restore_after_s * (1 + episode.relapses)
        if now - healthy_since < wait:
            return
        after = restore_toward(weights, declared, drained, self.spec.routing.step_percent)
        step = _Step("move", "moved", f"{after.get(drained, 0) - weights.get(drained, 0)}% of the traffic to {service} "
                                      f"back to {drained} ({_split(weights)} -> {_split(after)}"
                                      + (", the declared split)" if after == declared else ")"))
        outcome = self._move(service, None, routing, weights, after, mode, now, window, "restore_weight", step,
                             f"{drained} healthy for {now - healthy_since:.0f}s (at least {wait:g}s), "
                             "no anomaly open",
                             judged)
        if outcome not in ("acted", "shadowed"):
            return
        if after == declared:
            self.db.execute("DELETE FROM loop_routing WHERE service = ?", (service,))
        else:  # each restoring step must be followed by a healthy period of its own
            self.db.execute("UPDATE loop_routing SET weights = ?, healthy_since = ?, restores = restores + 1 "
                            "WHERE service = ?", (json.dumps(after), now, service))

    def _move(self, service: str, anomaly: Anomaly | None, routing: ServiceRouting, before: dict[str, int],
              after: dict[str, int], mode: Mode, now: float, window: int, action: str, step: _Step, why: str,
              judged: tuple[Judgement, ...]) -> Outcome:
        """A routing step through the guardrails; the decision emitted; its outcome returned."""
        decision = uuid.uuid4().hex
        check = self.guardrails.check(service, now, window)
        theirs = routing.override is not None and routing.override.by not in ("", ACTIONS)
        if check.allowed and theirs:
            check = Check(False, "operator_override", f"{service} carries an override by {routing.override.by} "
                                                      f"({routing.override.id}): the loop does not replace it")
        evidence = self._evidence(service, anomaly, window, judged, check)  # the range judged, before this step
        outcome: Outcome
        if check.allowed:
            try:
                if after == dict(routing.declared):
                    self.overrides.clear(service)
                else:
                    self.overrides.put(Override(service=service, id=decision, weights=tuple(after.items()),
                                                reason=step.reason("acted", why)[:1000]))
            except OverrideError as exc:
                outcome, why = "failed", f"the control plane said: {exc}"
            else:
                outcome = "acted"
                self.guardrails.record(service, now, window, shadow=False)
                self.inhibit(service, now + self.spec.hold_down_s)
        elif check.guardrail == "mode" and mode == "shadow":
            outcome = "shadowed"
            self.guardrails.record(service, now, window, shadow=True)
        else:
            outcome, why = "refused", f"{check.detail} ({why})"
        self._decide(service, anomaly.anomaly_id if anomaly else "", action, outcome, now, window=window, mode=mode,
                     verdict="fail" if action == "shift_weight" else "pass" if judged else "",
                     guardrail=check.guardrail,
                     before={"weights": before}, after={"weights": after},
                     override_id=decision if outcome == "acted" and after != dict(routing.declared) else "",
                     evidence=evidence, reason=step.reason(outcome, why))
        return outcome

    def _mesh_wide(self, service: str, anomaly: Anomaly, judged: tuple[Judgement, ...], fails: list[Judgement],
                   mode: Mode, now: float, window: int) -> None:
        """No single subset to blame: no move; one alert and one decision per anomaly."""
        if anomaly.alerted:
            return
        self.db.execute("UPDATE loop_anomalies SET alerted = 1 WHERE anomaly_id = ?", (anomaly.anomaly_id,))
        blame = ("no subset is worse than the others" if not fails else
                 f"{' and '.join(j.subset for j in fails)} fail{'s' if len(fails) == 1 else ''}"
                 + (" (not the subset already drained)" if len(fails) == 1 else ""))
        summary = f"{service} is anomalous and {blame}: a fault beyond one subset; the loop moves no traffic"
        self._fire(f"{service}/mesh_wide", service, "mesh_wide", "error", summary, now,
                   tuple((j.subset, j.reason) for j in judged))
        self._decide(service, anomaly.anomaly_id, "alert", "noted", now, window=window, mode=mode,
                     verdict="fail" if fails else "pass", evidence=self._evidence(service, anomaly, window, judged),
                     reason=summary)

    def _judge_range(self, service: str, window: int) -> tuple[int, int]:
        """The windows a judgement reads: the last JUDGE_WINDOWS closed ones, but none from
        before the loop last changed the service's split (the window of that step included).
        Pooled across a change, the subset whose weight rose would carry more of the later
        windows' requests and be blamed for a fault that hits every subset alike (Simpson's
        paradox); too few windows left means too few samples: the judge says unknown.  A
        change is the loop's last step or the override in force being set (a revert, an
        operator's); an operator's apply that edits the split is not seen here."""
        start = window - JUDGE_WINDOWS * WINDOW_SECONDS
        changes = [self.guardrails.last_step_window(service)]
        view = self._routing_view()
        override = None if isinstance(view, str) or service not in view else view[service].override
        if override is not None:  # set by a revert or an operator, not only by the loop's steps
            changes.append(_window_of(override.created_at))
        changed = max((c for c in changes if c is not None), default=None)
        if changed is not None:
            start = min(window, max(start, changed + WINDOW_SECONDS))
        return start, window

    def _judge(self, service: str, subsets: list[str], anomaly: Anomaly | None, action: str, mode: Mode, now: float,
               window: int) -> tuple[Judgement, ...] | None:
        """The subsets judged on the last JUDGE_WINDOWS windows; None (after a held decision)
        when the store cannot be read."""
        start, end = self._judge_range(service, window)
        try:
            samples = self.samples.samples(service, subsets, start, end)
        except (StoreError, ValueError) as exc:
            self._decide(service, anomaly.anomaly_id if anomaly else "", action, "held", now, window=window, mode=mode,
                         verdict="unknown", guardrail="unknown", evidence=self._evidence(service, anomaly, window, ()),
                         reason=f"{service}: the samples to judge cannot be read ({exc}): no move")
            return None
        return judge_subsets(samples, self.spec.routing)

    # -- scaling ---------------------------------------------------------------------------

    def _scale(self, service: str, anomaly: Anomaly | None, now: float, window: int) -> None:
        mode = self.guardrails.mode_of(service)
        episode = self._scaling_episode(service)
        scaling = self.spec.scaling
        if anomaly is not None and episode is not None and now - episode.raised_at >= scaling.ttl_s:
            self.db.execute("UPDATE loop_anomalies SET dismissed = 1 WHERE anomaly_id = ?", (anomaly.anomaly_id,))
            self._scale_in(service, episode, mode, now, window,
                           f"the load anomaly is still open {now - episode.raised_at:.0f}s after the last scale-out "
                           f"(lease {scaling.ttl_s:g}s): more instances did not fix it; left to people")
            return
        if anomaly is not None and not anomaly.dismissed:
            if episode is not None:
                self.db.execute("UPDATE loop_scaling SET calm_since = NULL WHERE service = ?", (service,))
            self._scale_out(service, anomaly, episode, mode, now, window)
        elif episode is not None and anomaly is None:
            calm_since = now if episode.calm_since is None else episode.calm_since
            self.db.execute("UPDATE loop_scaling SET calm_since = ? WHERE service = ?", (calm_since, service))
            if now - calm_since >= scaling.stabilization_s:
                self._scale_in(service, episode, mode, now, window,
                               f"no load anomaly for {now - calm_since:.0f}s "
                               f"(stabilization {scaling.stabilization_s:g}s)")

    def _scale_out(self, service: str, anomaly: Anomaly, episode: ScalingEpisode | None, mode: Mode, now: float,
                   window: int) -> None:
        judged: tuple[Judgement, ...] = ()
        view = self._routing_view()
        routing = None if isinstance(view, str) else view.get(service)
        if isinstance(view, str):
            self._decide(service, anomaly.anomaly_id, "scale_out", "held", now, window=window, mode=mode,
                         verdict="unknown", guardrail="unknown", evidence=self._evidence(service, anomaly, window, ()),
                         reason=f"{service}: its subsets cannot be read from the control plane ({view}): no scaling")
            return
        live = [s for s, w in (routing.effective if routing else ()) if w > 0]
        if len(live) >= 2:  # a split: never scale out while one of its subsets fails its judgement
            found = self._judge(service, live, anomaly, "scale_out", mode, now, window)
            if found is None:
                return
            judged = found
            bad = [j for j in judged if j.verdict != "pass"]
            if bad:
                failing = bad[0].verdict == "fail"
                self._decide(service, anomaly.anomaly_id, "scale_out", "refused" if failing else "held", now,
                             window=window, mode=mode, verdict=bad[0].verdict,
                             guardrail="canary" if failing else "unknown",
                             evidence=self._evidence(service, anomaly, window, judged),
                             reason=f"{service}: not scaled out, {bad[0].reason}"
                                    + (": more instances would send more traffic to it" if failing else ""))
                return
        try:
            current = episode.instances if episode and mode == "shadow" else self.scaler.instances(service)
        except ScaleError as exc:
            self._decide(service, anomaly.anomaly_id, "scale_out", "held", now, window=window, mode=mode,
                         verdict="unknown", guardrail="unknown", evidence=self._evidence(service, anomaly, window, judged),
                         reason=f"{service}: its instances cannot be counted ({exc}): no scaling")
            return
        if current >= self.spec.scaling.max_instances:
            return  # at the cap: nothing more to do
        outcome = self._scale_step(service, anomaly, mode, now, window, "scale_out", current, current + 1,
                                   f"load anomaly (score {anomaly.score:.3g} over threshold {anomaly.threshold:.3g})",
                                   judged)
        if outcome not in ("acted", "shadowed"):
            return
        if episode is None:
            self.db.execute("INSERT INTO loop_scaling VALUES (?, ?, ?, ?, ?, NULL)",
                            (service, anomaly.anomaly_id, current, current + 1, now))
        else:
            self.db.execute("UPDATE loop_scaling SET instances = ?, raised_at = ? WHERE service = ?",
                            (current + 1, now, service))

    def _scale_in(self, service: str, episode: ScalingEpisode, mode: Mode, now: float, window: int, why: str) -> None:
        try:
            current = episode.instances if mode == "shadow" else self.scaler.instances(service)
        except ScaleError as exc:
            self._decide(service, "", "scale_in", "held", now, window=window, mode=mode, verdict="unknown",
                         guardrail="unknown", reason=f"{service}: its instances cannot be counted ({exc}): no scaling")
            return
        if current <= episode.baseline:
            self.db.execute("DELETE FROM loop_scaling WHERE service = ?", (service,))
            return
        if self._scale_step(service, None, mode, now, window, "scale_in", current, episode.baseline, why, ()) \
                in ("acted", "shadowed"):
            self.db.execute("DELETE FROM loop_scaling WHERE service = ?", (service,))

    def _scale_step(self, service: str, anomaly: Anomaly | None, mode: Mode, now: float, window: int, action: str,
                    before: int, after: int, why: str, judged: tuple[Judgement, ...]) -> Outcome:
        check = self.guardrails.check(service, now, window)
        evidence = self._evidence(service, anomaly, window, judged, check)  # the range judged, before this step
        step = _Step("scale", "scaled", f"{service} from {before} to {after} instances")
        outcome: Outcome
        if check.allowed:
            try:
                self.scaler.scale(service, after)
            except ScaleError as exc:
                outcome, why = "failed", str(exc)
            else:
                outcome = "acted"
                self.guardrails.record(service, now, window, shadow=False)
        elif check.guardrail == "mode" and mode == "shadow":
            outcome = "shadowed"
            self.guardrails.record(service, now, window, shadow=True)
        else:
            outcome, why = "refused", f"{check.detail} ({why})"
        self._decide(service, anomaly.anomaly_id if anomaly else "", action, outcome, now, window=window, mode=mode,
                     verdict="pass" if judged else "", guardrail=check.guardrail, before={"instances": before},
                     after={"instances": after}, evidence=evidence,
                     reason=step.reason(outcome, why))
        return outcome

    # -- state -----------------------------------------------------------------------------

    def _services(self) -> list[str]:
        """Services with an open anomaly the loop may act on, or an episode to finish."""
        kinds = ROUTING_KINDS + LOAD_KINDS
        return [s for (s,) in self.db.execute(
            f"SELECT service FROM loop_anomalies WHERE state = 'open' AND kind IN ({', '.join('?' * len(kinds))}) "
            "UNION SELECT service FROM loop_routing UNION SELECT service FROM loop_scaling ORDER BY 1", kinds)]

    def _claim(self, service: str, concern: str, window: int) -> bool:
        """True once per service, concern and window: the rest of the window, and a restart, skip it."""
        row = self.db.execute("SELECT window FROM loop_windows WHERE service = ? AND concern = ?",
                              (service, concern)).fetchone()
        if row is not None and row[0] >= window:
            return False
        self.db.execute("INSERT OR REPLACE INTO loop_windows VALUES (?, ?, ?)", (service, concern, window))
        return True

    def _open_anomaly(self, service: str, kinds: tuple[str, ...]) -> Anomaly | None:
        """The service's latest open anomaly of those kinds."""
        row = self.db.execute(
            "SELECT anomaly_id, service, kind, state, window, score, threshold, peak_score, windows, resolved_at, "
            f"alerted, dismissed FROM loop_anomalies WHERE state = 'open' AND service = ? AND kind IN "
            f"({', '.join('?' * len(kinds))}) ORDER BY window DESC LIMIT 1", (service, *kinds)).fetchone()
        return None if row is None else Anomaly(*row[:10], bool(row[10]), bool(row[11]))

    def _routing_episode(self, service: str) -> RoutingEpisode | None:
        row = self.db.execute("SELECT * FROM loop_routing WHERE service = ?", (service,)).fetchone()
        if row is None:
            return None
        weights = tuple((str(s), int(w)) for s, w in json.loads(row[3]).items())
        return RoutingEpisode(row[0], row[1], row[2], weights, *row[4:])

    def _scaling_episode(self, service: str) -> ScalingEpisode | None:
        row = self.db.execute("SELECT * FROM loop_scaling WHERE service = ?", (service,)).fetchone()
        return None if row is None else ScalingEpisode(*row)

    def _set_routing_weights(self, service: str, weights: dict[str, int], declared: dict[str, int]) -> None:
        if weights == declared:
            self.db.execute("DELETE FROM loop_routing WHERE service = ?", (service,))
        else:
            self.db.execute("UPDATE loop_routing SET weights = ? WHERE service = ?", (json.dumps(weights), service))

    def _set_scaling_instances(self, service: str, instances: int) -> None:
        self.db.execute("DELETE FROM loop_scaling WHERE service = ? AND baseline >= ?", (service, instances))
        self.db.execute("UPDATE loop_scaling SET instances = ? WHERE service = ?", (instances, service))

    def _routing_view(self) -> dict[str, ServiceRouting] | str:
        """The control plane's routing, read once per tick; a string says why it is missing."""
        if self._view is None:
            try:
                self._view = {r.service: r for r in self.overrides.routing()}
            except OverrideError as exc:
                self._view = str(exc)
        return self._view

    def _routing_of(self, service: str) -> ServiceRouting:
        """The service's routing now (for a revert); OverrideError when unknown."""
        self._view = None
        view = self._routing_view()
        if isinstance(view, str):
            raise OverrideError(view)
        if service not in view:
            raise OverrideError(f"the control plane routes no service {service!r} any more")
        return view[service]

    # -- alerts and decisions --------------------------------------------------------------

    def _firing(self, key: str) -> bool:
        return self.db.execute("SELECT 1 FROM loop_alerts WHERE key = ?", (key,)).fetchone() is not None

    def _fire(self, key: str, service: str, kind: str, severity: str, summary: str, now: float,
              details: tuple[tuple[str, str], ...] = ()) -> None:
        self.db.execute("INSERT OR IGNORE INTO loop_alerts VALUES (?, ?, ?)", (key, service, now))
        self.alert(Alert(key=key, service=service, kind=kind, severity=severity, summary=summary, firing=True, at=now,
                         details=details))

    def _resolve(self, key: str, service: str, kind: str, summary: str, now: float) -> None:
        self.db.execute("DELETE FROM loop_alerts WHERE key = ?", (key,))
        self.alert(Alert(key=key, service=service, kind=kind, severity="info", summary=summary, firing=False, at=now))

    def _evidence(self, service: str, anomaly: Anomaly | None, window: int, judged: Sequence[Judgement],
                  check: Check | None = None) -> dict[str, Any]:
        start, end = self._judge_range(service, window)
        return {"anomaly": _anomaly_json(anomaly) if anomaly else None,
                "range": {"start_s": start, "end_s": end},
                "judgements": [j.to_json() for j in judged],
                "routing": asdict(self.spec.routing), "scaling": asdict(self.spec.scaling),
                "guardrail": check.to_json() if check else None}

    def _decide(self, service: str, anomaly_id: str, action: str, outcome: Outcome, now: float, *,
                reason: str, window: int | None = None, mode: str | None = None, verdict: str = "",
                guardrail: str = "", before: dict | None = None, after: dict | None = None, override_id: str = "",
                evidence: dict[str, Any] | None = None, by: str = ACTIONS) -> ActionDecision:
        """Keep and emit one decision."""
        doc = {"window": window, **(evidence or {})}
        decision = ActionDecision(
            v=VERSION, event_id=uuid.uuid4().hex, time_us=int(now * 1_000_000), service=service,
            anomaly_id=anomaly_id, action=action, outcome=outcome, verdict=verdict, guardrail=guardrail,
            mode=mode or (self.spec.mode if service == MESH else self.guardrails.mode_of(service)),
            before=json.dumps(before) if before else "", after=json.dumps(after) if after else "",
            override_id=override_id, evidence=json.dumps(doc, allow_nan=False, default=str), reason=reason, by=by)
        self.db.execute("INSERT INTO loop_decisions (event_id, service, event) VALUES (?, ?, ?)",
                        (decision.event_id, service, json.dumps(decision.to_event())))
        self.db.execute("DELETE FROM loop_decisions WHERE seq <= (SELECT max(seq) FROM loop_decisions) - ?",
                        (KEPT_DECISIONS,))
        self.emit(decision)
        return decision


def _anomaly_json(anomaly: Anomaly) -> dict[str, Any]:
    return {"id": anomaly.anomaly_id, "kind": anomaly.kind, "window": anomaly.window, "score": anomaly.score,
            "threshold": anomaly.threshold, "peak_score": anomaly.peak_score, "windows": anomaly.windows}
