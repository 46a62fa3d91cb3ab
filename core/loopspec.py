"""The `alerts:` and `actions:` sections of mesh.yaml: who is told, and what the loop may do.

They are a contract between the control plane, which validates them with the rest of a
spec (a refused section refuses the whole spec, so the running one stays), and the actions
stage, which reads them from the applied spec.  Secrets (a Slack webhook URL, a PagerDuty
routing key) are never written in the spec: a receiver names the file or the environment
variable that holds one (:class:`SecretRef`), read only by the actions process.

Defaults follow Alertmanager (grouping) and the Kubernetes HPA (scale-in stabilization);
docs/actions.md explains each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["off", "shadow", "on"]
MODES: tuple[Mode, ...] = ("off", "shadow", "on")
Severity = Literal["critical", "error", "warning", "info"]  # PagerDuty Events v2's severities
SEVERITIES: tuple[Severity, ...] = ("critical", "error", "warning", "info")


@dataclass(frozen=True)
class SecretRef:
    """Where a receiver's secret is: exactly one of a file (0600) or an environment variable."""

    file: str | None = None
    env: str | None = None


@dataclass(frozen=True)
class SlackReceiver:
    """A Slack incoming webhook (https://hooks.slack.com/services/...)."""

    webhook_url: SecretRef


@dataclass(frozen=True)
class PagerDutyReceiver:
    """PagerDuty Events API v2: triggers/resolves to ``url``, change events to ``change_url``."""

    routing_key: SecretRef
    url: str = "https://events.pagerduty.com/v2/enqueue"
    change_url: str = "https://events.pagerduty.com/v2/change/enqueue"


@dataclass(frozen=True)
class Receiver:
    name: str
    slack: SlackReceiver | None = None  # exactly one of slack, pagerduty
    pagerduty: PagerDutyReceiver | None = None


@dataclass(frozen=True)
class AlertRoute:
    """Alerts matching ``services`` (empty: any) at ``severities`` (empty: any) go to ``receivers``.
    Routes are tried in order; the first match wins."""

    receivers: tuple[str, ...]
    services: tuple[str, ...] = ()
    severities: tuple[Severity, ...] = ()


@dataclass(frozen=True)
class AlertsSpec:
    receivers: tuple[Receiver, ...] = ()
    routes: tuple[AlertRoute, ...] = ()
    group_wait_s: float = 30.0  # wait this long after a group's first alert before notifying
    group_interval_s: float = 300.0  # then send changes to the group at most this often
    repeat_interval_s: float = 14400.0  # re-send a still-firing group after this long


@dataclass(frozen=True)
class RoutingSpec:
    """Weight shifting away from a subset that fails its canary comparison."""

    step_percent: int = 25  # weight moved per step
    floor_percent: int = 0  # the failing subset keeps at least this weight
    restore_after_s: float = 60.0  # healthy this long before each restoring step
    min_samples: int = 20  # requests per subset per window below which the judge says unknown
    latency_ratio: float = 1.5  # effect-size floor: failing subset's median latency / the other's
    error_rate_delta: float = 0.05  # effect-size floor: failing subset's error rate minus the other's
    p_value: float = 0.01  # Mann-Whitney U / two-proportion significance


@dataclass(frozen=True)
class ScalingSpec:
    max_instances: int = 4  # per service, never more
    stabilization_s: float = 300.0  # healthy this long before scaling back in (HPA's default)
    ttl_s: float = 1800.0  # a raised floor lapses after this long unless raised again


@dataclass(frozen=True)
class ActionsSpec:
    mode: Mode = "shadow"  # every service's default
    modes: tuple[tuple[str, Mode], ...] = ()  # (service, mode) overriding the default
    freeze: bool = False  # nothing automated changes the mesh while set
    hold_down_s: float = 20.0  # at least this long between two steps on one service (>= 2 windows)
    budget_per_service_hour: int = 6
    budget_per_mesh_hour: int = 20
    routing: RoutingSpec = field(default_factory=RoutingSpec)
    scaling: ScalingSpec = field(default_factory=ScalingSpec)

    def mode_of(self, service: str) -> Mode:
        return dict(self.modes).get(service, self.mode)


@dataclass(frozen=True)
class LoopSpec:
    """Both sections; a spec without them gets these defaults (shadow mode, no receivers)."""

    alerts: AlertsSpec = field(default_factory=AlertsSpec)
    actions: ActionsSpec = field(default_factory=ActionsSpec)
