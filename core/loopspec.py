"""The `alerts:` and `actions:` sections of mesh.yaml: who is told, and what the loop may do.

They are a contract between the control plane, which validates them with the rest of a
spec (a refused section refuses the whole spec, so the running one stays), and the actions
stage, which reads them from the applied spec.  Secrets (a Slack webhook URL, a PagerDuty
routing key) are never written in the spec: a receiver names the file or the environment
variable that holds one (:class:`SecretRef`), read only by the actions process.

Defaults follow Alertmanager (grouping) and the Kubernetes HPA (scale-in stabilization);
docs/actions.md explains each.

:func:`parse_loop` reads both sections from a mesh spec's text (the actions process's view);
:func:`read_loop` is the same reader inside controlplane/meshspec.py's pass over the whole
spec.  Problems are reported as core/specread renders them: ``file:line: key.path: reason``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from yaml.nodes import MappingNode, ScalarNode

from core.contracts import WINDOW_SECONDS
from core.specread import (
    Field,
    NOT_SHOWN,
    Mapping,
    Problem,
    SpecError,
    all_read,
    compose,
    distinct,
    duration_within,
    reference,
    shorten,
    unknown,
)

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


# --- reading the sections from mesh.yaml -------------------------------------------

MAX_SILENCE_S = 30 * 86400  # a silence longer than a month is a receiver to remove, not mute
MIN_HOLD_DOWN_S = 2 * WINDOW_SECONDS  # a step's effect must fill a whole window before the next step

# Bounds where a value outside would make the loop spin, or never act or forget.
GROUP_WAIT = duration_within("0s", "1h")
GROUP_INTERVAL = duration_within("1s", "24h")
REPEAT_INTERVAL = duration_within("1m", "168h")
HOLD_DOWN = duration_within("1ms", "24h")  # at least MIN_HOLD_DOWN_S, checked apart to say why
RESTORE_AFTER = duration_within(f"{WINDOW_SECONDS}s", "24h")
STABILIZATION = duration_within(f"{WINDOW_SECONDS}s", "24h")
FLOOR_TTL = duration_within("1m", "168h")

_RECEIVER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_loop(text: str, source: str = "<mesh.yaml>") -> LoopSpec:
    """The `alerts:` and `actions:` sections of a mesh spec's text, defaults for absent ones;
    raise SpecError naming every problem in them.  The rest of the spec is meshspec's to
    check; only the service names are read from it (for references)."""
    problems: list[Problem] = []
    root = compose(text, problems, "a mesh spec (a mapping)")
    top = None if root is None else Field(root, "", problems).mapping()
    loop = None if top is None else read_loop(top, _service_names(top))
    if loop is None or problems:
        raise SpecError(source, sorted(problems, key=lambda p: p.line or 0))
    return loop


def read_loop(top: Mapping, services: tuple[str, ...] | None) -> LoopSpec | None:
    """Both sections of the spec's top-level mapping; None after recording a problem.
    `services` are the spec's service names (None: unreadable, references not checked)."""
    alerts_field, actions_field = top.get("alerts"), top.get("actions")
    alerts = AlertsSpec() if alerts_field is None else _alerts(alerts_field, services)
    actions = ActionsSpec() if actions_field is None else _actions(actions_field, services)
    return None if alerts is None or actions is None else LoopSpec(alerts=alerts, actions=actions)


def _service_names(top: Mapping) -> tuple[str, ...] | None:
    """The keys of `services:`, read without judging the table (meshspec does that)."""
    table = top.get("services")
    if table is None or not isinstance(table.node, MappingNode):
        return None
    return tuple(key.value for key, _ in table.node.value if isinstance(key, ScalarNode))


# --- alerts ---------------------------------------------------------------------------


def _alerts(f: Field, services: tuple[str, ...] | None) -> AlertsSpec | None:
    m = f.mapping(("group_wait", "group_interval", "repeat_interval", "receivers", "routes"))
    if m is None:
        return None
    group_wait = m.read("group_wait", GROUP_WAIT, AlertsSpec.group_wait_s)
    interval_field, repeat_field = m.get("group_interval"), m.get("repeat_interval")
    interval = AlertsSpec.group_interval_s if interval_field is None else GROUP_INTERVAL(interval_field)
    repeat = AlertsSpec.repeat_interval_s if repeat_field is None else REPEAT_INTERVAL(repeat_field)
    if interval is not None and repeat is not None and repeat < interval:
        (repeat_field or f).fail(
            f"repeat_interval ({repeat:g}s) is shorter than group_interval ({interval:g}s): a still-firing "
            "group would be re-sent before its changes are; make it at least as long")
    given = m.get("receivers")
    table = None if given is None else given.mapping()
    declared = () if given is None else None if table is None else tuple(table.entries)
    receivers = () if table is None else _receivers(table)
    routes = m.read("routes", lambda r: _routes(r, declared, services), ())
    if receivers is None or interval is None or repeat is None:
        return None
    return AlertsSpec(receivers=receivers, routes=routes, group_wait_s=group_wait,
                      group_interval_s=interval, repeat_interval_s=repeat)


def _receivers(table: Mapping) -> tuple[Receiver, ...] | None:
    receivers = all_read([_receiver(name, key, value) for name, key, value in table.items()])
    return None if receivers is None else tuple(receivers)


def _receiver(name: str, key: Field, f: Field) -> Receiver | None:
    rule = "lowercase letters, digits, '-' and '_', like 'oncall' or 'team-chat'"
    valid_name = name if _RECEIVER_NAME.fullmatch(name) else None
    if valid_name is None:
        key.fail(f"'{shorten(name)}' is not a valid receiver name: use {rule}")
    m = f.mapping(("slack", "pagerduty"))
    if m is None:
        return None
    kinds = [kind for kind in ("slack", "pagerduty") if m.get(kind) is not None]
    slack = m.read("slack", _slack, None)
    pagerduty = m.read("pagerduty", _pagerduty, None)
    if len(kinds) != 1:
        f.fail(f"give exactly one of slack or pagerduty (got {' and '.join(kinds) or 'none'})")
        return None
    if valid_name is None or (slack is None and pagerduty is None):
        return None
    return Receiver(name=valid_name, slack=slack, pagerduty=pagerduty)


def _literal(what: str, stem: str) -> dict[str, str]:
    """The key that would hold a secret in the spec, refused with what to write instead."""
    return {stem: (
        f"the {what} is a secret and must not be written in the spec (it is copied, shown and logged): "
        f"put it in a file (mode 0600) and give {stem}_file: /absolute/path, or in an environment "
        f"variable of the actions process and give {stem}_env: NAME")}


def _slack(f: Field) -> SlackReceiver | None:
    m = f.mapping(("webhook_url_file", "webhook_url_env"), _literal("webhook URL", "webhook_url"))
    ref = None if m is None else _secret_ref(f, m, "webhook_url")
    return None if ref is None else SlackReceiver(webhook_url=ref)


def _pagerduty(f: Field) -> PagerDutyReceiver | None:
    m = f.mapping(("routing_key_file", "routing_key_env", "url", "change_url"), _literal("routing key", "routing_key"))
    if m is None:
        return None
    ref = _secret_ref(f, m, "routing_key")
    url = m.read("url", _endpoint, PagerDutyReceiver.url)
    change_url = m.read("change_url", _endpoint, PagerDutyReceiver.change_url)
    return None if ref is None else PagerDutyReceiver(routing_key=ref, url=url, change_url=change_url)


def _secret_ref(f: Field, m: Mapping, stem: str) -> SecretRef | None:
    """Exactly one of `<stem>_file` and `<stem>_env`."""
    kinds = [key for key in (f"{stem}_file", f"{stem}_env") if m.get(key) is not None]
    file = m.read(f"{stem}_file", _secret_file, None)
    env = m.read(f"{stem}_env", _env_name, None)
    if len(kinds) != 1:
        if kinds or stem not in m.refused:  # else the literal secret's problem already says what to write
            f.fail(f"give exactly one of {stem}_file or {stem}_env (got {' and '.join(kinds) or 'none'})")
        return None
    return None if file is None and env is None else SecretRef(file=file, env=env)


def _secret_file(f: Field) -> str | None:
    value = f.string(echo=False)
    if value is None or value.startswith("/"):
        return value
    f.fail(f"give an absolute path: the actions process reads it from its own working directory {NOT_SHOWN}")
    return None


def _env_name(f: Field) -> str | None:
    value = f.string(echo=False)
    if value is None or _ENV_NAME.fullmatch(value):
        return value
    f.fail(f"not an environment variable name: use letters, digits and '_', not starting with a digit {NOT_SHOWN}")
    return None


def _endpoint(f: Field) -> str | None:
    """An https URL, or plain http to a loopback address (a test receiver).  Parts of the
    URL other than its scheme and host are never echoed: a query may hold a token."""
    value = f.string(echo=False)
    if value is None:
        return None
    try:
        url = urlsplit(value)
        host, _ = url.hostname or "", url.port  # .port raises on a port that is not a number
    except ValueError:
        f.fail("not a URL: give one like https://events.pagerduty.com/v2/enqueue")
        return None
    if url.username is not None or url.password is not None:
        f.fail(f"the URL holds credentials (user@host): remove them {NOT_SHOWN}")
        return None
    if not host:
        f.fail("not a URL with a host: give one like https://events.pagerduty.com/v2/enqueue")
        return None
    if url.scheme == "https" or (url.scheme == "http" and _loopback(host)):
        return value
    f.fail(f"use https (plain http only to a loopback address, for a test receiver), got {url.scheme or 'no scheme'}"
           f" to {host}")
    return None


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _routes(
    f: Field, receivers: tuple[str, ...] | None, services: tuple[str, ...] | None
) -> tuple[AlertRoute, ...] | None:
    routes = f.each(lambda r: _route(r, receivers, services))
    if routes is None:
        return None
    catch_all = next((i for i, r in enumerate(routes) if not r.services and not r.severities), None)
    if catch_all is not None and catch_all < len(routes) - 1:
        f.fail(f"routes after [{catch_all}] are never used: it matches every alert and the first match wins; "
               "move it last")
        return None
    return tuple(routes)


def _route(f: Field, receivers: tuple[str, ...] | None, services: tuple[str, ...] | None) -> AlertRoute | None:
    m = f.mapping(("services", "severities", "receivers"))
    if m is None:
        return None
    sends_to = m.need("receivers", lambda r: distinct(r, lambda x: reference(x, receivers, "receiver"), "receiver",
                                                      at_least_one="receiver"))
    names = m.read("services", lambda s: distinct(s, lambda x: reference(x, services), "service",
                                                  at_least_one="service (or leave services out: any)"), ())
    severities = m.read("severities", _severities, ())
    if sends_to is None:
        return None
    return AlertRoute(receivers=sends_to, services=names, severities=severities)


def _severities(f: Field) -> tuple[Severity, ...] | None:
    seen = distinct(f, _severity, "severity", at_least_one="severity (or leave severities out: any)")
    return None if seen is None else tuple(SEVERITIES[SEVERITIES.index(s)] for s in seen)


def _severity(f: Field) -> str | None:
    value = f.string()
    if value is None or value in SEVERITIES:
        return value
    f.fail(unknown("severity", value, SEVERITIES))
    return None


# --- actions --------------------------------------------------------------------------


def _actions(f: Field, services: tuple[str, ...] | None) -> ActionsSpec | None:
    m = f.mapping(("mode", "services", "freeze", "hold_down", "budget", "routing", "scaling"))
    if m is None:
        return None
    per_service, per_mesh = m.read("budget", _budget, (ActionsSpec.budget_per_service_hour,
                                                        ActionsSpec.budget_per_mesh_hour))
    return ActionsSpec(
        mode=m.read("mode", _mode, ActionsSpec.mode),
        modes=m.read("services", lambda s: _service_modes(s, services), ()),
        freeze=m.read("freeze", Field.boolean, ActionsSpec.freeze),
        hold_down_s=m.read("hold_down", _hold_down, ActionsSpec.hold_down_s),
        budget_per_service_hour=per_service,
        budget_per_mesh_hour=per_mesh,
        routing=m.read("routing", _routing, RoutingSpec()),
        scaling=m.read("scaling", _scaling, ScalingSpec()),
    )


def _mode(f: Field) -> Mode | None:
    """off, shadow or on.  Read from the scalar's text: YAML 1.1 makes a plain on/off a boolean."""
    if not isinstance(f.node, ScalarNode):
        f.string()  # records "expected a string, got a mapping"
        return None
    if f.node.value in MODES:
        return MODES[MODES.index(f.node.value)]
    f.fail(unknown("mode", f.node.value, MODES))
    return None


def _service_modes(f: Field, services: tuple[str, ...] | None) -> tuple[tuple[str, Mode], ...] | None:
    m = f.mapping()
    if m is None:
        return None
    pairs = all_read([_service_mode(key, value, services) for _, key, value in m.items()])
    return None if pairs is None else tuple(pairs)


def _service_mode(key: Field, f: Field, services: tuple[str, ...] | None) -> tuple[str, Mode] | None:
    name = reference(key, services)
    m = f.mapping(("mode",))
    mode = None if m is None else m.need("mode", _mode)
    return None if name is None or mode is None else (name, mode)


def _hold_down(f: Field) -> float | None:
    seconds = HOLD_DOWN(f)
    if seconds is None or seconds >= MIN_HOLD_DOWN_S:
        return seconds
    f.fail(f"must be at least {MIN_HOLD_DOWN_S}s (two {WINDOW_SECONDS}s analysis windows), got {f.node.value}: "
           "a step's effect must show in a whole window before the next step is judged")
    return None


def _budget(f: Field) -> tuple[int, int] | None:
    m = f.mapping(("per_service_hour", "per_mesh_hour"))
    if m is None:
        return None
    # At least 1: a budget of 0 would make mode 'on' a silent shadow (use mode: off).
    per_service = m.read("per_service_hour", lambda n: n.integer(1, 10_000), ActionsSpec.budget_per_service_hour)
    per_mesh = m.read("per_mesh_hour", lambda n: n.integer(1, 10_000), ActionsSpec.budget_per_mesh_hour)
    return per_service, per_mesh


def _routing(f: Field) -> RoutingSpec | None:
    m = f.mapping(("step", "floor", "restore_after", "min_samples", "latency_ratio", "error_rate_delta", "p_value"))
    if m is None:
        return None
    return RoutingSpec(
        step_percent=m.read("step", lambda n: n.integer(1, 100), RoutingSpec.step_percent),
        floor_percent=m.read("floor", lambda n: n.integer(0, 99), RoutingSpec.floor_percent),
        restore_after_s=m.read("restore_after", RESTORE_AFTER, RoutingSpec.restore_after_s),
        min_samples=m.read("min_samples", lambda n: n.integer(1, 1_000_000), RoutingSpec.min_samples),
        latency_ratio=m.read("latency_ratio", lambda n: n.number(1, 100), RoutingSpec.latency_ratio),
        error_rate_delta=m.read("error_rate_delta", lambda n: n.number(0, 1), RoutingSpec.error_rate_delta),
        p_value=m.read("p_value", lambda n: n.number(0.0001, 0.5), RoutingSpec.p_value),
    )


def _scaling(f: Field) -> ScalingSpec | None:
    m = f.mapping(("max_instances", "stabilization", "ttl"))
    if m is None:
        return None
    return ScalingSpec(
        max_instances=m.read("max_instances", lambda n: n.integer(1, 100), ScalingSpec.max_instances),
        stabilization_s=m.read("stabilization", STABILIZATION, ScalingSpec.stabilization_s),
        ttl_s=m.read("ttl", FLOOR_TTL, ScalingSpec.ttl_s),
    )
