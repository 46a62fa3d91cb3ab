"""An hour of the real demo mesh's normal traffic (tests/data/scenarios/, the recording's
hold-out hour) through the whole decision path: a PCA model trained on the recording's
training windows scores every window, the scorer's hysteresis turns scores into anomaly
events, and those events drive the actions loop and the notifier, ticked every second of
the hour as the actions process ticks them.  Nothing may be decided and nothing may page.

The same path over the recording's fault phases must raise alerts, so that a path broken
anywhere (no events, no alerts) cannot pass as quiet."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from actions.alerts import Notifier
from actions.loop import Loop, LoopHealth
from actions.model import Alert
from actions.outbox import Outbox
from actions.samples import SubsetSample
from actions.scaling import ScaleError
from actions.service import handle
from core.contracts import WINDOW_SECONDS, ActionDecision, AnomalyEvent, Override, ServiceRouting
from core.loopspec import ActionsSpec, AlertRoute, AlertsSpec, Receiver, SecretRef, SlackReceiver
from greymesh.scenarios import Phase
from ml.features import NAMES, ServiceSeries
from ml.model import MeshModel
from ml.scorer import Tracker
from tests.support.recording import phases as recording_phases
from tests.support.recording import trained
HEALTHY = LoopHealth(store_ok=True, scorer_ok=True, kafka_ok=True)


class SplitOverrides:
    """Every service of the recording split v1/v2 50/50 (the loop may move any of them)."""

    def __init__(self, services: list[str]):
        self.services, self.puts = services, []

    def routing(self) -> list[ServiceRouting]:
        return [ServiceRouting(service=s, subsets=("v1", "v2"), instances=(("v1", 1), ("v2", 1)), callers=("x",),
                               declared=(("v1", 50), ("v2", 50)), effective=(("v1", 50), ("v2", 50)), override=None)
                for s in self.services]

    def put(self, override: Override) -> None:
        self.puts.append(override)

    def clear(self, service: str) -> None:
        pass


class SlowSubset:
    """v2 clearly slower: should the loop ever judge, it would move."""

    def samples(self, service: str, subsets: list[str], start_s: int, end_s: int) -> list[SubsetSample]:
        rng = np.random.default_rng(start_s)
        return [SubsetSample(s, rng.lognormal(np.log(80.0 if s == "v2" else 20.0), 0.2, 200), 200, 0)
                for s in subsets]


class CountingScaler:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def instances(self, service: str) -> int:
        return 1

    def scale(self, service: str, count: int) -> None:
        self.calls.append((service, count))
        raise ScaleError("not in this test")


@pytest.fixture(scope="module")
def recording() -> tuple[MeshModel, dict[str, ServiceSeries], list[Phase]]:
    return (*trained("pca"), recording_phases())


def anomaly_events(model: MeshModel, series: dict[str, ServiceSeries], since: int, until: int) -> list[AnomalyEvent]:
    """The scorer's events for windows in [since, until), each service's model and hysteresis."""
    events = []
    for name, s in series.items():
        sm = model.services[name]
        scores, parts = sm.score(s.raw)
        tracker = Tracker(name)
        for i, (window, score) in enumerate(zip(s.windows, scores)):
            if not since <= window < until:
                continue
            change = tracker.step(int(window), float(score), sm.detector.threshold_)
            if change is None:
                continue
            state, opened = change
            causes = [{"feature": NAMES[int(np.argmax(parts[i]))], "share": 1.0, "value": 0.0, "normal": 0.0}]
            events.append(AnomalyEvent(v=1, event_id=f"{opened.anomaly_id}-{state}", time_us=int(window) * 1_000_000,
                                       service=name, anomaly_id=opened.anomaly_id, state=state, window=int(window),
                                       score=float(score), threshold=float(sm.detector.threshold_),
                                       peak_score=float(opened.peak), windows=opened.windows,
                                       explanation=f"{name} replayed", causes=json.dumps(causes), detector="pca",
                                       model_version="replay"))
    return sorted(events, key=lambda e: e.window)


def run_loop(events: list[AnomalyEvent], since: int, until: int, services: list[str]
             ) -> tuple[list[ActionDecision], Outbox, SplitOverrides, CountingScaler]:
    """The actions process's rounds over [since, until): events delivered as their window
    closes, the loop and the notifier ticked every second."""
    db = sqlite3.connect(":memory:")
    spec = AlertsSpec(receivers=(Receiver("chat", slack=SlackReceiver(SecretRef(env="UNUSED"))),),
                      routes=(AlertRoute(receivers=("chat",)),))
    notifier = Notifier(db, spec)
    decisions: list[ActionDecision] = []
    overrides, scaler = SplitOverrides(services), CountingScaler()

    def alert(a: Alert) -> None:
        notifier.fire(a, a.at)

    loop = Loop(db, ActionsSpec(mode="on"), SlowSubset(), overrides, scaler, decisions.append, alert,
                notifier.inhibit)
    pending = list(events)
    for now in range(since, until):
        while pending and pending[0].window + WINDOW_SECONDS <= now:
            event = pending.pop(0)
            handle(event, loop, notifier, float(now))
        loop.tick(float(now), HEALTHY)
        notifier.tick(float(now))
        db.commit()
    return decisions, Outbox(db), overrides, scaler


def test_an_hour_of_normal_traffic_makes_no_decision_and_pages_nobody(recording) -> None:
    model, series, phases = recording
    holdout = phases[-1]
    assert holdout.name == "holdout"
    start = (int(holdout.start) // WINDOW_SECONDS + 1) * WINDOW_SECONDS
    end = int(holdout.end) // WINDOW_SECONDS * WINDOW_SECONDS
    assert (end - start) / 3600 >= 0.99
    events = anomaly_events(model, series, start, end)
    decisions, outbox, overrides, scaler = run_loop(events, start, end + 60, sorted(series))
    assert events == []
    assert [d.reason for d in decisions] == []
    assert outbox.messages() == [] and overrides.puts == [] and scaler.calls == []


def test_the_same_path_over_the_fault_phases_raises_alerts(recording) -> None:
    model, series, phases = recording
    faults = [p for p in phases if p.name not in ("train", "holdout")]
    start = int(faults[0].start) // WINDOW_SECONDS * WINDOW_SECONDS - 6 * WINDOW_SECONDS
    end = int(faults[-1].end) // WINDOW_SECONDS * WINDOW_SECONDS
    events = anomaly_events(model, series, start, end)
    assert any(e.state == "open" for e in events)
    decisions, outbox, _, _ = run_loop(events, start, end, sorted(series))
    assert outbox.messages("chat"), "anomalies during the faults raised no notification"
    assert decisions, "anomalies during the faults reached no decision"
