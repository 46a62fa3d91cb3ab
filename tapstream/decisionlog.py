"""OPA decision logs -> typed, versioned audit records of every authorization decision.

OPA's decision-log plugin batches the decisions it made and POSTs each batch, a
gzip'ed JSON array, to ``<service url>/logs``.  This receiver turns every entry
for the mesh's authorization rule into an :class:`AuditRecord`.  The record holds
who called whom, what was asked, the verdict, the reason and the policy hash.  It
hands each batch's records to a *sink*, a plain callable: in the tap service
(tapstream.service) that is the Kafka producer, as ``audit`` events on ``greymesh.audit``.

Delivery is at-least-once.  When the sink fails, the batch is answered 500 and OPA
sends it again, including records already written.  Consumers therefore deduplicate
on ``decision_id``.  A malformed body is answered 400, counted and dropped, and the
receiver keeps serving.

Only OPA may post here: the receiver accepts ``/logs`` from the holder of OPA's
decision-log token alone (OPA sends it as a bearer token, ``credentials.bearer`` of
its service), and ``/stats`` from the CLI's; core/jsonhttp.py refuses everything else,
cross-site requests and unbounded bodies before a byte of the body is read.  A forged
batch therefore never reaches the sink.

The runtime points OPA here (greymesh/runtime/opa.py).
"""

from __future__ import annotations

import json
import logging
import threading
import zlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from http.server import ThreadingHTTPServer
from typing import Any

from core import contracts
from core.contracts import DECISION_PATH
from core.jsonhttp import CLI, Access, ApiHandler, Credential, serve

log = logging.getLogger("greymesh.decisionlog")

SCHEMA = "greymesh.authz.decision"
SCHEMA_VERSION = 1
LOGS_PATH = "/logs"  # where OPA posts when decision_logs.resource is not set
MAX_BODY_BYTES = 8 << 20  # OPA's uploads are capped at 32 KiB by default
MAX_JSON_BYTES = 64 << 20  # decompressed: a small gzip body must not inflate without bound
OPA = "opa"  # the principal of OPA's decision-log token


@dataclass(frozen=True)
class AuditRecord:
    """One authorization decision, as audit consumers read it (schema SCHEMA, version SCHEMA_VERSION)."""

    time: str  # RFC 3339, from OPA
    decision_id: str  # OPA's; unique per decision, the key to deduplicate on
    caller: str  # SPIFFE ID of the caller ("" when it presented none)
    callee: str  # SPIFFE ID of the callee
    method: str
    path: str  # without the query string, which may carry secrets
    allow: bool
    reason: str
    policy_hash: str  # sha256 of the policy that decided, as OPA reports it ("" before any push)
    schema: str = SCHEMA
    version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    def to_event(self) -> dict[str, Any]:
        """This decision as an ``audit`` tap event (core.contracts.COLUMNS["audit"])."""
        when = datetime.fromisoformat(self.time)  # OPA writes nanoseconds; microseconds are kept
        return {
            "v": contracts.VERSION, "event_id": self.decision_id,
            "time_us": int(when.timestamp()) * 1_000_000 + when.microsecond,
            "caller": self.caller, "callee": self.callee, "method": self.method, "path": self.path,
            "allow": int(self.allow), "reason": self.reason, "policy_hash": self.policy_hash,
        }

    @classmethod
    def from_entry(cls, entry: object) -> AuditRecord | None:
        """The record of one decision-log entry; None for queries other than the
        authorization decision (OPA logs every data API query).  ValueError if malformed."""
        if not isinstance(entry, Mapping):
            raise ValueError(f"entry is {type(entry).__name__}, not an object")
        if entry.get("path") != DECISION_PATH:
            return None
        attrs = ("input", "attributes")
        http = (*attrs, "request", "http")
        result = entry.get("result")
        if result is None:  # evaluation failed; the bridge denied the request
            error = _field(entry, ("error", "message"), "no result")
            allow, reason = False, f"no decision: {error}"
        else:
            allow = _field(result, ("allow",), None, bool)
            reason = _field(result, ("reason",), "")
        # The revision of the bundle OPA decided with, which `greymesh policy push` sets to the
        # policy's sha256; never a value of the decision, which the policy could make up.
        policy_hash = contracts.policy_hash_of(_field(entry, ("bundles",), {}, dict))
        time = _field(entry, ("timestamp",), None)
        try:
            datetime.fromisoformat(time)
        except ValueError:
            raise ValueError(f"timestamp {time!r} is not RFC 3339") from None
        return cls(
            time=time,
            decision_id=_field(entry, ("decision_id",), None),
            caller=_field(entry, (*attrs, "source", "principal"), ""),
            callee=_field(entry, (*attrs, "destination", "principal"), ""),
            method=_field(entry, (*http, "method"), ""),
            path=_field(entry, (*http, "path"), "").split("?", 1)[0],
            allow=allow,
            reason=reason,
            policy_hash=policy_hash,
        )


def _field(doc: object, keys: tuple[str, ...], default: Any, kind: type = str) -> Any:
    """doc[k1][k2]...: `default` when absent (ValueError if default is None), ValueError if not of `kind`."""
    value: Any = doc
    for key in keys:
        if not isinstance(value, Mapping):
            raise ValueError(f"{'.'.join(keys)}: {key!r} is inside a {type(value).__name__}, not an object")
        if key not in value:
            if default is None:
                raise ValueError(f"{'.'.join(keys)}: missing")
            return default
        value = value[key]
    if not isinstance(value, kind):
        raise ValueError(f"{'.'.join(keys)}: {type(value).__name__}, not {kind.__name__}")
    return value


Sink = Callable[[list[AuditRecord]], None]  # gets each batch's records at once


@dataclass
class ReceiverStats:
    batches: int = 0  # bodies accepted
    records: int = 0  # records of accepted batches, handed to the sink
    ignored: int = 0  # entries for queries other than the authorization decision
    bad_entries: int = 0  # entries skipped inside an accepted batch
    malformed: int = 0  # bodies refused with 400 (not gzip, not JSON, not an array); a body without
    # credential, too large or unframed is refused before it is read (core/jsonhttp.py) and not counted here
    sink_failures: int = 0  # batches answered 500 because the sink raised
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in vars(self).items() if not k.startswith("_")}


class _Malformed(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def receiver_access(opa: Credential, cli: Credential) -> Access:
    """Who may call the receiver: OPA posts ``/logs`` (gzip'ed JSON, as OPA sends it), the CLI
    reads ``/stats``; neither may do the other's part."""
    return Access((opa, cli), MAX_BODY_BYTES, only={LOGS_PATH: frozenset({opa.principal}),
                                                    "/stats": frozenset({cli.principal})},
                  encodings=frozenset({"identity", "gzip"}))


class DecisionLogReceiver:
    """OPA's decision-log service on host:port (port 0: any free one), for the holders
    ``access`` names (see :func:`receiver_access`); use as a context manager."""

    def __init__(self, sink: Sink, access: Access, host: str = "127.0.0.1", port: int = 0,
                 extra_stats: Callable[[], dict[str, Any]] | None = None):
        self.sink = sink
        self.extra_stats = extra_stats  # merged into GET /stats (the tap service's counters)
        self.stats = ReceiverStats()
        self._server: ThreadingHTTPServer = serve(self._handler(), host, port, access)
        self._thread = threading.Thread(target=self._server.serve_forever, name="decisionlog", daemon=True)

    @property
    def url(self) -> str:
        """The service URL for OPA's config (OPA appends /logs)."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> DecisionLogReceiver:
        self._thread.start()
        log.info("decision-log receiver on %s%s", self.url, LOGS_PATH)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> DecisionLogReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def receive(self, body: bytes, content_encoding: str) -> dict[str, int]:
        """Decode one batch and feed its records to the sink; the counts for the reply.
        _Malformed for a body that is not a (gzip'ed) JSON array."""
        try:
            entries = json.loads(_gunzip(body) if content_encoding == "gzip" else body)
        except (zlib.error, ValueError) as exc:
            raise _Malformed(400, f"not a JSON body (Content-Encoding {content_encoding or 'none'}): {exc}") from None
        if not isinstance(entries, list):
            raise _Malformed(400, f"body is a JSON {type(entries).__name__}, not an array of decisions")
        counts = {"records": 0, "ignored": 0, "bad_entries": 0}
        records = []
        for i, entry in enumerate(entries):
            try:
                record = AuditRecord.from_entry(entry)
            except ValueError as exc:
                log.warning("decision log entry %d skipped: %s", i, exc)
                counts["bad_entries"] += 1
                continue
            if record is None:
                counts["ignored"] += 1
            else:
                records.append(record)
        if records:
            self.sink(records)
        counts["records"] = len(records)
        return counts

    def _handler(self) -> type[ApiHandler]:
        receiver = self

        class Handler(ApiHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path == "/stats":
                    extra = receiver.extra_stats() if receiver.extra_stats else {}
                    self.send_json(200, {"decisions": receiver.stats.snapshot(), **extra})
                else:
                    self.send_json(404, {"error": f"no {self.path} here; OPA posts to {LOGS_PATH}"})

            def do_POST(self) -> None:  # noqa: N802
                body = self.read_body()  # framing and size were checked before this method runs
                if self.path != LOGS_PATH:
                    self.send_json(404, {"error": f"no {self.path} here; OPA posts to {LOGS_PATH}"})
                    return
                try:
                    counts = receiver.receive(body, self.headers.get("Content-Encoding", "").strip().lower())
                except _Malformed as exc:
                    receiver.stats.add(malformed=1)
                    log.warning("decision log batch refused (%d): %s", exc.status, exc)
                    self.send_json(exc.status, {"error": str(exc)})
                except Exception as exc:  # the sink failed: OPA keeps the batch and retries
                    receiver.stats.add(sink_failures=1)
                    log.exception("decision log sink failed")
                    self.send_json(500, {"error": f"sink failed: {type(exc).__name__}: {exc}"})
                else:
                    receiver.stats.add(batches=1, **counts)
                    self.send_json(200, counts)

        return Handler


def _gunzip(body: bytes) -> bytes:
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing
    out = d.decompress(body, MAX_JSON_BYTES)
    if d.unconsumed_tail:
        raise ValueError(f"inflates beyond {MAX_JSON_BYTES} bytes")
    if not d.eof:
        raise ValueError("truncated gzip stream")
    return out
