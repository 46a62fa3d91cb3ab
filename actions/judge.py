"""The canary judge: the second key that must confirm an anomaly before traffic moves.

The detector says a *service* looks wrong; it does not say which subset is to blame, nor
whether moving weight would help.  So, as Netflix's Kayenta judges a canary against its
baseline (https://github.com/spinnaker/kayenta: a Mann-Whitney U test per metric with an
effect-size check), each subset's requests are compared with the other subsets' requests
*in the same windows*:

- latency: a one-sided Mann-Whitney U test (is this subset's latency stochastically
  greater?) and, so that a tiny but significant difference moves nothing, an effect-size
  floor: its median at least ``latency_ratio`` times the others';
- errors (5xx and resets): a one-sided two-proportion z test and a floor: its error rate
  at least ``error_rate_delta`` above the others'.

A subset **fails** when either metric is significantly worse (``p_value``) *and* past its
floor; it **passes** otherwise; the verdict is **unknown** when either side has fewer than
``min_samples`` requests (too little traffic to tell).  With more than two subsets each is
judged against the pooled others.  A fault that hits every subset alike makes none worse
than the rest: every subset passes, and the loop reads that as mesh-wide.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from scipy.stats import mannwhitneyu, norm

from actions.samples import SubsetSample
from core.loopspec import RoutingSpec

Verdict = Literal["pass", "fail", "unknown"]
_MIN_MEDIAN_MS = 0.001  # duration_us's resolution: a median ratio never divides by zero


@dataclass(frozen=True)
class Evidence:
    """The figures of one comparison (None: not computed, for want of samples)."""

    n_canary: int
    n_baseline: int
    median_canary_ms: float | None = None
    median_baseline_ms: float | None = None
    u_statistic: float | None = None
    p_latency: float | None = None  # one-sided: the canary is slower
    median_ratio: float | None = None
    error_rate_canary: float | None = None
    error_rate_baseline: float | None = None
    z_errors: float | None = None
    p_errors: float | None = None  # one-sided: the canary fails more


@dataclass(frozen=True)
class Judgement:
    subset: str
    baseline: str  # the subset it was compared with, or the others pooled: "v1+v3"
    verdict: Verdict
    reason: str  # one line a person reads
    evidence: Evidence

    def to_json(self) -> dict[str, Any]:
        return {"subset": self.subset, "baseline": self.baseline, "verdict": self.verdict,
                "reason": self.reason, **asdict(self.evidence)}


def judge(canary: SubsetSample, baseline: SubsetSample, spec: RoutingSpec) -> Judgement:
    """Is ``canary`` worse than ``baseline`` (see the module's doc)?"""
    n_c, n_b = canary.requests, baseline.requests
    if n_c < spec.min_samples or n_b < spec.min_samples:
        return Judgement(canary.subset, baseline.subset, "unknown",
                         f"too little traffic to judge: {n_c} requests to {canary.subset}, {n_b} to "
                         f"{baseline.subset} (at least {spec.min_samples} each)", Evidence(n_c, n_b))
    med_c, med_b = float(np.median(canary.latencies_ms)), float(np.median(baseline.latencies_ms))
    u, p_latency = mannwhitneyu(canary.latencies_ms, baseline.latencies_ms, alternative="greater")
    ratio = med_c / max(med_b, _MIN_MEDIAN_MS)
    rate_c, rate_b = canary.errors / n_c, baseline.errors / n_b
    z, p_errors = _two_proportions(canary.errors, n_c, baseline.errors, n_b)
    evidence = Evidence(n_c, n_b, med_c, med_b, float(u), float(p_latency), ratio, rate_c, rate_b, z, p_errors)
    slower = p_latency < spec.p_value and ratio >= spec.latency_ratio
    failing = p_errors < spec.p_value and rate_c - rate_b >= spec.error_rate_delta
    if not (slower or failing):
        return Judgement(canary.subset, baseline.subset, "pass",
                         f"{canary.subset} is not worse than {baseline.subset}: median {med_c:.1f} ms vs "
                         f"{med_b:.1f} ms (p={p_latency:.2g}), errors {rate_c:.1%} vs {rate_b:.1%} (p={p_errors:.2g})",
                         evidence)
    why = []
    if slower:
        why.append(f"slower (median {med_c:.1f} ms vs {med_b:.1f} ms, x{ratio:.2f} >= x{spec.latency_ratio:g}, "
                   f"Mann-Whitney U={float(u):.0f}, p={p_latency:.2g})")
    if failing:
        why.append(f"failing more (errors {rate_c:.1%} vs {rate_b:.1%}, +{rate_c - rate_b:.1%} >= "
                   f"+{spec.error_rate_delta:.1%}, z={z:.2f}, p={p_errors:.2g})")
    return Judgement(canary.subset, baseline.subset, "fail",
                     f"{canary.subset} is {' and '.join(why)} than {baseline.subset}", evidence)


def judge_subsets(samples: Sequence[SubsetSample], spec: RoutingSpec) -> tuple[Judgement, ...]:
    """Each subset judged against the others pooled (with two subsets: against the other)."""
    return tuple(judge(s, pooled([o for o in samples if o is not s]), spec) for s in samples)


def pooled(samples: Sequence[SubsetSample]) -> SubsetSample:
    """Several subsets' requests as one sample, named "a+b"."""
    latencies = [s.latencies_ms for s in samples]
    return SubsetSample(subset="+".join(s.subset for s in samples),
                        latencies_ms=np.concatenate(latencies) if latencies else np.empty(0),
                        requests=sum(s.requests for s in samples), errors=sum(s.errors for s in samples))


def _two_proportions(errors_c: int, n_c: int, errors_b: int, n_b: int) -> tuple[float, float]:
    """(z, one-sided p) of "the canary's error rate is greater", with the pooled rate's standard error."""
    rate = (errors_c + errors_b) / (n_c + n_b)
    se = math.sqrt(rate * (1 - rate) * (1 / n_c + 1 / n_b))
    if se == 0.0:  # no errors anywhere, or only errors: no difference to find
        return 0.0, 1.0
    z = (errors_c / n_c - errors_b / n_b) / se
    return z, float(norm.sf(z))
