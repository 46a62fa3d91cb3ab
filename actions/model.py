"""The actions stage's own vocabulary, shared by its modules: alerts and anomaly kinds."""

from __future__ import annotations

import json
from dataclasses import dataclass

from core.contracts import AnomalyEvent
from core.loopspec import Severity

SUMMARY_LIMIT = 1024  # PagerDuty Events v2 truncates a longer summary

# An anomaly's kind, from the feature that weighs most in its explanation: one incident per
# service and kind (PagerDuty's dedup_key), and what the loop may do about it.
KIND_OF_FEATURE = {
    "latency_p50_ms": "latency", "latency_p95_ms": "latency", "latency_p99_ms": "latency",
    "error_5xx_ratio": "errors", "reset_ratio": "errors", "error_4xx_ratio": "client_errors",
    "request_rate": "load", "request_bytes": "load", "response_bytes": "load",
    "distinct_callers": "callers", "authz_denial_ratio": "authz",
}


def anomaly_kind(event: AnomalyEvent) -> str:
    """latency, errors, client_errors, load, callers, authz, or "other" (causes missing or unknown)."""
    try:
        causes = json.loads(event.causes or "[]")
        top = max(causes, key=lambda c: float(c.get("share", 0.0)))
    except (ValueError, TypeError, AttributeError):
        return "other"
    return KIND_OF_FEATURE.get(str(top.get("feature", "")), "other")


@dataclass(frozen=True)
class Alert:
    """Something a person should know, firing or resolved.  ``key`` is stable for one
    episode of one kind on one service (PagerDuty's dedup_key): a re-fire with the same key
    updates the same incident."""

    key: str  # f"{service}/{kind}", e.g. "payments/latency", "mesh/loop_blind"
    service: str
    kind: str
    severity: Severity
    summary: str  # cut to SUMMARY_LIMIT characters when sent
    firing: bool  # False: resolved
    at: float  # Unix seconds
    details: tuple[tuple[str, str], ...] = ()  # PagerDuty custom_details, Slack fields
    links: tuple[tuple[str, str], ...] = ()  # (text, href) to the evidence
    source: str = "greymesh"
