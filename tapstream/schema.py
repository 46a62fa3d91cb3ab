"""The tap event schema (version 1): what every sidecar's audit taps become.

Envoy reports to the collector over its gRPC Access Log Service: one ``HTTPAccessLogEntry``
per request (the HTTP connection manager's logger) and one ``TCPAccessLogEntry`` per
closed downstream connection (the listener's logger).  Each entry becomes flat events,
one per *layer*:

    l7     one per HTTP request: method, path, status, latency, sizes, authz verdict, ...
    l4     one per connection: bytes each way, termination, TLS version, peer identity
    l3     one per connection: the flow (addresses, ports, duration); joins l4 on
           ``connection_id``
    audit  one per authorization decision, from OPA's decision logs
           (tapstream.decisionlog.AuditRecord; its ``decision_id`` is the event id)

and one more that the ml stage emits from the store's roll-ups, so that it reaches the
store the same way (Kafka -> sink) and is tailed the same way (``greymesh taps tail``):

    anomaly  one when an anomaly opens and one when it resolves (ml/scorer.py), on
             ``greymesh.anomalies``

An event is a JSON object whose keys are exactly the names in :data:`COLUMNS` for its
layer, plus the common ones; the same names and types are the store's columns
(audit/migrations.py builds its tables from :data:`COLUMNS`), so the schema is defined
once, here.  Versioning: ``v`` is :data:`VERSION`; a change that renames, removes or
re-types a field bumps it, adding a field does not (but it needs a store migration
that adds the column to stores created before it).

``event_id`` is stable: derived from the emitting sidecar, its listener and the entry's
own identity (stream id, start time, downstream peer), so the same entry always gets the
same id, wherever it is retried or replayed; the store deduplicates on it.

Envoy does not report packet counts in access logs, so there is no packets field; the
byte counts are the application bytes each way (``ConnectionProperties``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any, Literal

from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2

VERSION = 1
Layer = Literal["l3", "l4", "l7", "audit", "anomaly"]
LAYERS: tuple[Layer, ...] = ("l3", "l4", "l7", "audit", "anomaly")
TOPIC_PREFIX = "greymesh.tap."
AUDIT_TOPIC = "greymesh.audit"
ANOMALY_TOPIC = "greymesh.anomalies"
# The listener names the controlplane gives each sidecar; a log's name is its listener's.
DIRECTIONS = ("inbound", "outbound", "ingress")

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
}
NAMES: dict[Layer, tuple[str, ...]] = {layer: tuple(c[0] for c in cols) for layer, cols in COLUMNS.items()}

# The ext_authz filter publishes the bridge's verdict under its own metadata namespace.
AUTHZ_METADATA = "envoy.filters.http.ext_authz"

# Envoy's short response-flag codes, by ResponseFlags field.
_FLAG_CODES = (
    ("failed_local_healthcheck", "LH"), ("no_healthy_upstream", "UH"),
    ("upstream_request_timeout", "UT"), ("local_reset", "LR"),
    ("upstream_remote_reset", "UR"), ("upstream_connection_failure", "UF"),
    ("upstream_connection_termination", "UC"), ("upstream_overflow", "UO"),
    ("no_route_found", "NR"), ("delay_injected", "DI"), ("fault_injected", "FI"),
    ("rate_limited", "RL"), ("rate_limit_service_error", "RLSE"),
    ("downstream_connection_termination", "DC"), ("upstream_retry_limit_exceeded", "URX"),
    ("stream_idle_timeout", "SI"), ("invalid_envoy_request_headers", "IH"),
    ("downstream_protocol_error", "DPE"), ("upstream_max_stream_duration_reached", "UMSDR"),
    ("response_from_cache_filter", "RFCF"), ("no_filter_config_found", "NFCF"),
    ("duration_timeout", "DT"), ("upstream_protocol_error", "UPE"), ("no_cluster_found", "NC"),
    ("overload_manager", "OM"), ("dns_resolution_failure", "DF"), ("downstream_remote_reset", "DR"),
)
_FLAG_BY_FIELD = dict(_FLAG_CODES) | {"unauthorized_details": "UAEX"}
# Flags that mean a stream was reset rather than answered.  Not DC: an HTTP/1 client
# that closes its connection right after a complete response is flagged DC, too.
# The store's roll-up counts these (audit/migrations.py): a change needs a new migration.
RESET_FLAGS = frozenset({"LR", "UR", "UF", "UC", "DR", "UPE", "DPE"})
_METHODS = {n: name for name, n in base_pb2.RequestMethod.items() if n}
_PROTOCOLS = {1: "HTTP/1.0", 2: "HTTP/1.1", 3: "HTTP/2", 4: "HTTP/3"}
_TLS_VERSIONS = {1: "TLSv1", 2: "TLSv1_1", 3: "TLSv1_2", 4: "TLSv1_3"}


def topic(layer: Layer) -> str:
    """The Kafka topic of a layer's events."""
    return {"audit": AUDIT_TOPIC, "anomaly": ANOMALY_TOPIC}.get(layer, TOPIC_PREFIX + layer)


def layer_of_topic(name: str) -> Layer:
    """The layer whose events ``name`` carries; ValueError for a topic that is not a tap's."""
    for layer in LAYERS:
        if topic(layer) == name:
            return layer
    raise ValueError(f"{name!r} is not a greymesh tap topic (expected one of {[topic(x) for x in LAYERS]})")


class Source:
    """Who emitted a stream of entries: the ALS stream's identifier, resolved once.

    ``node`` is the Envoy node id (the instance), ``service`` its cluster, ``log_name`` the
    listener whose logger sent the entries.
    """

    __slots__ = ("sidecar", "service", "direction", "_id_prefix")

    def __init__(self, node: str, service: str, log_name: str):
        self.sidecar = node
        self.service = service
        self.direction = log_name if log_name in DIRECTIONS else log_name or "unknown"
        self._id_prefix = f"{node}|{log_name}|".encode()

    def event_id(self, layer: str, stream_id: str, start_us: int, peer_addr: str, peer_port: int) -> str:
        """A stable 32-hex-digit id from this source and the entry's identity."""
        key = f"{layer}|{stream_id}|{start_us}|{peer_addr}|{peer_port}".encode()
        return hashlib.blake2b(self._id_prefix + key, digest_size=16).hexdigest()


def http_event(src: Source, entry: accesslog_pb2.HTTPAccessLogEntry) -> dict[str, Any]:
    """The l7 event of one HTTP access log entry."""
    # Each protobuf attribute access costs; every field is read once (the collector's hot path).
    common = entry.common_properties
    req = entry.request
    resp = entry.response
    start = common.start_time
    start_us = start.seconds * 1_000_000 + start.nanos // 1000
    remote = common.downstream_remote_address.socket_address
    src_addr, src_port = remote.address, remote.port_value
    local = common.downstream_local_address.socket_address
    ttl = common.time_to_last_downstream_tx_byte
    duration = ttl if ttl.seconds or ttl.nanos else common.duration
    request_id = req.request_id
    authz, reason = _authz(common)
    return {
        "v": VERSION,
        "event_id": src.event_id("l7", common.stream_id or request_id, start_us, src_addr, src_port),
        "time_us": start_us,
        "sidecar": src.sidecar,
        "service": src.service,
        "direction": src.direction,
        "method": _METHODS.get(req.request_method, ""),
        "authority": req.authority,
        "path": req.path.partition("?")[0],
        "protocol": _PROTOCOLS.get(entry.protocol_version, ""),
        "status": resp.response_code.value,
        "response_flags": response_flags(common),
        "duration_us": duration.seconds * 1_000_000 + duration.nanos // 1000,
        "request_bytes": req.request_headers_bytes + req.request_body_bytes,
        "response_bytes": resp.response_headers_bytes + resp.response_body_bytes,
        "user_agent": req.user_agent,
        "request_id": request_id,
        "trace_id": trace_id(req.request_headers),
        "upstream_host": _host(common.upstream_remote_address.socket_address),
        "upstream_cluster": common.upstream_cluster,
        "peer": _peer(common),
        "src_addr": src_addr,
        "src_port": src_port,
        "dst_addr": local.address,
        "dst_port": local.port_value,
        "authz": authz,
        "authz_reason": reason,
    }


def tcp_events(src: Source, entry: accesslog_pb2.TCPAccessLogEntry) -> tuple[dict[str, Any], dict[str, Any]]:
    """The l3 and l4 events of one connection's access log entry."""
    common = entry.common_properties
    start_us = _micros(common.start_time)
    remote = common.downstream_remote_address.socket_address
    local = common.downstream_local_address.socket_address
    identity = (common.stream_id, start_us, remote.address, remote.port_value)
    connection_id = src.event_id("conn", *identity)
    base = {"v": VERSION, "time_us": start_us, "sidecar": src.sidecar, "service": src.service,
            "direction": src.direction, "connection_id": connection_id}
    tls = common.tls_properties
    l3 = base | {
        "event_id": src.event_id("l3", *identity),
        "src_addr": remote.address,
        "src_port": remote.port_value,
        "dst_addr": local.address,
        "dst_port": local.port_value,
        "duration_us": common.duration.seconds * 1_000_000 + common.duration.nanos // 1000,
    }
    l4 = base | {
        "event_id": src.event_id("l4", *identity),
        "bytes_in": entry.connection_properties.received_bytes,
        "bytes_out": entry.connection_properties.sent_bytes,
        "upstream_host": _host(common.upstream_remote_address.socket_address),
        "tls_version": _TLS_VERSIONS.get(tls.tls_version, ""),
        "peer": _peer(common),
        "termination": common.connection_termination_details,
        "transport_failure": common.downstream_transport_failure_reason,
        "response_flags": response_flags(common),
    }
    return l3, l4


def events(src: Source, http_logs: Any, tcp_logs: Any) -> Iterator[tuple[Layer, dict[str, Any]]]:
    """Every event of one ALS message's entries, with its layer."""
    for entry in http_logs:
        yield "l7", http_event(src, entry)
    for entry in tcp_logs:
        l3, l4 = tcp_events(src, entry)
        yield "l3", l3
        yield "l4", l4


def response_flags(common: accesslog_pb2.AccessLogCommon) -> str:
    """Envoy's short codes for the flags set on an entry, comma-separated ('' for none)."""
    if not common.HasField("response_flags"):
        return ""
    return ",".join(_FLAG_BY_FIELD[field.name] for field, value in common.response_flags.ListFields() if value)


def trace_id(headers: Any) -> str:
    """The trace id from a W3C ``traceparent`` (version-traceid-spanid-flags) or B3 header."""
    if not headers:
        return ""
    traceparent = headers.get("traceparent", "")
    if traceparent.count("-") >= 3:
        return traceparent.split("-")[1]
    return headers.get("x-b3-traceid", "")


def _authz(common: accesslog_pb2.AccessLogCommon) -> tuple[str, str]:
    """The verdict and reason the authorization bridge attached as dynamic metadata;
    a request Envoy rejected as unauthorized without it still reads as a deny."""
    if not common.HasField("metadata"):
        return ("deny", "unauthorized (no verdict metadata)") if _unauthorized(common) else ("", "")
    meta = common.metadata.filter_metadata
    if AUTHZ_METADATA in meta:
        fields = meta[AUTHZ_METADATA].fields
        if "allow" in fields:
            verdict = "allow" if fields["allow"].bool_value else "deny"
            return verdict, fields["reason"].string_value if "reason" in fields else ""
    if _unauthorized(common):
        return "deny", "unauthorized (no verdict metadata)"
    return "", ""


def _unauthorized(common: accesslog_pb2.AccessLogCommon) -> bool:
    return common.HasField("response_flags") and common.response_flags.HasField("unauthorized_details")


def _peer(common: accesslog_pb2.AccessLogCommon) -> str:
    if not common.HasField("tls_properties"):
        return ""
    for san in common.tls_properties.peer_certificate_properties.subject_alt_name:
        if san.uri:
            return san.uri
    return ""


def _host(addr: Any) -> str:
    return f"{addr.address}:{addr.port_value}" if addr.address else ""


def _micros(ts: Any) -> int:
    return ts.seconds * 1_000_000 + ts.nanos // 1000
