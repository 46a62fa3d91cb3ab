"""The declarative mesh spec (``mesh.yaml``): typed model, loader and validator.

The spec says *what* the mesh is: services, their instances, who calls whom, and the
traffic policy callers apply (weighted splits between subsets, timeouts, retries,
circuit breakers, outlier detection, fault injection).  *Where* instances run
(addresses and ports) is not part of the spec: the runtime supplies it as a
:class:`controlplane.placement.Placement`, the way Kubernetes Endpoints complement a
Service.

Loading never half-applies: :func:`load_spec` either returns a complete, validated
:class:`MeshSpec` or raises :class:`SpecError` listing every problem with its file,
key path, line and a hint, so a rejected file leaves the running config in place.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TypeVar

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from core import credentials

SPEC_VERSION = 1


@dataclass(frozen=True)
class Problem:
    """One reason a spec was refused."""

    path: str  # dotted key path, e.g. "services.payments.routes[0].split.v3"
    message: str  # what is wrong and what to do about it
    line: int | None = None  # 1-based line in the YAML file, when known

    def render(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line else source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class SpecError(ValueError):
    """A mesh spec was refused; ``problems`` lists every reason."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(p.render(source) for p in problems))


@dataclass(frozen=True)
class Instance:
    """One workload instance of a service; it gets its own sidecar (node id = name)."""

    name: str
    subset: str = "default"


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 2
    retry_on: tuple[str, ...] = ("5xx", "reset", "connect-failure")
    per_try_timeout_s: float | None = None


@dataclass(frozen=True)
class CircuitBreaker:
    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3


@dataclass(frozen=True)
class OutlierDetection:
    consecutive_5xx: int = 5
    interval_s: float = 10.0
    base_ejection_time_s: float = 30.0
    max_ejection_percent: int = 50


@dataclass(frozen=True)
class FaultDelay:
    percent: float
    fixed_delay_s: float


@dataclass(frozen=True)
class FaultAbort:
    percent: float
    http_status: int


@dataclass(frozen=True)
class Fault:
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


@dataclass(frozen=True)
class RouteMatch:
    """Exactly one of prefix, path or regex is set; regex is RE2 syntax (Envoy's)."""

    prefix: str | None = None
    path: str | None = None
    regex: str | None = None
    headers: tuple[tuple[str, str], ...] = ()  # exact-match (name, value) pairs


@dataclass(frozen=True)
class Route:
    """A route callers of the owning service apply, in order; first match wins."""

    name: str
    match: RouteMatch
    split: tuple[tuple[str, int], ...]  # (subset, weight) pairs; weights sum to 100
    timeout_s: float | None = None
    retries: RetryPolicy | None = None
    fault: Fault | None = None


@dataclass(frozen=True)
class Identity:
    """Workload identity: SPIFFE IDs are spiffe://<trust_domain>/ns/<namespace>/sa/<service>."""

    trust_domain: str = "greymesh.local"
    svid_lifetime_s: float = 3600.0  # SVIDs are re-issued at half-life


@dataclass(frozen=True)
class IngressTls:
    """The ingress's own certificate, given by the user instead of one from the mesh CA."""

    cert_file: str  # PEM: the leaf first, then any intermediates
    key_file: str  # PEM private key, mode 0600
    chain_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)  # never in a repr, so never in a log line


@dataclass(frozen=True)
class IngressJwt:
    """End-user identity at the ingress: JWTs verified by Envoy against a local JWKS."""

    issuer: str
    audiences: tuple[str, ...]  # a token must name one of these in `aud`
    jwks_file: str
    jwks: str = field(repr=False)  # the JWKS document (public keys), as read from jwks_file
    required: bool = True  # False: a request without a token passes on; a bad token never does


@dataclass(frozen=True)
class Ingress:
    """The mesh's front door: TLS always; a JWT check when ``jwt`` is set."""

    hosts: tuple[str, ...] = ("localhost", "127.0.0.1")  # names clients reach it by (the certificate's SANs)
    tls: IngressTls | None = None  # None: a certificate from the mesh CA for ``hosts``
    jwt: IngressJwt | None = None


@dataclass(frozen=True)
class Service:
    name: str
    instances: tuple[Instance, ...]
    calls: tuple[str, ...] = ()  # services this one may call (its sidecar gets routes only for these)
    namespace: str = "default"
    tags: tuple[str, ...] = ()  # facts policies can test, e.g. "pci", "gdpr-region:eu"
    fail_open: bool = False  # allow requests when the policy engine is unreachable (logged)
    routes: tuple[Route, ...] = ()  # empty: one catch-all route spread over subsets by instance count
    connect_timeout_s: float = 1.0
    circuit_breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    outlier_detection: OutlierDetection | None = None

    @property
    def subsets(self) -> tuple[str, ...]:
        """Subsets that have at least one instance, in first-seen order."""
        return _subsets_of(self.instances)


@dataclass(frozen=True)
class MeshSpec:
    name: str
    services: tuple[Service, ...]
    entrypoint: str  # the service whose ingress is the mesh's front door
    identity: Identity = field(default_factory=Identity)
    ingress: Ingress = field(default_factory=Ingress)

    def service(self, name: str) -> Service:
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(name)

    def callers_of(self, name: str) -> tuple[Service, ...]:
        return tuple(s for s in self.services if name in s.calls)


def _subsets_of(instances: Iterable[Instance]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(i.subset for i in instances))


def load_spec(path: str | Path) -> MeshSpec:
    """Read and validate a mesh.yaml file; raise SpecError naming every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(str(path), [Problem("", f"cannot read file: {exc.strerror}")]) from exc
    return parse_spec(text, source=str(path))


def parse_spec(text: str, source: str = "<mesh.yaml>") -> MeshSpec:
    """Validate YAML text as a mesh spec; raise SpecError naming every problem.

    Walks PyYAML's node tree rather than loaded objects, so every problem gets its line
    and duplicate keys (which a plain load silently collapses) are caught.
    """
    problems: list[Problem] = []
    root = _compose(text, problems)
    spec = None if root is None else _mesh(_Field(root, "", problems))
    if spec is None or problems:
        raise SpecError(source, sorted(problems, key=lambda p: p.line or 0))
    return spec


# --- reading the node tree --------------------------------------------------------

_T = TypeVar("_T")
_D = TypeVar("_D")
_N = TypeVar("_N", int, float)

_MERGE_TAG = "tag:yaml.org,2002:merge"
_UNREADABLE = object()  # a scalar PyYAML cannot construct (bad explicit tag), or a collection
_UINT32_MAX = 2**32 - 1  # Envoy's counters and thresholds are uint32

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600)}
_MIN_DURATION = Decimal("0.001")  # Envoy counts timeouts in whole ms: less would mean "no timeout"
_MAX_DURATION = Decimal(315_576_000_000)  # the protobuf Duration range


def _written(seconds: Decimal) -> str:
    """A bound as the spec would write it: the largest unit that states it exactly."""
    for unit in ("h", "m", "s", "ms"):
        count = seconds / _DURATION_UNITS[unit]
        if count == count.to_integral_value() and count >= 1:
            return f"{count:f}{unit}"
    return f"{seconds:f}s"


def _duration_within(low: str, high: str) -> Callable[[_Field], float | None]:
    """A reader of a duration bounded where a value outside would hurt the mesh (both bounds
    written as in the spec, e.g. '1m' and '720h')."""
    def seconds(written: str) -> Decimal:
        found = _DURATION.fullmatch(written)
        assert found, written
        return Decimal(found[1]) * _DURATION_UNITS[found[2]]
    lo, hi = seconds(low), seconds(high)
    return lambda f: f.duration(lo, hi)


# Bounds of the durations that can hurt.  An SVID that lives seconds re-issues in a busy
# loop and takes the mesh down with the CA; one that lives years is a stolen key for years
# (Istio caps workload certificates at 90 days; we renew at half-life, so 30 days means a
# key older than 15 days is never in use).
SVID_LIFETIME = _duration_within("1m", "720h")
CONNECT_TIMEOUT = _duration_within("1ms", "5m")
REQUEST_TIMEOUT = _duration_within("1ms", "24h")   # route timeout and per-try timeout
EJECTION_TIME = _duration_within("1ms", "1h")      # outlier ejection base time
DETECTION_INTERVAL = _duration_within("100ms", "1h")  # outlier sweeps: faster is a busy loop in Envoy
FAULT_DELAY = _duration_within("1ms", "1h")


def _compose(text: str, problems: list[Problem]) -> Node | None:
    """The document's node tree, or None after recording why there is none."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        reason = ", ".join(" ".join(part.split()) for part in (exc.context, exc.problem) if part)
        problems.append(Problem("", f"invalid YAML: {reason}", mark.line + 1 if mark else None))
        return None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        problems.append(Problem("", f"invalid YAML: character #x{exc.character:04x} is not allowed", line))
        return None
    except RecursionError:
        problems.append(Problem("", "invalid YAML: nested too deeply"))
        return None
    if root is None:
        problems.append(Problem("", "the file is empty: expected a mapping of version, mesh, entrypoint, services"))
    return root


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unknown(what: str, value: str, choices: Iterable[str]) -> str:
    """'unknown key 'timout' (did you mean 'timeout'?)', or the list of choices."""
    choices = list(choices)
    close = difflib.get_close_matches(value, choices, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f"; expected one of: {', '.join(choices)}"
    return f"unknown {what} '{_shorten(value)}'{hint}"


def _all_read(values: list[_T | None]) -> list[_T] | None:
    """The values, or None if reading any of them failed (each failure is already recorded)."""
    read = [v for v in values if v is not None]
    return read if len(read) == len(values) else None


@dataclass(frozen=True, eq=False)
class _Field:
    """A node and its key path.  Readers return the node's value, or record a Problem
    at this path and line and return None, so one pass collects every problem."""

    node: Node
    path: str
    problems: list[Problem]

    @property
    def line(self) -> int:
        return self.node.start_mark.line + 1

    def fail(self, message: str) -> None:
        self.problems.append(Problem(self.path, message, self.line))

    def key(self, name: str, node: Node | None = None) -> _Field:
        """The field at ``path.name``; without a node, placed here (for a missing key)."""
        path = f"{self.path}.{name}" if self.path else name
        return _Field(self.node if node is None else node, path, self.problems)

    def mapping(self, known: tuple[str, ...] | None = None) -> _Mapping | None:
        """The mapping's entries; `known` makes every other key a problem."""
        if isinstance(self.node, MappingNode):
            return _Mapping(self, known)
        self._expected("a mapping", " (write {} for an empty one)" if self._value() is None else "")
        return None

    def each(self, reader: Callable[[_Field], _T | None], *, at_least_one: str = "") -> list[_T] | None:
        """Every item read with `reader`; `at_least_one` names the item if an empty list is wrong."""
        if not isinstance(self.node, SequenceNode):
            self._expected("a list")
            return None
        if at_least_one and not self.node.value:
            self.fail(f"give at least one {at_least_one}")
            return None
        return _all_read([reader(_Field(n, f"{self.path}[{i}]", self.problems)) for i, n in enumerate(self.node.value)])

    def string(self) -> str | None:
        value = self._value()
        if isinstance(value, str):
            return value
        # A plain 2, yes or 1.5 that YAML read as another type: quoting makes it text.
        quotable = isinstance(self.node, ScalarNode) and self.node.style is None and value not in (None, _UNREADABLE)
        self._expected("a string", f' (quote it: "{_shorten(self.node.value)}")' if quotable else "")
        return None

    def boolean(self) -> bool | None:
        value = self._value()
        if isinstance(value, bool):
            return value
        self._expected("true or false")
        return None

    def integer(self, low: int, high: int = _UINT32_MAX) -> int | None:
        value = self._value()
        if isinstance(value, int) and not isinstance(value, bool):
            return self._within(value, low, high)
        self._expected("an integer")
        return None

    def number(self, low: int, high: int) -> float | None:
        value = self._value()
        if isinstance(value, int | float) and not isinstance(value, bool):
            return self._within(float(value), low, high)
        self._expected("a number")
        return None

    def duration(self, low: Decimal = _MIN_DURATION, high: Decimal = _MAX_DURATION) -> float | None:
        """Seconds, from a string like '250ms', '2s', '1.5s' or '1m', between low and high."""
        value = self._value()
        found = _DURATION.fullmatch(value) if isinstance(value, str) else None
        if found is None:
            bare = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
            self._expected("a duration like '250ms' or '2s'", f" (add a unit: '{self.node.value}s')" if bare else "")
            return None
        seconds = Decimal(found[1]) * _DURATION_UNITS[found[2]]
        if low <= seconds <= high:
            return float(seconds)
        self.fail(f"must be between {_written(low)} and {_written(high)}, got '{_shorten(value)}'")
        return None

    def _within(self, value: _N, low: int, high: int) -> _N | None:
        if low <= value <= high:
            return value
        self.fail(f"must be between {low} and {high}, got {_shorten(self.node.value)}")
        return None

    def _expected(self, what: str, hint: str = "") -> None:
        self.fail(f"expected {what}, got {self._describe()}{hint}")

    def _value(self) -> object:
        """The scalar's Python value (YAML 1.1 types), or _UNREADABLE."""
        if not isinstance(self.node, ScalarNode):
            return _UNREADABLE
        try:
            return yaml.constructor.SafeConstructor().construct_object(self.node, deep=True)
        except Exception:  # PyYAML's constructors raise all sorts on a bad explicit tag (!!int x)
            return _UNREADABLE

    def _describe(self) -> str:
        """How the value reads in a message: 'fast', integer 7, null, a list."""
        if isinstance(self.node, MappingNode):
            return "a mapping"
        if isinstance(self.node, SequenceNode):
            return "a list"
        value, raw = self._value(), _shorten(self.node.value)
        if isinstance(value, str):
            return f"'{_shorten(value)}'"
        if value is None:
            return "null"
        if value is _UNREADABLE:
            return f"'{raw}' tagged {self.node.tag.replace('tag:yaml.org,2002:', '!!')}"
        kind = {bool: "boolean", int: "integer", float: "number"}.get(type(value), self.node.tag.rsplit(":", 1)[-1])
        return f"{kind} {raw}"


class _Mapping:
    """A mapping's entries by key.  Keys that are not strings, duplicate keys and (given
    a fixed schema) unknown keys are reported here, so a typo never silently does nothing."""

    def __init__(self, owner: _Field, known: tuple[str, ...] | None):
        self.owner = owner
        self.entries: dict[str, tuple[_Field, _Field]] = {}
        for key_node, value_node in owner.node.value:
            name = self._name(key_node)
            if name is None:
                continue
            key = owner.key(name, key_node)
            if name in self.entries:
                key.fail(f"duplicate key '{name}' (first at line {self.entries[name][0].line})")
            elif known is not None and name not in known:
                key.fail(_unknown("key", name, known))
            else:
                self.entries[name] = (key, owner.key(name, value_node))

    def _name(self, node: Node) -> str | None:
        if node.tag == _MERGE_TAG:
            self.owner.key("<<", node).fail("YAML merge keys ('<<') are not supported: write the keys out")
            return None
        return self.owner.key(node.value if isinstance(node, ScalarNode) else "?", node).string()

    def get(self, key: str) -> _Field | None:
        entry = self.entries.get(key)
        return None if entry is None else entry[1]

    def items(self) -> list[tuple[str, _Field, _Field]]:
        """(name, key field, value field) in file order."""
        return [(name, key, value) for name, (key, value) in self.entries.items()]

    def need(self, key: str, reader: Callable[[_Field], _T | None]) -> _T | None:
        """A required key's value; None if it is missing or invalid (recorded)."""
        value = self.get(key)
        if value is None:
            self.owner.key(key).fail("required key is missing")
            return None
        return reader(value)

    def read(self, key: str, reader: Callable[[_Field], _T | None], default: _D) -> _T | _D:
        """An optional key's value; `default` if it is absent, or invalid (recorded)."""
        value = self.get(key)
        result = None if value is None else reader(value)
        return default if result is None else result


# --- value rules ------------------------------------------------------------------

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_ROUTE_NAME = re.compile(r"[a-z0-9_-]+")
_TRUST_DOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_TAG = re.compile(r"[a-z0-9][a-z0-9:._-]{0,62}")
_HEADER_NAME = re.compile(r":?[0-9A-Za-z!#$%&'*+.^_`|~-]+")  # an HTTP token; ':' starts a pseudo-header
_RETRY_ON = (
    "5xx", "gateway-error", "reset", "connect-failure", "retriable-4xx", "refused-stream",
    "retriable-status-codes", "reset-before-request", "envoy-ratelimited",
)  # Envoy router's retry_on conditions


def _matching(f: _Field, pattern: re.Pattern[str], what: str, rule: str) -> str | None:
    value = f.string()
    if value is None or pattern.fullmatch(value):
        return value
    f.fail(f"'{_shorten(value)}' is not a valid {what}: use {rule}")
    return None


def _label(f: _Field) -> str | None:
    """A DNS label: service, instance and subset names end up in cluster names and node ids."""
    rule = "lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters"
    return _matching(f, _LABEL, "name", rule)


def _claim(f: _Field, value: str | None, seen: dict[str, _Field], what: str) -> str | None:
    """Pass `value` through, recording a problem if an earlier field in `seen` has it."""
    if value is not None:
        first = seen.setdefault(value, f)
        if first is not f:
            f.fail(f"duplicate {what} '{value}': already at {first.path} (line {first.line})")
    return value


def _distinct(
    f: _Field, reader: Callable[[_Field], str | None], what: str, at_least_one: str = ""
) -> tuple[str, ...] | None:
    """A list of strings read with `reader`, none repeated."""
    seen: dict[str, _Field] = {}
    values = f.each(lambda item: _claim(item, reader(item), seen, what), at_least_one=at_least_one)
    return None if values is None else tuple(values)


def _reference(f: _Field, services: tuple[str, ...] | None) -> str | None:
    """A service name that must be declared (not checked while `services` is unreadable)."""
    name = f.string()
    if name is None or services is None or name in services:
        return name
    f.fail(_unknown("service", name, services))
    return None


def _url_path(f: _Field) -> str | None:
    value = f.string()
    if value is None or value.startswith("/"):
        return value
    f.fail(f"must start with '/', got '{_shorten(value)}'")
    return None


def _regex(f: _Field) -> str | None:
    # Checked with Python's re.  Envoy compiles RE2, which lacks look-around and
    # backreferences, so a pattern accepted here may still be NACKed by the sidecars:
    # that shows as the node's xDS NACK in `greymesh status`, not here.
    value = f.string()
    if value is None:
        return None
    try:
        with warnings.catch_warnings(action="ignore"):  # e.g. FutureWarning on "[[": not an error here
            re.compile(value)
    except (re.error, OverflowError, RecursionError) as exc:
        f.fail(f"not a valid regular expression: {exc}")
        return None
    return value


def _percent(f: _Field) -> float | None:
    return f.number(0, 100)


def _positive(f: _Field) -> int | None:
    return f.integer(1)


# --- the spec ---------------------------------------------------------------------


def _mesh(root: _Field) -> MeshSpec | None:
    top = root.mapping(("version", "mesh", "entrypoint", "identity", "ingress", "services"))
    if top is None:
        return None
    top.need("version", _version)
    name = top.need("mesh", _label)
    identity = top.read("identity", _identity, Identity())
    ingress = top.read("ingress", _ingress, Ingress())
    table = top.need("services", _Field.mapping)
    declared = tuple(table.entries) if table and table.entries else None
    entrypoint = top.need("entrypoint", lambda e: _reference(e, declared))
    services = None if table is None else _services(table)
    if name is None or entrypoint is None or services is None:
        return None
    return MeshSpec(name=name, services=services, entrypoint=entrypoint, identity=identity, ingress=ingress)


def _identity(f: _Field) -> Identity | None:
    m = f.mapping(("trust_domain", "svid_lifetime"))
    if m is None:
        return None
    rule = "dot-separated lowercase labels, like 'greymesh.local' or 'prod.example.com'"
    trust_domain = m.read("trust_domain", lambda t: _matching(t, _TRUST_DOMAIN, "trust domain", rule),
                          Identity.trust_domain)
    lifetime = m.read("svid_lifetime", SVID_LIFETIME, Identity.svid_lifetime_s)
    return Identity(trust_domain=trust_domain, svid_lifetime_s=lifetime)


def _version(f: _Field) -> int | None:
    version = f.integer(0)
    if version is None or version == SPEC_VERSION:
        return version
    f.fail(f"unsupported version {version}: this greymesh reads version {SPEC_VERSION}")
    return None


def _services(table: _Mapping) -> tuple[Service, ...] | None:
    if not table.entries:
        table.owner.fail("give at least one service")
        return None
    declared = tuple(table.entries)
    instance_names: dict[str, _Field] = {}  # node ids: unique across the whole mesh
    services = _all_read([_service(*entry, declared, instance_names) for entry in table.items()])
    return None if services is None else tuple(services)


def _service(
    name: str, key: _Field, f: _Field, declared: tuple[str, ...], instance_names: dict[str, _Field]
) -> Service | None:
    valid_name = _label(key)
    m = f.mapping(("calls", "namespace", "tags", "authz", "instances", "connect_timeout", "circuit_breaker",
                   "outlier_detection", "routes"))
    if m is None:
        return None
    instances = m.need("instances", lambda i: i.each(lambda x: _instance(x, instance_names), at_least_one="instance"))
    subsets = None if instances is None else _subsets_of(instances)
    calls = m.read("calls", lambda c: _distinct(c, lambda x: _callee(x, name, declared), "callee"), ())
    namespace = m.read("namespace", _label, Service.namespace)
    tags = m.read("tags", lambda t: _distinct(t, _tag, "tag"), ())
    fail_open = m.read("authz", _authz, Service.fail_open)
    connect_timeout = m.read("connect_timeout", CONNECT_TIMEOUT, Service.connect_timeout_s)
    circuit_breaker = m.read("circuit_breaker", _circuit_breaker, CircuitBreaker())
    outlier_detection = m.read("outlier_detection", _outlier_detection, None)
    routes = m.read("routes", lambda r: _routes(r, name, subsets), ())
    if valid_name is None or instances is None:
        return None
    return Service(
        name=valid_name,
        instances=tuple(instances),
        calls=calls,
        namespace=namespace,
        tags=tags,
        fail_open=fail_open,
        routes=routes,
        connect_timeout_s=connect_timeout,
        circuit_breaker=circuit_breaker,
        outlier_detection=outlier_detection,
    )


def _tag(f: _Field) -> str | None:
    return _matching(f, _TAG, "tag", "lowercase letters, digits and ':._-', like 'pci' or 'gdpr-region:eu'")


def _authz(f: _Field) -> bool | None:
    """The service's authorization stance; only `fail_open` so far."""
    m = f.mapping(("fail_open",))
    return None if m is None else m.read("fail_open", _Field.boolean, Service.fail_open)


def _instance(f: _Field, names: dict[str, _Field]) -> Instance | None:
    m = f.mapping(("name", "subset"))
    if m is None:
        return None
    name = m.need("name", lambda n: _claim(n, _label(n), names, "instance name"))
    given = m.get("subset")  # not read() with a default: a bad subset must not pose as "default"
    subset = Instance.subset if given is None else _label(given)
    return None if name is None or subset is None else Instance(name=name, subset=subset)


def _callee(f: _Field, caller: str, declared: tuple[str, ...]) -> str | None:
    name = _reference(f, declared)
    if name != caller:
        return name
    f.fail(f"{caller} cannot call itself")
    return None


def _circuit_breaker(f: _Field) -> CircuitBreaker | None:
    m = f.mapping(("max_connections", "max_pending_requests", "max_requests", "max_retries"))
    if m is None:
        return None
    return CircuitBreaker(
        max_connections=m.read("max_connections", _positive, CircuitBreaker.max_connections),
        max_pending_requests=m.read("max_pending_requests", _positive, CircuitBreaker.max_pending_requests),
        max_requests=m.read("max_requests", _positive, CircuitBreaker.max_requests),
        max_retries=m.read("max_retries", _positive, CircuitBreaker.max_retries),
    )


def _outlier_detection(f: _Field) -> OutlierDetection | None:
    m = f.mapping(("consecutive_5xx", "interval", "base_ejection_time", "max_ejection_percent"))
    if m is None:
        return None
    return OutlierDetection(
        consecutive_5xx=m.read("consecutive_5xx", _positive, OutlierDetection.consecutive_5xx),
        interval_s=m.read("interval", DETECTION_INTERVAL, OutlierDetection.interval_s),
        base_ejection_time_s=m.read("base_ejection_time", EJECTION_TIME, OutlierDetection.base_ejection_time_s),
        max_ejection_percent=m.read(
            "max_ejection_percent", lambda p: p.integer(0, 100), OutlierDetection.max_ejection_percent
        ),
    )


# --- routes -----------------------------------------------------------------------


def _routes(f: _Field, service: str, subsets: tuple[str, ...] | None) -> tuple[Route, ...] | None:
    names: dict[str, _Field] = {}
    routes = f.each(lambda r: _route(r, service, subsets, names))
    return None if routes is None else tuple(routes)


def _route(f: _Field, service: str, subsets: tuple[str, ...] | None, names: dict[str, _Field]) -> Route | None:
    """One route; `subsets` is None when the service's instances are unreadable (split not checked)."""
    m = f.mapping(("name", "match", "split", "timeout", "retries", "fault"))
    if m is None:
        return None
    rule = "lowercase letters, digits, '-' and '_'"
    name = m.need("name", lambda n: _claim(n, _matching(n, _ROUTE_NAME, "route name", rule), names, "route name"))
    match = m.need("match", _match)
    given = m.get("split")
    split = _sole_subset(f, service, subsets) if given is None else _split(given, service, subsets)
    timeout = m.read("timeout", REQUEST_TIMEOUT, None)
    retries = m.read("retries", _retries, None)
    fault = m.read("fault", _fault, None)
    if name is None or match is None or split is None:
        return None
    return Route(name=name, match=match, split=split, timeout_s=timeout, retries=retries, fault=fault)


def _sole_subset(route: _Field, service: str, subsets: tuple[str, ...] | None) -> tuple[tuple[str, int], ...] | None:
    """The split of a route that gives none: everything to the service's only subset."""
    if subsets is None:
        return None
    if len(subsets) == 1:
        return ((subsets[0], 100),)
    route.key("split").fail(f"service {service} has subsets {', '.join(subsets)}: give the route a split")
    return None


def _split(f: _Field, service: str, subsets: tuple[str, ...] | None) -> tuple[tuple[str, int], ...] | None:
    m = f.mapping()
    if m is None:
        return None
    pairs = _all_read([_weight(subset, key, value, service, subsets) for subset, key, value in m.items()])
    if pairs is None:
        return None
    total = sum(weight for _, weight in pairs)
    if total != 100:
        f.fail(f"weights sum to {total}; they must sum to exactly 100")
        return None
    return tuple(pairs)


def _weight(
    subset: str, key: _Field, value: _Field, service: str, subsets: tuple[str, ...] | None
) -> tuple[str, int] | None:
    weight = value.integer(0, 100)
    if subsets is not None and subset not in subsets:
        key.fail(f"no instance of {service} is in subset '{subset}'; its subsets are: {', '.join(subsets)}")
        return None
    return None if weight is None else (subset, weight)


def _match(f: _Field) -> RouteMatch | None:
    m = f.mapping(("prefix", "path", "regex", "headers"))
    if m is None:
        return None
    prefix = m.read("prefix", _url_path, None)
    path = m.read("path", _url_path, None)
    regex = m.read("regex", _regex, None)
    headers = m.read("headers", _headers, ())
    kinds = [kind for kind in ("prefix", "path", "regex") if m.get(kind) is not None]
    if len(kinds) != 1:
        f.fail(f"give exactly one of prefix, path or regex (got {' and '.join(kinds) or 'none'})")
        return None
    if prefix is None and path is None and regex is None:
        return None
    return RouteMatch(prefix=prefix, path=path, regex=regex, headers=headers)


def _headers(f: _Field) -> tuple[tuple[str, str], ...] | None:
    """Exact-match headers; names are case-insensitive in HTTP, so kept lowercase."""
    m = f.mapping()
    if m is None:
        return None
    seen: dict[str, _Field] = {}
    pairs = _all_read([_header(key, value, seen) for _, key, value in m.items()])
    return None if pairs is None else tuple(pairs)


def _header(key: _Field, value: _Field, seen: dict[str, _Field]) -> tuple[str, str] | None:
    rule = "letters, digits and !#$%&'*+-.^_`|~ (':' first for a pseudo-header)"
    name = _matching(key, _HEADER_NAME, "header name", rule)
    name = _claim(key, None if name is None else name.lower(), seen, "header")
    text = value.string()
    return None if name is None or text is None else (name, text)


def _retries(f: _Field) -> RetryPolicy | None:
    m = f.mapping(("attempts", "retry_on", "per_try_timeout"))
    if m is None:
        return None
    return RetryPolicy(
        attempts=m.read("attempts", lambda a: a.integer(0, 10), RetryPolicy.attempts),
        retry_on=m.read("retry_on", _retry_on, RetryPolicy.retry_on),
        per_try_timeout_s=m.read("per_try_timeout", REQUEST_TIMEOUT, RetryPolicy.per_try_timeout_s),
    )


def _retry_on(f: _Field) -> tuple[str, ...] | None:
    return _distinct(f, _retry_condition, "retry condition", at_least_one="retry condition")


def _retry_condition(f: _Field) -> str | None:
    value = f.string()
    if value is None or value in _RETRY_ON:
        return value
    f.fail(_unknown("retry condition", value, _RETRY_ON))
    return None


def _fault(f: _Field) -> Fault | None:
    m = f.mapping(("delay", "abort"))
    if m is None:
        return None
    if not m.entries:
        f.fail("give a delay, an abort or both")
        return None
    return Fault(delay=m.read("delay", _fault_delay, None), abort=m.read("abort", _fault_abort, None))


def _fault_delay(f: _Field) -> FaultDelay | None:
    m = f.mapping(("percent", "fixed"))
    if m is None:
        return None
    percent, fixed = m.need("percent", _percent), m.need("fixed", FAULT_DELAY)
    return None if percent is None or fixed is None else FaultDelay(percent=percent, fixed_delay_s=fixed)


def _fault_abort(f: _Field) -> FaultAbort | None:
    m = f.mapping(("percent", "http_status"))
    if m is None:
        return None
    percent, status = m.need("percent", _percent), m.need("http_status", lambda s: s.integer(200, 599))
    return None if percent is None or status is None else FaultAbort(percent=percent, http_status=status)


# --- the ingress ------------------------------------------------------------------

_HOST_NAME = re.compile(r"(?=.{1,253}$)(\*\.)?[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*")


def _ingress(f: _Field) -> Ingress | None:
    m = f.mapping(("hosts", "tls", "jwt"))
    if m is None:
        return None
    hosts = m.read("hosts", lambda h: _distinct(h, _host, "host", at_least_one="host name"), Ingress.hosts)
    return Ingress(hosts=hosts, tls=m.read("tls", _ingress_tls, None), jwt=m.read("jwt", _ingress_jwt, None))


def _host(f: _Field) -> str | None:
    """A DNS name (a leading '*.' allowed) or an IP address: what clients put in the URL."""
    value = f.string()
    if value is None:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    rule = "a lowercase DNS name like 'shop.example.com' (or '*.example.com'), or an IP address"
    return _matching(f, _HOST_NAME, "host name", rule)


def _absolute_file(f: _Field) -> Path | None:
    """A path to an existing file.  Absolute, because the control plane re-reads the spec
    from its own copy in the data dir, where a relative path would name another file."""
    value = f.string()
    if value is None:
        return None
    path = Path(value)
    if not path.is_absolute():
        f.fail(f"'{_shorten(value)}' is relative: give an absolute path (the spec is also read from the data dir)")
        return None
    if not path.is_file():
        f.fail(f"no such file: {value}")
        return None
    return path


def _ingress_tls(f: _Field) -> IngressTls | None:
    m = f.mapping(("cert", "key"))
    if m is None:
        return None
    cert_field, key_field = m.get("cert"), m.get("key")
    cert_path, key_path = m.need("cert", _absolute_file), m.need("key", _absolute_file)
    if cert_path is None or key_path is None or cert_field is None or key_field is None:
        return None
    try:
        chain_pem = cert_path.read_bytes()
        chain = x509.load_pem_x509_certificates(chain_pem)
    except (OSError, ValueError) as exc:
        cert_field.fail(f"{cert_path} is not a PEM certificate chain ({exc}); give the leaf first, then intermediates")
        return None
    try:
        key_pem = (credentials.read(key_path) + "\n").encode()  # refuses a key others may read
        key = serialization.load_pem_private_key(key_pem, password=None)
    except credentials.CredentialError as exc:
        key_field.fail(str(exc))
        return None
    except (ValueError, TypeError) as exc:
        key_field.fail(f"{key_path} is not an unencrypted PEM private key ({exc})")
        return None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        key_field.fail(f"{key_path} is not the key of the first certificate in {cert_path}")
        return None
    return IngressTls(cert_file=str(cert_path), key_file=str(key_path), chain_pem=chain_pem, key_pem=key_pem)


def _ingress_jwt(f: _Field) -> IngressJwt | None:
    m = f.mapping(("issuer", "audiences", "jwks", "required"))
    if m is None:
        return None
    issuer = m.need("issuer", _non_empty)
    audiences = m.need("audiences", lambda a: _distinct(a, _non_empty, "audience", at_least_one="audience"))
    jwks = m.need("jwks", _jwks)
    required = m.read("required", _Field.boolean, IngressJwt.required)
    if issuer is None or audiences is None or jwks is None:
        return None
    return IngressJwt(issuer=issuer, audiences=audiences, jwks_file=str(jwks[0]), jwks=jwks[1], required=required)


def _non_empty(f: _Field) -> str | None:
    value = f.string()
    if value == "":
        f.fail("must not be empty")
        return None
    return value


def _jwks(f: _Field) -> tuple[Path, str] | None:
    """(path, text) of a JSON Web Key Set file: {"keys": [{"kty": ...}, ...]} (public keys only)."""
    path = _absolute_file(f)
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
        doc = json.loads(text)
    except (OSError, ValueError) as exc:
        f.fail(f"{path} is not a JSON file: {exc}")
        return None
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list) or not keys or not all(isinstance(k, dict) and "kty" in k for k in keys):
        f.fail(f'{path} is not a JWKS: expected {{"keys": [{{"kty": ..., ...}}]}} with at least one key')
        return None
    private = [str(k.get("kid", i)) for i, k in enumerate(keys) if "d" in k]
    if private:
        f.fail(f"{path} holds private key material (key {', '.join(private)} has 'd'): publish only the public keys")
        return None
    return path, text
