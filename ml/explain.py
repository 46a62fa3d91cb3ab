"""Explanations a person reads: which features make up an anomaly, against their normal.

"payments p99 latency 7.9x its normal (251 ms vs 31.8 ms), 5xx ratio 0.31 vs 0.00":
the features are those with the largest share of the detector's score
(``Detector.contributions``), in decreasing order, until ``coverage`` of the score is
named (at most ``top``).  Log-scale features (rates, latencies, sizes) are stated as a
multiple of their training median; ratios as the value against the median.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ml.features import FEATURES, Feature


@dataclass(frozen=True)
class Cause:
    feature: str
    share: float  # of the score, 0..1
    value: float  # raw units
    normal: float  # the training median, raw units

    def words(self) -> str:
        f = _BY_NAME[self.feature]
        if not f.log:
            return f"{f.label} {self.value:.2f} vs {self.normal:.2f}"
        now, usual = _amount(self.value, f), _amount(self.normal, f)
        if self.normal <= 0:
            return f"{f.label} {now} (normally none)"
        return f"{f.label} {self.value / self.normal:.1f}x its normal ({now} vs {usual})"


_BY_NAME: dict[str, Feature] = {f.name: f for f in FEATURES}


def _amount(value: float, f: Feature) -> str:
    if f.unit == "B":
        for unit, size in (("MB", 1e6), ("kB", 1e3)):
            if value >= size:
                return f"{value / size:.3g} {unit}"
        return f"{value:.0f} B"
    text = f"{value:.3g}"
    return f"{text} {f.unit}".rstrip()


def causes(contributions: np.ndarray, raw: np.ndarray, normal: np.ndarray, *, top: int = 3,
           coverage: float = 0.8) -> list[Cause]:
    """The features that make up one window's score (contributions of that window, its raw
    feature vector and the service's raw training medians)."""
    order = np.argsort(-contributions, kind="stable")
    out: list[Cause] = []
    covered = 0.0
    for i in order[:top]:
        out.append(Cause(FEATURES[i].name, float(contributions[i]), float(raw[i]), float(normal[i])))
        covered += float(contributions[i])
        if covered >= coverage:
            break
    return out


def sentence(service: str, found: list[Cause]) -> str:
    return f"{service} " + ", ".join(c.words() for c in found)
