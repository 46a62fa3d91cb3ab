"""The recurrent autoencoder on a recording of the real demo mesh (tests/data/scenarios/).

The recording was made by `greymesh ml record` (greymesh/scenarios.py): 20 minutes of normal
traffic to train on, six faults of 2 minutes each with 1.5 minutes of recovery after
each, then an hour of normal traffic.  Here the product's own path is replayed over it:
`ml.model.train` on the training windows, then every later window scored in order and
fed through the scorer's hysteresis, as `greymesh ml score` does live.
"""

from __future__ import annotations

import numpy as np
import pytest

from core.contracts import WINDOW_SECONDS
from greymesh.scenarios import Phase
from ml.eval import load_recording
from ml.features import ServiceSeries
from ml.model import MeshModel
from ml.scorer import Tracker
from tests.support.recording import DATA, trained
from tests.support.recording import phases as recording_phases


@pytest.fixture(scope="module")
def phases() -> list[Phase]:
    return recording_phases()


@pytest.fixture(scope="module")
def recording() -> tuple[MeshModel, dict[str, ServiceSeries]]:
    return trained("gru_ae")


def replay(model: MeshModel, s: ServiceSeries, since: float, until: float) -> list[tuple[int, str]]:
    """Score the whole series in order and run the windows in [since, until) through a
    fresh hysteresis tracker; the (window, "open"/"resolved") changes it made."""
    sm = model.services[s.service]
    scores, _ = sm.score(s.raw)
    tracker = Tracker(s.service)
    changes = []
    for window, score in zip(s.windows, scores):
        if since <= window < until and (change := tracker.step(int(window), float(score), sm.detector.threshold_)):
            changes.append((int(window), change[0]))
    return changes


def test_the_recording_holds_what_its_docstring_says(phases: list[Phase]) -> None:
    names = [p.name for p in phases]
    assert names[0] == "train" and names[-1] == "holdout"
    assert {"latency", "error_burst", "outage", "spike", "recon", "exfiltration"} <= set(names)
    assert phases[-1].end - phases[-1].start >= 3600
    assert phases[0].end - phases[0].start >= 1200


def test_a_latency_fault_on_payments_is_detected_within_3_windows(recording, phases: list[Phase]) -> None:
    model, series = recording
    fault = next(p for p in phases if p.name == "latency")
    first_window = int(fault.start) // WINDOW_SECONDS * WINDOW_SECONDS
    changes = replay(model, series["payments"], first_window - 6 * WINDOW_SECONDS, fault.end)
    opened = [w for w, what in changes if what == "open"]
    assert opened, f"no anomaly opened on payments during the latency fault ({changes})"
    assert first_window <= opened[0] <= first_window + 2 * WINDOW_SECONDS, (opened, first_window)


def test_an_hour_of_normal_traffic_raises_no_anomaly(recording, phases) -> None:
    model, series = recording
    holdout = phases[-1]
    assert holdout.name == "holdout"
    # Windows that start inside the hold-out hour; the first scored ones see the recovery before
    # them as context, as they would live.
    start = (int(holdout.start) // WINDOW_SECONDS + 1) * WINDOW_SECONDS
    end = int(holdout.end) // WINDOW_SECONDS * WINDOW_SECONDS
    assert (end - start) / 3600 >= 0.99
    for name, s in series.items():
        assert replay(model, s, start, end) == [], name


def test_the_eval_loader_reads_the_recording_per_service(phases: list[Phase]) -> None:
    data = load_recording(DATA / "recording.csv")
    assert {d.name for d in data} == {"frontend", "orders", "payments", "inventory"}
    for d in data:
        assert len(d.train) >= 110 and len(d.test) >= 360 + 6 * 12
        assert d.labels.sum() > 0 and set(np.unique(d.labels)) == {0, 1}
