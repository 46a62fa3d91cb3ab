"""The contracts between stages, defined once: topics, event schemas, roll-up columns, OPA paths.

Stages never import each other; what one produces and another consumes is named here.

**Tap events** (schema version :data:`VERSION`).  Every sidecar's audit taps become flat
events, one per *layer*:

    l7       one per HTTP request: method, path, status, latency, sizes, authz verdict, ...
    l4       one per connection: bytes each way, termination, TLS version, peer identity
    l3       one per connection: the flow (addresses, ports, duration); joins l4 on
             ``connection_id``
    audit    one per authorization decision, from OPA's decision logs
    anomaly  one when an anomaly opens and one when it resolves (:class:`AnomalyEvent`,
             emitted by the ml stage from the store's roll-ups)
    action   one per decision of the actions stage, acted on or not (:class:`ActionDecision`):
             the evidence of every automated change, shadowed move, hold and refusal

An event is a JSON object whose keys are exactly the names in :data:`COLUMNS` for its
layer; the same names and types are the store's columns (audit/migrations.py builds its
tables from :data:`COLUMNS`).  A change that renames, removes or re-types a field bumps
:data:`VERSION`; adding a field does not (but it needs a store migration that adds the
column to stores created before it).  Each layer has its Kafka topic (:func:`topic`),
keyed by service; records are JSON arrays of events.

**Roll-ups.** :data:`ROLLUP_FIELDS` are the numeric columns of the store's
``service_windows`` view (one row per service and :data:`WINDOW_SECONDS` window), which
the ml stage learns from.

**Alerts** go to :data:`ALERTS_TOPIC` (:class:`TapDropAlert` today).

**Overrides** (:class:`Override`) are what the actions stage asks the control plane to
merge over the spec (weights, timeouts, retries, outlier ejection), through its admin API
(``PUT /overrides/<service>``); they cross as JSON (:meth:`Override.to_json`,
:meth:`Override.from_json`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

VERSION = 1
Layer = Literal["l3", "l4", "l7", "audit", "anomaly", "action"]
LAYERS: tuple[Layer, ...] = ("l3", "l4", "l7", "audit", "anomaly", "action")
TOPIC_PREFIX = "greymesh.tap."
AUDIT_TOPIC = "greymesh.audit"
ANOMALY_TOPIC = "greymesh.anomalies"
ACTION_TOPIC = "greymesh.actions"
# The listener names the control plane gives each sidecar; a log's name is its listener's.
DIRECTIONS = ("inbound", "outbound", "ingress")
# Service, subset and instance names are DNS labels (controlplane/meshspec.py holds every
# spec to it): they become cluster names and node ids, and literals of the loop's SQL.
NAME_RULE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def outbound_cluster(service: str, subset: str) -> str:
    """The Envoy cluster through which callers' sidecars send to ``service``'s ``subset``
    (the control plane names them so); the l7 taps' ``upstream_cluster`` of those requests."""
    return f"outbound|{service}|{subset}"


# (name, ClickHouse type, meaning).  Types are ones both ClickHouse 18.16 and current
# ClickHouse know; times are microseconds since the epoch (18.16 has no DateTime64).
Column = tuple[str, str, str]
COMMON: tuple[Column, ...] = (
    ("v", "UInt8", "schema version"),
    ("event_id", "String", "stable id (32 hex digits); the deduplication key"),
    ("time_us", "UInt64", "request or connection start, microseconds since the epoch"),
    ("sidecar", "String", "the emitting sidecar (Envoy node id = instance name)"),
    ("service", "String", "the service the sidecar belongs to"),
    ("direction", "String", "inbound (served), outbound (called) or ingress (mesh entry)"),
)
_FLOW: tuple[Column, ...] = (
    ("src_addr", "String", "downstream peer address"),
    ("src_port", "UInt16", "downstream peer port"),
    ("dst_addr", "String", "local address the connection arrived on"),
    ("dst_port", "UInt16", "local port the connection arrived on"),
)
COLUMNS: dict[Layer, tuple[Column, ...]] = {
    "l7": COMMON + (
        ("method", "String", "HTTP method"),
        ("authority", "String", "Host / :authority"),
        ("path", "String", "request path without the query string (it may carry secrets)"),
        ("protocol", "String", "HTTP/1.0, HTTP/1.1, HTTP/2 or HTTP/3"),
        ("status", "UInt16", "response status (0: no response was sent)"),
        ("response_flags", "String", "Envoy's response flags, comma-separated short codes (UF,URX,...)"),
        ("duration_us", "UInt64", "request start to last byte sent downstream"),
        ("request_bytes", "UInt64", "request headers + body bytes"),
        ("response_bytes", "UInt64", "response headers + body bytes"),
        ("user_agent", "String", "User-Agent"),
        ("request_id", "String", "x-request-id"),
        ("trace_id", "String", "the trace id of a W3C traceparent or B3 header, if any"),
        ("upstream_host", "String", "address:port of the upstream that answered"),
        ("upstream_cluster", "String", "the Envoy cluster routed to"),
        ("peer", "String", "SPIFFE ID of the downstream peer's certificate ('' without mTLS)"),
        *_FLOW,
        ("authz", "String", "authorization verdict: allow, deny, or '' when not checked"),
        ("authz_reason", "String", "the policy's reason for the verdict"),
    ),
    "l4": COMMON + (
        ("connection_id", "String", "joins the l3 event of the same connection"),
        ("bytes_in", "UInt64", "bytes received from downstream"),
        ("bytes_out", "UInt64", "bytes sent to downstream"),
        ("upstream_host", "String", "address:port of the upstream (TCP proxying only)"),
        ("tls_version", "String", "TLSv1_2, TLSv1_3, or '' for plaintext"),
        ("peer", "String", "SPIFFE ID of the downstream peer's certificate ('' without mTLS)"),
        ("termination", "String", "Envoy's connection termination details"),
        ("transport_failure", "String", "downstream transport (TLS) failure reason"),
        ("response_flags", "String", "Envoy's response flags, comma-separated short codes"),
    ),
    "l3": COMMON + (
        ("connection_id", "String", "joins the l4 event of the same connection"),
        *_FLOW,
        ("duration_us", "UInt64", "connection open to close"),
    ),
    "audit": (
        ("v", "UInt8", "schema version"),
        ("event_id", "String", "OPA's decision id; the deduplication key"),
        ("time_us", "UInt64", "when OPA decided, microseconds since the epoch"),
        ("caller", "String", "SPIFFE ID of the caller ('' when it presented none)"),
        ("callee", "String", "SPIFFE ID of the callee"),
        ("method", "String", "HTTP method"),
        ("path", "String", "request path without the query string"),
        ("allow", "UInt8", "1 allowed, 0 denied"),
        ("reason", "String", "the policy's reason"),
        ("policy_hash", "String", "sha256 of the policy that decided"),
    ),
    "anomaly": (
        ("v", "UInt8", "schema version"),
        ("event_id", "String", "anomaly id + state; the deduplication key"),
        ("time_us", "UInt64", "start of the window that opened or resolved it, microseconds since the epoch"),
        ("service", "String", "the service whose telemetry is anomalous"),
        ("anomaly_id", "String", "the same on an anomaly's open and resolved events"),
        ("state", "String", "open (raised) or resolved"),
        ("window", "UInt32", "that window's start, Unix seconds"),
        ("score", "Float64", "the detector's score of that window (higher is more anomalous)"),
        ("threshold", "Float64", "the service's fitted threshold"),
        ("peak_score", "Float64", "the highest score since it opened"),
        ("windows", "UInt32", "windows since it opened, that one included"),
        ("explanation", "String", "what a person reads: the features that make up the score"),
        ("causes", "String", "the same as JSON: [{feature, share, value, normal}]"),
        ("detector", "String", "gru_ae, iforest or pca"),
        ("model_version", "String", "the registry version that scored it"),
    ),
    "action": (
        ("v", "UInt8", "schema version"),
        ("event_id", "String", "the decision id; the deduplication key (and what `actions revert` takes)"),
        ("time_us", "UInt64", "when the decision was taken, microseconds since the epoch"),
        ("service", "String", "the service acted on (the callee whose traffic policy changes, or the scaled one)"),
        ("anomaly_id", "String", "the anomaly that prompted it ('' for a restore, a revert or a blind loop)"),
        ("action", "String", "shift_weight, restore_weight, scale_out, scale_in, revert, alert or none"),
        ("outcome", "String", "acted, shadowed (mode shadow: would have), held (verdict unknown), "
                               "refused (a guardrail), failed (the change did not go through), or noted"),
        ("verdict", "String", "the canary judge's pass, fail or unknown ('' when none was asked)"),
        ("guardrail", "String", "the guardrail that held or refused it ('' when none applied)"),
        ("mode", "String", "the service's mode then: off, shadow or on"),
        ("before", "String", "JSON: the state it changed from (weights, instances)"),
        ("after", "String", "JSON: the state it changed, or would have changed, to"),
        ("override_id", "String", "the control plane override it created or changed ('' for none)"),
        ("evidence", "String", "JSON: scores, thresholds, windows, test statistics, samples, budgets"),
        ("reason", "String", "what a person reads: why, in one sentence"),
        ("by", "String", "who decided: 'actions' (the loop) or the principal of a CLI command"),
    ),
}
NAMES: dict[Layer, tuple[str, ...]] = {layer: tuple(c[0] for c in cols) for layer, cols in COLUMNS.items()}

# Flags that mean a stream was reset rather than answered.  Not DC: an HTTP/1 client
# that closes its connection right after a complete response is flagged DC, too.
# The store's roll-up counts these (audit/migrations.py): a change needs a new migration.
RESET_FLAGS = frozenset({"LR", "UR", "UF", "UC", "DR", "UPE", "DPE"})

ALERTS_TOPIC = "greymesh.alerts"

# The per-service roll-up's numeric columns (service_windows, audit/migrations.py), in the
# order ml/features.py derives its vector from.
ROLLUP_FIELDS: tuple[str, ...] = (
    "requests", "errors_4xx", "errors_5xx", "resets", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms",
    "bytes_in", "bytes_out", "distinct_callers", "authz_denials",
)
WINDOW_SECONDS = 10

# OPA: the rule the authorization bridge asks (also the `path` of its decision-log
# entries), the mesh data the control plane keeps in sync, and the file name of the bundle
# a push gives OPA (its manifest's revision is the sha256 of the pushed modules).
DECISION_PATH = "greymesh/authz/decision"
MESH_DATA_PATH = "greymesh/mesh"
POLICY_BUNDLE_FILE = "greymesh-policy.tar.gz"


def policy_hash_of(bundles: object) -> str:
    """The hash of the policy that made a decision: the revision of the policy bundle among
    the ``bundles`` OPA reports with it (``{name: {"revision": ...}}``, a name being the
    bundle's path); "" when OPA ran none.  OPA sets it from what it loaded, so no rule of
    the policy can change it.  ValueError when ``bundles`` is not of that shape."""
    if bundles is None:
        return ""
    if not isinstance(bundles, dict):
        raise ValueError(f"bundles: {type(bundles).__name__}, not an object")
    for name, info in bundles.items():
        if str(name).rsplit("/", 1)[-1] == POLICY_BUNDLE_FILE:
            revision = info.get("revision", "") if isinstance(info, dict) else None
            if not isinstance(revision, str):
                raise ValueError(f"bundles.{name}.revision: not a string")
            return revision
    return ""


def topic(layer: Layer) -> str:
    """The Kafka topic of a layer's events."""
    return {"audit": AUDIT_TOPIC, "anomaly": ANOMALY_TOPIC, "action": ACTION_TOPIC}.get(layer, TOPIC_PREFIX + layer)


def layer_of_topic(name: str) -> Layer:
    """The layer whose events ``name`` carries; ValueError for a topic that is not a tap's."""
    for layer in LAYERS:
        if topic(layer) == name:
            return layer
    raise ValueError(f"{name!r} is not a greymesh tap topic (expected one of {[topic(x) for x in LAYERS]})")


@dataclass(frozen=True)
class AnomalyEvent:
    """An anomaly's open or resolved event (layer ``anomaly``; fields = COLUMNS["anomaly"])."""

    v: int
    event_id: str
    time_us: int
    service: str
    anomaly_id: str
    state: Literal["open", "resolved"]
    window: int
    score: float
    threshold: float
    peak_score: float
    windows: int
    explanation: str
    causes: str  # JSON: [{feature, share, value, normal}]
    detector: str
    model_version: str

    def to_event(self) -> dict[str, Any]:
        return asdict(self)


Outcome = Literal["acted", "shadowed", "held", "refused", "failed", "noted"]


@dataclass(frozen=True)
class ActionDecision:
    """One decision of the actions stage (layer ``action``; fields = COLUMNS["action"])."""

    v: int
    event_id: str
    time_us: int
    service: str
    anomaly_id: str
    action: str
    outcome: Outcome
    verdict: str
    guardrail: str
    mode: str
    before: str  # JSON
    after: str  # JSON
    override_id: str
    evidence: str  # JSON
    reason: str
    by: str

    def to_event(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Override:
    """A change the actions stage (or an operator) asks the control plane to merge over the
    spec for one service's callers: at most one per service, replaced whole by the next.

    ``weights`` replaces the split of every route of ``service`` that splits over those
    subsets; ``timeout_s`` / ``retry_attempts`` replace those of every route;
    ``outlier_max_ejection_percent`` / ``outlier_consecutive_5xx`` tighten its outlier
    detection.  ``None`` / ``()`` leave the spec's value.  ``by`` is set by the control plane
    from the credential that sent it, never taken from the request.
    """

    service: str
    id: str  # the decision that made it (ActionDecision.event_id), or an operator's label
    reason: str
    weights: tuple[tuple[str, int], ...] = ()  # (subset, weight) pairs summing to 100
    timeout_s: float | None = None
    retry_attempts: int | None = None
    outlier_consecutive_5xx: int | None = None
    outlier_max_ejection_percent: int | None = None
    by: str = ""
    created_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["weights"] = dict(self.weights)
        return doc

    @classmethod
    def from_json(cls, doc: object) -> Override:
        """An Override from its JSON; ValueError naming the field and what it must be."""
        if not isinstance(doc, dict):
            raise ValueError("an override is a JSON object: {\"service\": ..., \"id\": ..., \"reason\": ...}")
        unknown = set(doc) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        for name in ("service", "id", "reason", "by"):
            if not isinstance(doc.get(name, ""), str) or (name != "by" and not doc.get(name)):
                raise ValueError(f"{name}: must be a non-empty string")
        weights = doc.get("weights") or {}
        if not isinstance(weights, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 100
                for k, v in weights.items()):
            raise ValueError("weights: must map subset names to integers 0..100")
        if weights and sum(weights.values()) != 100:
            raise ValueError(f"weights: must sum to 100, not {sum(weights.values())}")

        def optional(name: str, kind: type, low: float, high: float) -> Any:
            value = doc.get(name)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) \
                    or not low <= value <= high:
                raise ValueError(f"{name}: must be a {kind.__name__} in {low}..{high}, not {value!r}")
            return kind(value)

        return cls(service=doc["service"], id=doc["id"], reason=doc["reason"],
                   weights=tuple((str(k), int(v)) for k, v in weights.items()),
                   timeout_s=optional("timeout_s", float, 0.001, 3600.0),
                   retry_attempts=optional("retry_attempts", int, 0, 10),
                   outlier_consecutive_5xx=optional("outlier_consecutive_5xx", int, 1, 1000),
                   outlier_max_ejection_percent=optional("outlier_max_ejection_percent", int, 0, 100),
                   by=doc.get("by", ""), created_at=optional("created_at", float, 0, 1e12) or 0.0)


@dataclass(frozen=True)
class ServiceRouting:
    """What the control plane's ``GET /overrides`` reports per service with subsets: the
    split the spec declares, the split in force (the override merged), the override, and
    the services whose sidecars carry that split (its callers)."""

    service: str
    subsets: tuple[str, ...]  # subsets that have instances
    instances: tuple[tuple[str, int], ...]  # (subset, serving instances)
    callers: tuple[str, ...]
    declared: tuple[tuple[str, int], ...]  # the spec's split of its first route ((subset, weight))
    effective: tuple[tuple[str, int], ...]  # ... with the override merged
    override: Override | None = None

    def to_json(self) -> dict[str, Any]:
        return {"service": self.service, "subsets": list(self.subsets), "instances": dict(self.instances),
                "callers": list(self.callers), "declared": dict(self.declared), "effective": dict(self.effective),
                "override": self.override.to_json() if self.override else None}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ServiceRouting:
        try:
            return cls(service=doc["service"], subsets=tuple(doc["subsets"]),
                       instances=tuple((str(k), int(v)) for k, v in doc["instances"].items()),
                       callers=tuple(doc["callers"]),
                       declared=tuple((str(k), int(v)) for k, v in doc["declared"].items()),
                       effective=tuple((str(k), int(v)) for k, v in doc["effective"].items()),
                       override=Override.from_json(doc["override"]) if doc.get("override") else None)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a service routing document: {exc!r}") from None


@dataclass(frozen=True)
class TapDropAlert:
    """The tap spool of a host was full and dropped events (on ALERTS_TOPIC, keyed by host)."""

    host: str
    time_us: int
    since_us: int
    dropped_records: int
    dropped_events: int
    message: str
    v: int = 1
    kind: str = "tap_drop"
    severity: str = "critical"

    def to_event(self) -> dict[str, Any]:
        return asdict(self)


assert tuple(f.name for f in fields(AnomalyEvent)) == NAMES["anomaly"], "AnomalyEvent must match COLUMNS"
assert tuple(f.name for f in fields(ActionDecision)) == NAMES["action"], "ActionDecision must match COLUMNS"
