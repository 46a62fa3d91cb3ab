"""The tap collector: Envoy's gRPC Access Log Service in, tap events out to Kafka.

Every sidecar streams ``StreamAccessLogsMessage``s (envoy.service.accesslog.v3): the
first message of a stream names the node and the logger (our listener name), later ones
only carry entries.  The collector turns each message into events (tapstream.schema) and
publishes them as few, large records: one per message and layer, a JSON array of events,
keyed by the emitting service.  Envoy already batches a second or 16 KiB of entries into
one message, and a record per batch instead of per event is what makes the pipe fast.

Every stream must prove which sidecar sends it (:mod:`core.sidecar_auth`, the ``als``
purpose): its events are attributed to the node and service of that credential, never to
the node the stream's identifier claims, and a stream without a valid credential, or whose
identifier names another node, is refused before anything of it is published.  Streams
hold a thread each, so they are bounded: at most ``max_streams_per_node`` per sidecar, a
first message within ``first_message_s`` and none idle for longer than ``idle_s`` (Envoy
opens a new stream at its next flush).

The service is registered as a generic handler that receives raw bytes, so a message
that is too large or does not parse is counted and skipped here instead of failing the
stream inside grpc, where no one would see it.  Collectors hold no state beyond open
streams: run one per host, or as many as the load needs behind a gRPC load balancer.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf.message import DecodeError

from core import contracts
from core.sidecar_auth import METADATA_KEY, Authenticator, SidecarIdentity
from tapstream import schema

log = logging.getLogger("greymesh.tapstream")

SERVICE = "envoy.service.accesslog.v3.AccessLogService"
METHOD = "StreamAccessLogs"
# Envoy flushes its buffer at 16 KiB by default; anything far beyond that is not a sidecar's.
MAX_MESSAGE_BYTES = 4 << 20
# Events per Kafka record: keeps a record well under the broker's 1 MiB default limit
# (an l7 event is ~700 bytes of JSON).
MAX_EVENTS_PER_RECORD = 500
# A sidecar opens one stream per listener and logger kind (at most 6 with an ingress), plus
# an overlap while a broken stream is replaced.
MAX_STREAMS_PER_NODE = 12
FIRST_MESSAGE_S = 10.0  # Envoy opens a stream to send a flush: its first message follows at once
IDLE_S = 300.0  # a quiet sidecar's stream is closed; its next flush opens a new one


class Publisher(Protocol):
    """Where records go (tapstream.producer.TapProducer in production)."""

    def send(self, topic: str, key: str, value: bytes, events: int = 1) -> None: ...


@dataclass
class CollectorStats:
    streams: int = 0  # ALS streams opened since start
    messages: int = 0  # messages turned into events
    events: dict[str, int] = field(default_factory=lambda: {layer: 0 for layer in contracts.LAYERS[:3]})
    malformed: int = 0  # messages skipped: not a StreamAccessLogsMessage, or entries before an identifier
    oversized: int = 0  # messages skipped: larger than MAX_MESSAGE_BYTES
    unauthenticated: int = 0  # streams refused: no valid sidecar credential
    impersonating: int = 0  # streams refused: the identifier names another node than the credential
    over_node_cap: int = 0  # streams refused: the sidecar already had max_streams_per_node open
    idle_closed: int = 0  # streams closed: no first message in time, or idle too long
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(self).items()
                    if not k.startswith("_")}


class Impersonation(Exception):
    """A stream's identifier names another node than the sidecar its credential proves."""


@dataclass(eq=False)
class _Open:
    """One open stream, as the idle reaper sees it."""

    who: SidecarIdentity
    context: grpc.ServicerContext
    opened: float
    last: float | None = None  # when its latest message arrived (monotonic)


class Collector:
    """Converts the ALS messages of authenticated sidecars into tap events and hands them to ``publisher``."""

    def __init__(self, publisher: Publisher, authenticator: Authenticator, *,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, max_streams_per_node: int = MAX_STREAMS_PER_NODE,
                 first_message_s: float = FIRST_MESSAGE_S, idle_s: float = IDLE_S):
        self.publisher, self.authenticator = publisher, authenticator
        self.max_message_bytes = max_message_bytes
        self.max_streams_per_node = max_streams_per_node
        self.first_message_s, self.idle_s = first_message_s, idle_s
        self.stats = CollectorStats()
        self._open: set[_Open] = set()  # guarded by stats._lock

    def handle_stream(self, who: SidecarIdentity, messages: Iterator[bytes]) -> None:
        """Consume the stream of serialized messages sidecar ``who`` sends until it ends;
        Impersonation if it claims to be another node."""
        with self.stats._lock:
            self.stats.streams += 1
        source: schema.Source | None = None
        for raw in messages:
            source = self.handle_message(raw, source, who)

    def handle_message(self, raw: bytes, source: schema.Source | None,
                       who: SidecarIdentity) -> schema.Source | None:
        """Publish the events of one serialized message of sidecar ``who``; returns the stream's
        source (the credential's node and service, the log name of the stream's first message),
        which the next message needs.  Impersonation (nothing published) if the message's
        identifier names another node than ``who``."""
        if len(raw) > self.max_message_bytes:
            self._skip("oversized", f"{len(raw)} bytes > {self.max_message_bytes}")
            return source
        try:
            msg = als_pb2.StreamAccessLogsMessage.FromString(raw)
        except DecodeError as exc:
            self._skip("malformed", f"not a StreamAccessLogsMessage: {exc}")
            return source
        if msg.HasField("identifier"):
            claimed = msg.identifier.node.id
            if claimed and claimed != who.node:
                with self.stats._lock:
                    self.stats.impersonating += 1
                raise Impersonation(f"the credential is node {who.node!r}'s; the stream says it is {claimed!r}")
            source = schema.Source(who.node, who.service, msg.identifier.log_name)
        if source is None:
            self._skip("malformed", "entries before the stream's identifier")
            return None
        self.publish(source, msg)
        return source

    def publish(self, source: schema.Source, msg: als_pb2.StreamAccessLogsMessage) -> None:
        by_layer: dict[str, list[dict[str, Any]]] = {}
        for layer, event in schema.events(source, msg.http_logs.log_entry, msg.tcp_logs.log_entry):
            by_layer.setdefault(layer, []).append(event)
        for layer, events in by_layer.items():
            topic = contracts.topic(layer)  # type: ignore[arg-type]
            for i in range(0, len(events), MAX_EVENTS_PER_RECORD):
                chunk = events[i:i + MAX_EVENTS_PER_RECORD]
                self.publisher.send(topic, source.service, json.dumps(chunk, separators=(",", ":")).encode(),
                                    events=len(chunk))
        with self.stats._lock:
            self.stats.messages += 1
            for layer, events in by_layer.items():
                self.stats.events[layer] += len(events)

    def _skip(self, kind: str, why: str) -> None:
        self._count(kind, f"ALS message skipped: {why}")

    def _count(self, kind: str, what: str) -> None:
        """Count one ``kind`` of trouble in the stats; log the 1st, 2nd, 4th, 8th, ...: visible, never a flood."""
        with self.stats._lock:
            setattr(self.stats, kind, getattr(self.stats, kind) + 1)
            n = getattr(self.stats, kind)
        if n & (n - 1) == 0:
            log.warning("%s (%s, %d so far)", what, kind, n)

    def grpc_handler(self) -> grpc.GenericRpcHandler:
        """The AccessLogService, taking raw bytes (no deserializer) so parsing is ours."""

        def stream_access_logs(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
            # Checked before a message is read: a refused stream holds its thread for microseconds.
            who = self.authenticator.authenticate(context.invocation_metadata())
            if who is None:
                self._refuse("unauthenticated", f"ALS stream from {context.peer()}: no valid sidecar credential")
                context.abort(grpc.StatusCode.UNAUTHENTICATED,
                              f"a sidecar credential is required ({METADATA_KEY}: Bearer <token> metadata)")
            stream = self._admit(who, context)
            if stream is None:
                self._refuse("over_node_cap", f"ALS stream of {who.node}: {self.max_streams_per_node} already open")
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"node {who.node} already has {self.max_streams_per_node} access-log streams open")
            try:
                self.handle_stream(who, self._watched(requests, stream))
            except Impersonation as exc:
                log.warning("refused the ALS stream of %s from %s: %s", who.node, context.peer(), exc)
                context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
            except grpc.RpcError:
                pass  # the client went away, or the reaper cancelled the stream
            finally:
                with self.stats._lock:
                    self._open.discard(stream)
            return b""  # an empty StreamAccessLogsResponse

        return grpc.method_handlers_generic_handler(
            SERVICE, {METHOD: grpc.stream_unary_rpc_method_handler(stream_access_logs)}
        )


    def _admit(self, who: SidecarIdentity, context: grpc.ServicerContext) -> _Open | None:
        """Register a stream of ``who``; None if that sidecar already has its cap of open streams."""
        with self.stats._lock:
            if sum(1 for s in self._open if s.who.node == who.node) >= self.max_streams_per_node:
                return None
            stream = _Open(who, context, time.monotonic())
            self._open.add(stream)
            return stream

    def _watched(self, requests: Iterator[bytes], stream: _Open) -> Iterator[bytes]:
        for raw in requests:
            stream.last = time.monotonic()
            yield raw

    def reap(self, now: float | None = None) -> int:
        """Cancel the streams that sent no first message within first_message_s, or nothing for
        idle_s; returns how many.  serve() runs it every second."""
        now = time.monotonic() if now is None else now
        with self.stats._lock:
            idle = [s for s in self._open
                    if (now - s.opened > self.first_message_s if s.last is None else now - s.last > self.idle_s)]
            self.stats.idle_closed += len(idle)
        for stream in idle:
            stream.context.cancel()
        if idle:
            log.info("closed %d idle ALS stream(s) of %s", len(idle), sorted({s.who.node for s in idle}))
        return len(idle)

    def _refuse(self, kind: str, why: str) -> None:
        self._count(kind, f"refused {why}")


REAP_INTERVAL_S = 1.0


def serve(collector: Collector, host: str, port: int, *, max_streams: int = 256) -> tuple[grpc.Server, int]:
    """Start the ALS gRPC server on host:port (0: any free port); returns it and its port.

    Each open stream holds a thread for its lifetime (grpc's sync server), hence a pool
    as large as the number of sidecars a collector serves.  Calls beyond ``max_streams``
    are refused (RESOURCE_EXHAUSTED) rather than queued behind streams that may never end,
    and a reaper thread closes idle streams (Collector.reap) until the server stops."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_streams, thread_name_prefix="als"),
        maximum_concurrent_rpcs=max_streams,
        options=[
            # Receive anything up to 4x our own limit, so oversized messages reach us and are counted.
            ("grpc.max_receive_message_length", 4 * collector.max_message_bytes),
            ("grpc.max_concurrent_streams", max_streams),
        ],
    )
    server.add_generic_rpc_handlers((collector.grpc_handler(),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"the tap collector cannot listen on {host}:{port}")
    server.start()

    def reap_until_stopped() -> None:
        while server.wait_for_termination(REAP_INTERVAL_S):  # True: timed out, still serving
            collector.reap()

    threading.Thread(target=reap_until_stopped, name="als-reaper", daemon=True).start()
    return server, bound
