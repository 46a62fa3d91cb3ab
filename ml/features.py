"""Per-service feature vectors from the 10-second roll-ups, and their normalisation.

A roll-up row (ml/windows.py) becomes a vector of :data:`FEATURES`: rates and ratios
rather than raw counts, so a service's errors read the same at 10 rps and at 1,000 rps.
Heavy-tailed quantities (rates, latencies, sizes, caller counts) are modelled on a log
scale (``log1p``): a latency going from 2 ms to 20 ms is as large a step as 20 to 200.

:class:`Normaliser` learns each feature's median and spread from one service's training
windows and is stored with that service's model, so scoring uses exactly the statistics
the detector was trained with.  The spread is a robust one (interquartile range) with a
floor per feature: a feature that never moved in training (a 5xx ratio of 0.000) would
otherwise turn the first error into an infinite deviation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from core.contracts import WINDOW_SECONDS
from ml.windows import Window


@dataclass(frozen=True)
class Feature:
    name: str
    label: str  # how a person reads it: "p99 latency"
    unit: str  # "ms", "rps", "B", "" (a ratio or a count)
    log: bool  # modelled as log1p(value)
    floor: float  # smallest spread used when normalising (in model space)


FEATURES: tuple[Feature, ...] = (
    Feature("request_rate", "request rate", "rps", True, 0.1),
    Feature("error_4xx_ratio", "4xx ratio", "", False, 0.01),
    Feature("error_5xx_ratio", "5xx ratio", "", False, 0.01),
    Feature("reset_ratio", "reset ratio", "", False, 0.01),
    Feature("latency_p50_ms", "p50 latency", "ms", True, 0.1),
    Feature("latency_p95_ms", "p95 latency", "ms", True, 0.1),
    Feature("latency_p99_ms", "p99 latency", "ms", True, 0.1),
    Feature("request_bytes", "request size", "B", True, 0.1),
    Feature("response_bytes", "response size", "B", True, 0.1),
    Feature("distinct_callers", "distinct callers", "", True, 0.1),
    Feature("authz_denial_ratio", "authz denial ratio", "", False, 0.01),
)
NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
_LOG = np.array([f.log for f in FEATURES])
_FLOOR = np.array([f.floor for f in FEATURES])


def raw_features(values: Mapping[str, float]) -> np.ndarray:
    """One roll-up row (ml.windows.ROLLUP_FIELDS -> value) as a vector of FEATURES, in their units."""
    n = values["requests"]
    per = 1.0 / n if n > 0 else 0.0
    return np.array([
        n / WINDOW_SECONDS,
        values["errors_4xx"] * per,
        values["errors_5xx"] * per,
        values["resets"] * per,
        values["latency_p50_ms"],
        values["latency_p95_ms"],
        values["latency_p99_ms"],
        values["bytes_in"] * per,
        values["bytes_out"] * per,
        values["distinct_callers"],
        values["authz_denials"] * per,
    ], dtype=np.float64)


def model_space(raw: np.ndarray, log: np.ndarray = _LOG) -> np.ndarray:
    """Raw feature values (n, features) -> the scale detectors see (log1p where ``log``)."""
    out = np.array(raw, dtype=np.float64, copy=True)
    out[:, log] = np.log1p(np.maximum(out[:, log], 0.0))
    return out


@dataclass(frozen=True)
class ServiceSeries:
    """One service's windows on a gap-free 10 s grid: ``raw[i]`` is the window ``start + 10*i``.

    A window with no row in the store had no requests: its rate is 0, and so is every
    other feature (no requests, no latency to speak of)."""

    service: str
    start: int
    raw: np.ndarray  # (n, len(FEATURES)), raw units

    @property
    def windows(self) -> np.ndarray:
        return self.start + WINDOW_SECONDS * np.arange(len(self.raw))


def series_by_service(rows: Iterable[Window], since: int | None = None,
                      until: int | None = None) -> dict[str, ServiceSeries]:
    """Group roll-up rows into one gap-filled series per service over [since, until)
    (by default from the service's first window to the last window seen)."""
    grouped: dict[str, dict[int, np.ndarray]] = {}
    for w in rows:
        grouped.setdefault(w.service, {})[w.window] = raw_features(w.values)
    out: dict[str, ServiceSeries] = {}
    for service, by_window in grouped.items():
        first = since if since is not None else min(by_window)
        last = until if until is not None else max(by_window) + WINDOW_SECONDS
        first -= first % WINDOW_SECONDS
        n = max(0, (last - first + WINDOW_SECONDS - 1) // WINDOW_SECONDS)
        raw = np.zeros((n, len(FEATURES)))
        for window, vec in by_window.items():
            i = (window - first) // WINDOW_SECONDS
            if 0 <= i < n:
                raw[i] = vec
        out[service] = ServiceSeries(service, first, raw)
    return out


@dataclass(frozen=True)
class Normaliser:
    """Per-feature robust centring and scaling, learned from one service's normal windows.

    ``log`` and ``floor`` default to :data:`FEATURES`' own; ml.eval passes others for a
    CSV's arbitrary columns (no log scale, a tiny floor)."""

    median: np.ndarray  # model space
    scale: np.ndarray  # model space, >= the feature's floor
    raw_median: np.ndarray  # raw units, for explanations ("7.9x its normal")
    log: np.ndarray = field(default_factory=lambda: _LOG.copy())  # which features are log1p'd

    @classmethod
    def fit(cls, raw: np.ndarray, log: np.ndarray = _LOG, floor: np.ndarray = _FLOOR) -> Normaliser:
        if len(raw) < 2:
            raise ValueError(f"need at least 2 windows to learn what normal is, got {len(raw)}")
        m = model_space(raw, log)
        q25, q50, q75 = np.percentile(m, [25, 50, 75], axis=0)
        return cls(median=q50, scale=np.maximum((q75 - q25) / 1.349, floor), raw_median=np.median(raw, axis=0),
                   log=np.asarray(log, dtype=bool))

    def transform(self, raw: np.ndarray) -> np.ndarray:
        return (model_space(raw, self.log) - self.median) / self.scale

    def to_dict(self) -> dict[str, list]:
        return {"median": self.median.tolist(), "scale": self.scale.tolist(), "raw_median": self.raw_median.tolist(),
                "log": self.log.tolist()}

    @classmethod
    def from_dict(cls, doc: Mapping[str, list]) -> Normaliser:
        arrays = {k: np.asarray(doc[k], dtype=np.float64) for k in ("median", "scale", "raw_median")}
        log = np.asarray(doc.get("log", _LOG), dtype=bool)
        if any(a.shape != (len(FEATURES),) for a in (*arrays.values(), log)):
            raise ValueError(f"normaliser has {[a.shape for a in arrays.values()]} values, expected "
                             f"{len(FEATURES)} per statistic")
        return cls(**arrays, log=log)
