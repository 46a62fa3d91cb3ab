"""The tap collector: Envoy's gRPC Access Log Service in, tap events out to Kafka.

Every sidecar streams ``StreamAccessLogsMessage``s (envoy.service.accesslog.v3): the
first message of a stream names the node and the logger (our listener name), later ones
only carry entries.  The collector turns each message into events (tapstream.schema) and
publishes them as few, large records: one per message and layer, a JSON array of events,
keyed by the emitting service.  Envoy already batches a second or 16 KiB of entries into
one message, and a record per batch instead of per event is what makes the pipe fast.

The service is registered as a generic handler that receives raw bytes, so a message
that is too large or does not parse is counted and skipped here instead of failing the
stream inside grpc, where no one would see it.  Collectors hold no state beyond open
streams: run one per host, or as many as the load needs behind a gRPC load balancer.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf.message import DecodeError

from core import contracts
from tapstream import schema

log = logging.getLogger("greymesh.tapstream")

SERVICE = "envoy.service.accesslog.v3.AccessLogService"
METHOD = "StreamAccessLogs"
# Envoy flushes its buffer at 16 KiB by default; anything far beyond that is not a sidecar's.
MAX_MESSAGE_BYTES = 4 << 20
# Events per Kafka record: keeps a record well under the broker's 1 MiB default limit
# (an l7 event is ~700 bytes of JSON).
MAX_EVENTS_PER_RECORD = 500


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
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(self).items()
                    if not k.startswith("_")}


class Collector:
    """Converts ALS messages into tap events and hands them to ``publisher``."""

    def __init__(self, publisher: Publisher, *, max_message_bytes: int = MAX_MESSAGE_BYTES):
        self.publisher = publisher
        self.max_message_bytes = max_message_bytes
        self.stats = CollectorStats()

    def handle_stream(self, messages: Iterator[bytes]) -> None:
        """Consume one sidecar's stream of serialized messages until it ends."""
        with self.stats._lock:
            self.stats.streams += 1
        source: schema.Source | None = None
        for raw in messages:
            source = self.handle_message(raw, source)

    def handle_message(self, raw: bytes, source: schema.Source | None) -> schema.Source | None:
        """Publish the events of one serialized message; returns the stream's source
        (named by the stream's first message), which the next message needs."""
        if len(raw) > self.max_message_bytes:
            self._skip("oversized", f"{len(raw)} bytes > {self.max_message_bytes}")
            return source
        try:
            msg = als_pb2.StreamAccessLogsMessage.FromString(raw)
        except DecodeError as exc:
            self._skip("malformed", f"not a StreamAccessLogsMessage: {exc}")
            return source
        if msg.HasField("identifier"):
            node = msg.identifier.node
            source = schema.Source(node.id, node.cluster, msg.identifier.log_name)
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
        with self.stats._lock:
            setattr(self.stats, kind, getattr(self.stats, kind) + 1)
            n = getattr(self.stats, kind)
        if n & (n - 1) == 0:  # 1st, 2nd, 4th, 8th, ...: visible, never a flood
            log.warning("ALS message skipped (%s, %d so far): %s", kind, n, why)

    def grpc_handler(self) -> grpc.GenericRpcHandler:
        """The AccessLogService, taking raw bytes (no deserializer) so parsing is ours."""

        def stream_access_logs(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
            self.handle_stream(requests)
            return b""  # an empty StreamAccessLogsResponse

        return grpc.method_handlers_generic_handler(
            SERVICE, {METHOD: grpc.stream_unary_rpc_method_handler(stream_access_logs)}
        )


def serve(collector: Collector, host: str, port: int, *, max_streams: int = 256) -> tuple[grpc.Server, int]:
    """Start the ALS gRPC server on host:port (0: any free port); returns it and its port.

    Each open stream holds a thread for its lifetime (grpc's sync server), hence a pool
    as large as the number of sidecars a collector serves."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_streams, thread_name_prefix="als"),
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
    return server, bound
