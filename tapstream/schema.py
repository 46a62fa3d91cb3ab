"""Envoy's access-log entries -> tap events (core.contracts.COLUMNS, version core.contracts.VERSION).

Envoy reports to the collector over its gRPC Access Log Service: one ``HTTPAccessLogEntry``
per request (the HTTP connection manager's logger) and one ``TCPAccessLogEntry`` per
closed downstream connection (the listener's logger).  Each entry becomes flat events,
one per layer: ``l7`` for the request, ``l4`` and ``l3`` for the connection.  The
schema itself, its topics and the other layers (``audit``, ``anomaly``) are contracts
between stages and live in core/contracts.py.

``event_id`` is stable: derived from the emitting sidecar, its listener and the entry's
own identity (stream id, start time, downstream peer), so the same entry always gets the
same id, wherever it is retried or replayed; the store deduplicates on it.

Envoy does not report packet counts in access logs, so there is no packets field; the
byte counts are the application bytes each way (``ConnectionProperties``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2

from core.contracts import DIRECTIONS, VERSION, Layer

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
_METHODS = {n: name for name, n in base_pb2.RequestMethod.items() if n}
_PROTOCOLS = {1: "HTTP/1.0", 2: "HTTP/1.1", 3: "HTTP/2", 4: "HTTP/3"}
_TLS_VERSIONS = {1: "TLSv1", 2: "TLSv1_1", 3: "TLSv1_2", 4: "TLSv1_3"}


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
