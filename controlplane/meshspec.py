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

import ipaddress
import json
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from core import credentials
from core.loopspec import LoopSpec, read_loop
from core.specread import (
    Field,
    Mapping,
    Problem,
    SpecError,
    all_read,
    claim,
    compose,
    distinct,
    duration_within,
    matching,
    non_empty,
    percent,
    positive,
    reference,
    shorten,
    unknown,
)

SPEC_VERSION = 1


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
    loop: LoopSpec = field(default_factory=LoopSpec)  # alerts and actions (core/loopspec.py)

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
    """Validate YAML text as a mesh spec; raise SpecError naming every problem (core/specread)."""
    problems: list[Problem] = []
    root = compose(text, problems, "a mapping of version, mesh, entrypoint, services")
    spec = None if root is None else _mesh(Field(root, "", problems))
    if spec is None or problems:
        raise SpecError(source, sorted(problems, key=lambda p: p.line or 0))
    return spec


# --- durations --------------------------------------------------------------------

# Bounds of the durations that can hurt.  An SVID that lives seconds re-issues in a busy
# loop and takes the mesh down with the CA; one that lives years is a stolen key for years
# (Istio caps workload certificates at 90 days; we renew at half-life, so 30 days means a
# key older than 15 days is never in use).
SVID_LIFETIME = duration_within("1m", "720h")
CONNECT_TIMEOUT = duration_within("1ms", "5m")
REQUEST_TIMEOUT = duration_within("1ms", "24h")   # route timeout and per-try timeout
EJECTION_TIME = duration_within("1ms", "1h")      # outlier ejection base time
DETECTION_INTERVAL = duration_within("100ms", "1h")  # outlier sweeps: faster is a busy loop in Envoy
FAULT_DELAY = duration_within("1ms", "1h")


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


def _label(f: Field) -> str | None:
    """A DNS label: service, instance and subset names end up in cluster names and node ids."""
    rule = "lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters"
    return matching(f, _LABEL, "name", rule)



def _url_path(f: Field) -> str | None:
    value = f.string()
    if value is None or value.startswith("/"):
        return value
    f.fail(f"must start with '/', got '{shorten(value)}'")
    return None


def _regex(f: Field) -> str | None:
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



# --- the spec ---------------------------------------------------------------------


def _mesh(root: Field) -> MeshSpec | None:
    top = root.mapping(("version", "mesh", "entrypoint", "identity", "ingress", "services", "alerts", "actions"))
    if top is None:
        return None
    top.need("version", _version)
    name = top.need("mesh", _label)
    identity = top.read("identity", _identity, Identity())
    ingress = top.read("ingress", _ingress, Ingress())
    table = top.need("services", Field.mapping)
    declared = tuple(table.entries) if table and table.entries else None
    entrypoint = top.need("entrypoint", lambda e: reference(e, declared))
    services = None if table is None else _services(table)
    loop = read_loop(top, declared)
    if name is None or entrypoint is None or services is None or loop is None:
        return None
    return MeshSpec(name=name, services=services, entrypoint=entrypoint, identity=identity, ingress=ingress, loop=loop)


def _identity(f: Field) -> Identity | None:
    m = f.mapping(("trust_domain", "svid_lifetime"))
    if m is None:
        return None
    rule = "dot-separated lowercase labels, like 'greymesh.local' or 'prod.example.com'"
    trust_domain = m.read("trust_domain", lambda t: matching(t, _TRUST_DOMAIN, "trust domain", rule),
                          Identity.trust_domain)
    lifetime = m.read("svid_lifetime", SVID_LIFETIME, Identity.svid_lifetime_s)
    return Identity(trust_domain=trust_domain, svid_lifetime_s=lifetime)


def _version(f: Field) -> int | None:
    version = f.integer(0)
    if version is None or version == SPEC_VERSION:
        return version
    f.fail(f"unsupported version {version}: this greymesh reads version {SPEC_VERSION}")
    return None


def _services(table: Mapping) -> tuple[Service, ...] | None:
    if not table.entries:
        table.owner.fail("give at least one service")
        return None
    declared = tuple(table.entries)
    instance_names: dict[str, Field] = {}  # node ids: unique across the whole mesh
    services = all_read([_service(*entry, declared, instance_names) for entry in table.items()])
    return None if services is None else tuple(services)


def _service(
    name: str, key: Field, f: Field, declared: tuple[str, ...], instance_names: dict[str, Field]
) -> Service | None:
    valid_name = _label(key)
    m = f.mapping(("calls", "namespace", "tags", "authz", "instances", "connect_timeout", "circuit_breaker",
                   "outlier_detection", "routes"))
    if m is None:
        return None
    instances = m.need("instances", lambda i: i.each(lambda x: _instance(x, instance_names), at_least_one="instance"))
    subsets = None if instances is None else _subsets_of(instances)
    calls = m.read("calls", lambda c: distinct(c, lambda x: _callee(x, name, declared), "callee"), ())
    namespace = m.read("namespace", _label, Service.namespace)
    tags = m.read("tags", lambda t: distinct(t, _tag, "tag"), ())
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


def _tag(f: Field) -> str | None:
    return matching(f, _TAG, "tag", "lowercase letters, digits and ':._-', like 'pci' or 'gdpr-region:eu'")


def _authz(f: Field) -> bool | None:
    """The service's authorization stance; only `fail_open` so far."""
    m = f.mapping(("fail_open",))
    return None if m is None else m.read("fail_open", Field.boolean, Service.fail_open)


def _instance(f: Field, names: dict[str, Field]) -> Instance | None:
    m = f.mapping(("name", "subset"))
    if m is None:
        return None
    name = m.need("name", lambda n: claim(n, _label(n), names, "instance name"))
    given = m.get("subset")  # not read() with a default: a bad subset must not pose as "default"
    subset = Instance.subset if given is None else _label(given)
    return None if name is None or subset is None else Instance(name=name, subset=subset)


def _callee(f: Field, caller: str, declared: tuple[str, ...]) -> str | None:
    name = reference(f, declared)
    if name != caller:
        return name
    f.fail(f"{caller} cannot call itself")
    return None


def _circuit_breaker(f: Field) -> CircuitBreaker | None:
    m = f.mapping(("max_connections", "max_pending_requests", "max_requests", "max_retries"))
    if m is None:
        return None
    return CircuitBreaker(
        max_connections=m.read("max_connections", positive, CircuitBreaker.max_connections),
        max_pending_requests=m.read("max_pending_requests", positive, CircuitBreaker.max_pending_requests),
        max_requests=m.read("max_requests", positive, CircuitBreaker.max_requests),
        max_retries=m.read("max_retries", positive, CircuitBreaker.max_retries),
    )


def _outlier_detection(f: Field) -> OutlierDetection | None:
    m = f.mapping(("consecutive_5xx", "interval", "base_ejection_time", "max_ejection_percent"))
    if m is None:
        return None
    return OutlierDetection(
        consecutive_5xx=m.read("consecutive_5xx", positive, OutlierDetection.consecutive_5xx),
        interval_s=m.read("interval", DETECTION_INTERVAL, OutlierDetection.interval_s),
        base_ejection_time_s=m.read("base_ejection_time", EJECTION_TIME, OutlierDetection.base_ejection_time_s),
        max_ejection_percent=m.read(
            "max_ejection_percent", lambda p: p.integer(0, 100), OutlierDetection.max_ejection_percent
        ),
    )


# --- routes -----------------------------------------------------------------------


def _routes(f: Field, service: str, subsets: tuple[str, ...] | None) -> tuple[Route, ...] | None:
    names: dict[str, Field] = {}
    routes = f.each(lambda r: _route(r, service, subsets, names))
    return None if routes is None else tuple(routes)


def _route(f: Field, service: str, subsets: tuple[str, ...] | None, names: dict[str, Field]) -> Route | None:
    """One route; `subsets` is None when the service's instances are unreadable (split not checked)."""
    m = f.mapping(("name", "match", "split", "timeout", "retries", "fault"))
    if m is None:
        return None
    rule = "lowercase letters, digits, '-' and '_'"
    name = m.need("name", lambda n: claim(n, matching(n, _ROUTE_NAME, "route name", rule), names, "route name"))
    match = m.need("match", _match)
    given = m.get("split")
    split = _sole_subset(f, service, subsets) if given is None else _split(given, service, subsets)
    timeout = m.read("timeout", REQUEST_TIMEOUT, None)
    retries = m.read("retries", _retries, None)
    fault = m.read("fault", _fault, None)
    if name is None or match is None or split is None:
        return None
    return Route(name=name, match=match, split=split, timeout_s=timeout, retries=retries, fault=fault)


def _sole_subset(route: Field, service: str, subsets: tuple[str, ...] | None) -> tuple[tuple[str, int], ...] | None:
    """The split of a route that gives none: everything to the service's only subset."""
    if subsets is None:
        return None
    if len(subsets) == 1:
        return ((subsets[0], 100),)
    route.key("split").fail(f"service {service} has subsets {', '.join(subsets)}: give the route a split")
    return None


def _split(f: Field, service: str, subsets: tuple[str, ...] | None) -> tuple[tuple[str, int], ...] | None:
    m = f.mapping()
    if m is None:
        return None
    pairs = all_read([_weight(subset, key, value, service, subsets) for subset, key, value in m.items()])
    if pairs is None:
        return None
    total = sum(weight for _, weight in pairs)
    if total != 100:
        f.fail(f"weights sum to {total}; they must sum to exactly 100")
        return None
    return tuple(pairs)


def _weight(
    subset: str, key: Field, value: Field, service: str, subsets: tuple[str, ...] | None
) -> tuple[str, int] | None:
    weight = value.integer(0, 100)
    if subsets is not None and subset not in subsets:
        key.fail(f"no instance of {service} is in subset '{subset}'; its subsets are: {', '.join(subsets)}")
        return None
    return None if weight is None else (subset, weight)


def _match(f: Field) -> RouteMatch | None:
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


def _headers(f: Field) -> tuple[tuple[str, str], ...] | None:
    """Exact-match headers; names are case-insensitive in HTTP, so kept lowercase."""
    m = f.mapping()
    if m is None:
        return None
    seen: dict[str, Field] = {}
    pairs = all_read([_header(key, value, seen) for _, key, value in m.items()])
    return None if pairs is None else tuple(pairs)


def _header(key: Field, value: Field, seen: dict[str, Field]) -> tuple[str, str] | None:
    rule = "letters, digits and !#$%&'*+-.^_`|~ (':' first for a pseudo-header)"
    name = matching(key, _HEADER_NAME, "header name", rule)
    name = claim(key, None if name is None else name.lower(), seen, "header")
    text = value.string()
    return None if name is None or text is None else (name, text)


def _retries(f: Field) -> RetryPolicy | None:
    m = f.mapping(("attempts", "retry_on", "per_try_timeout"))
    if m is None:
        return None
    return RetryPolicy(
        attempts=m.read("attempts", lambda a: a.integer(0, 10), RetryPolicy.attempts),
        retry_on=m.read("retry_on", _retry_on, RetryPolicy.retry_on),
        per_try_timeout_s=m.read("per_try_timeout", REQUEST_TIMEOUT, RetryPolicy.per_try_timeout_s),
    )


def _retry_on(f: Field) -> tuple[str, ...] | None:
    return distinct(f, _retry_condition, "retry condition", at_least_one="retry condition")


def _retry_condition(f: Field) -> str | None:
    value = f.string()
    if value is None or value in _RETRY_ON:
        return value
    f.fail(unknown("retry condition", value, _RETRY_ON))
    return None


def _fault(f: Field) -> Fault | None:
    m = f.mapping(("delay", "abort"))
    if m is None:
        return None
    if not m.entries:
        f.fail("give a delay, an abort or both")
        return None
    return Fault(delay=m.read("delay", _fault_delay, None), abort=m.read("abort", _fault_abort, None))


def _fault_delay(f: Field) -> FaultDelay | None:
    m = f.mapping(("percent", "fixed"))
    if m is None:
        return None
    share, fixed = m.need("percent", percent), m.need("fixed", FAULT_DELAY)
    return None if share is None or fixed is None else FaultDelay(percent=share, fixed_delay_s=fixed)


def _fault_abort(f: Field) -> FaultAbort | None:
    m = f.mapping(("percent", "http_status"))
    if m is None:
        return None
    share, status = m.need("percent", percent), m.need("http_status", lambda s: s.integer(200, 599))
    return None if share is None or status is None else FaultAbort(percent=share, http_status=status)


# --- the ingress ------------------------------------------------------------------

_HOST_NAME = re.compile(r"(?=.{1,253}$)(\*\.)?[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*")


def _ingress(f: Field) -> Ingress | None:
    m = f.mapping(("hosts", "tls", "jwt"))
    if m is None:
        return None
    hosts = m.read("hosts", lambda h: distinct(h, _host, "host", at_least_one="host name"), Ingress.hosts)
    return Ingress(hosts=hosts, tls=m.read("tls", _ingress_tls, None), jwt=m.read("jwt", _ingress_jwt, None))


def _host(f: Field) -> str | None:
    """A DNS name (a leading '*.' allowed) or an IP address: what clients put in the URL."""
    value = f.string()
    if value is None:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    rule = "a lowercase DNS name like 'shop.example.com' (or '*.example.com'), or an IP address"
    return matching(f, _HOST_NAME, "host name", rule)


def _absolute_file(f: Field) -> Path | None:
    """A path to an existing file.  Absolute, because the control plane re-reads the spec
    from its own copy in the data dir, where a relative path would name another file."""
    value = f.string()
    if value is None:
        return None
    path = Path(value)
    if not path.is_absolute():
        f.fail(f"'{shorten(value)}' is relative: give an absolute path (the spec is also read from the data dir)")
        return None
    if not path.is_file():
        f.fail(f"no such file: {value}")
        return None
    return path


def _ingress_tls(f: Field) -> IngressTls | None:
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


def _ingress_jwt(f: Field) -> IngressJwt | None:
    m = f.mapping(("issuer", "audiences", "jwks", "required"))
    if m is None:
        return None
    issuer = m.need("issuer", non_empty)
    audiences = m.need("audiences", lambda a: distinct(a, non_empty, "audience", at_least_one="audience"))
    jwks = m.need("jwks", _jwks)
    required = m.read("required", Field.boolean, IngressJwt.required)
    if issuer is None or audiences is None or jwks is None:
        return None
    return IngressJwt(issuer=issuer, audiences=audiences, jwks_file=str(jwks[0]), jwks=jwks[1], required=required)



def _jwks(f: Field) -> tuple[Path, str] | None:
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
