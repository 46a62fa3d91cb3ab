"""A trained model of the mesh: per service, its normaliser and its fitted detector.

:func:`train` fits one :class:`ServiceModel` per service from that service's gap-filled
training series (ml.features); the detector is the same kind for every service, its
threshold and normal statistics are the service's own.  :class:`MeshModel` is what the
registry stores as one version and what the scorer loads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ml import explain
from ml.detectors import Detector, make
from ml.features import NAMES, Normaliser, ServiceSeries, series_by_service
from core.contracts import WINDOW_SECONDS
from ml.windows import WindowSource

_RATE = NAMES.index("request_rate")


@dataclass
class ServiceModel:
    service: str
    normaliser: Normaliser
    detector: Detector

    def score(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores and per-feature contributions of consecutive raw windows (oldest first)."""
        X = self.normaliser.transform(raw)
        return self.detector.score_samples(X), self.detector.contributions(X)

    def explain(self, raw_row: np.ndarray, contributions_row: np.ndarray) -> tuple[str, list[explain.Cause]]:
        found = explain.causes(contributions_row, raw_row, self.normaliser.raw_median)
        return explain.sentence(self.service, found), found


@dataclass
class MeshModel:
    detector: str
    params: dict[str, Any]
    since: int  # training range, Unix seconds [since, until)
    until: int
    services: dict[str, ServiceModel] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # service -> why it has no model


def train(series: Mapping[str, ServiceSeries], detector: str, params: Mapping[str, Any] | None = None, *,
          since: int, until: int, min_requests: float = 1.0,
          progress: Callable[[str], None] = print) -> MeshModel:
    """Fit a detector per service; a service without enough traffic is skipped, with the reason."""
    model = MeshModel(detector, dict(params or {}), since, until)
    for i, (name, s) in enumerate(sorted(series.items()), 1):
        s = _without_first_traffic(s)
        busy = s.raw[:, _RATE] * WINDOW_SECONDS >= min_requests  # windows with traffic
        if busy.sum() < len(s.raw) / 2:
            model.skipped[name] = f"traffic in only {int(busy.sum())} of {len(s.raw)} windows"
            progress(f"  [{i}/{len(series)}] {name}: skipped ({model.skipped[name]})")
            continue
        try:
            normaliser = Normaliser.fit(s.raw)
            det = make(detector, **(params or {})).fit(normaliser.transform(s.raw))
        except ValueError as exc:
            model.skipped[name] = str(exc)
            progress(f"  [{i}/{len(series)}] {name}: skipped ({exc})")
            continue
        model.services[name] = ServiceModel(name, normaliser, det)
        progress(f"  [{i}/{len(series)}] {name}: {len(s.raw)} windows, threshold {det.threshold_:.4g}")
    return model


def _without_first_traffic(s: ServiceSeries) -> ServiceSeries:
    """The series after its first window with traffic.  That window is where the store's
    record of the service begins, and is usually where the service (or the mesh) started:
    partly empty, with the 5xx of sidecars not yet ready.  Learnt from, it is also scored
    when cross-validating, and its score then sets the threshold far above any fault."""
    busy = np.flatnonzero(s.raw[:, _RATE] > 0)
    if not len(busy):
        return s
    cut = int(busy[0]) + 1
    return ServiceSeries(s.service, s.start + cut * WINDOW_SECONDS, s.raw[cut:])


class TrainingError(Exception):
    """Nothing could be trained; the message says what was missing and what to do."""


def train_from(source: WindowSource, detector: str, params: Mapping[str, Any] | None = None, *, since: int,
               until: int, progress: Callable[[str], None] = print) -> MeshModel:
    """Read the windows in [since, until) from the store and train on them.  ``until``
    should be a closed window (ml.windows.closed_until): the one still filling would
    teach the model that a sudden drop in traffic is normal."""
    rows = source.fetch(since, until)
    series = series_by_service(rows, until=until)
    if not series:
        raise TrainingError(f"no windows in the store between {since} and {until} (Unix seconds): let the mesh "
                            "serve traffic for a while (20 minutes or more), or widen the range")
    progress(f"training {detector} for {len(series)} services ({len(rows)} windows)")
    model = train(series, detector, params, since=since, until=until, progress=progress)
    if not model.services:
        raise TrainingError("no service had enough traffic to train on: "
                            + "; ".join(f"{k}: {v}" for k, v in model.skipped.items()))
    return model
