"""The recording of the real demo mesh in tests/data/scenarios/ (made by `greymesh ml record`):
its phases, and a model trained on its training phase as `greymesh ml train` would."""

from __future__ import annotations

from pathlib import Path

from core.contracts import WINDOW_SECONDS
from greymesh.scenarios import Phase, load_phases
from ml.eval import read_recording
from ml.features import ServiceSeries, series_by_service
from ml.model import MeshModel, train

DATA = Path(__file__).resolve().parents[1] / "data" / "scenarios"


def phases() -> list[Phase]:
    return load_phases(DATA / "phases.jsonl")


def trained(detector: str) -> tuple[MeshModel, dict[str, ServiceSeries]]:
    """A ``detector`` model of every service, fitted on the windows of the training phase
    only, and every service's whole series (to score)."""
    train_end = next(p.end for p in phases() if p.name == "train")
    series = series_by_service(read_recording(DATA / "recording.csv")[0])
    training = {name: ServiceSeries(name, s.start, s.raw[s.windows + WINDOW_SECONDS <= train_end])
                for name, s in series.items()}
    model = train(training, detector, since=min(s.start for s in series.values()), until=int(train_end),
                  progress=lambda _: None)
    return model, series
