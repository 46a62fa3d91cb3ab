"""The collector's Kafka producer: tap records to Kafka, through a bounded on-disk spool
when the broker is unreachable.

The collector turns each batch of Envoy access-log entries into one record per layer
topic (``schema.topic(layer)``, plus ``greymesh.audit``), keyed by service, and calls
:meth:`TapProducer.send`.  Kafka settings: ``acks=all``, the idempotent producer (no
duplicates from kafka-python's own retries, order kept per partition), zstd, ``linger_ms=5``,
1 MiB batches and 2 MiB requests (records are 100-300 KB), ``max_block_ms=500``.

Two modes.

*Direct* (the broker is up and every spooled record has been handed to kafka-python):
``send`` hands the record to kafka-python and keeps it in memory until Kafka acknowledges it.

*Spooling* (anything else): ``send`` appends the record to the :class:`~tapstream.spool.Spool`
and returns.  A background thread ("tapstream-replay") hands the spool's records, oldest
first, to kafka-python in chunks (at most two chunks unacknowledged at a time) and acks
each chunk in the spool once Kafka has acknowledged all of it.  When every spooled record
has been handed over, new records go direct again: kafka-python keeps the order of a
partition, so they land behind the replayed ones (waiting for an empty spool instead
never ends under a steady stream: a record arrives during every acknowledgement round
trip).  If one of those last replayed chunks fails after all, the spool still holds every
unacknowledged record from its cursor on, in order; the producer leaves direct mode
(below) and replays from the cursor again.

Leaving direct mode.  kafka-python does not fail a record when the broker goes away: it
retries until ``delivery_timeout_ms`` (30 s here), holding everything sent meanwhile in
memory.  So the producer leaves direct mode when kafka-python reports a failed record, when
``KafkaProducer.send`` raises (no metadata within ``max_block_ms``), when nothing has been
acknowledged for :attr:`TapProducer.STALL_S` seconds while records wait, or when more than
:attr:`TapProducer.MAX_INFLIGHT_BYTES` wait.  Every record still waiting for its
acknowledgement is then appended to the spool, oldest first, before any newer record.
Those records may still reach Kafka through kafka-python's own retries and then again from
the spool: duplicates, which are acceptable (the store deduplicates on ``event_id``);
losses are not.  When kafka-python *reported* a failure, the KafkaProducer is also
replaced by a new one: kafka-python 3.0.12's idempotent producer can end up failing every
later send (see :data:`POISON_ERRORS`).

Order.  Per partition, records arrive in the order ``send`` was called, counting each
record's first arrival (resends come later as duplicates).  One exception: a record that
kafka-python expires after ``delivery_timeout_ms`` while a later record of its partition
still gets through (the broker came back in that very window) is resent from the spool
after that later record.

Probing.  While there is no KafkaProducer (the broker was down at start, or a failed
producer was just dropped) the thread tries to create one every 1-4 s (backing off);
creating one is the probe.  Once it exists, the replay chunks are the probe: kafka-python
reconnects by itself, and a chunk is acknowledged as soon as the broker is back.

Drops.  When the spool is full, a record is dropped: counted (records and events),
reported to ``on_drop(records, events)`` (the collector raises an alert), and logged at
ERROR at most once per 10 s with the totals.  A record Kafka can never accept is dropped
the same way rather than block the records behind it: one larger than
:attr:`TapProducer.MAX_RECORD_BYTES` (at send()), one kafka-python refuses, or one the
broker refuses (too large for the topic, invalid) when sent on its own through a fresh
KafkaProducer; a broker refusal is not trusted before that, because kafka-python then fails
every later batch with the same error.  Nothing is dropped silently.

What a crash loses.  Records in the spool survive a crash of the collector process (see
tapstream/spool.py; a power loss can lose the unsynced tail).  Records in direct mode live
in memory until Kafka acknowledges them, normally a few milliseconds; a crash in that
window loses them.  :meth:`TapProducer.close` moves unacknowledged records to the spool,
so a clean shutdown loses nothing, and the next TapProducer on the same directory
replays them.

Throughput.  Without the ``crc32c`` package kafka-python computes the record batches'
CRC-32C in pure Python: about 5 MB/s of record data per process, one core busy (measured
here for the producer: ~420 records/s of 10 KB; consumers check the same CRCs), which is
why ``crc32c`` is a pinned dependency: with it, the same code does ~40 MB/s; kafka-python
picks it up by itself.

Log records go to ``greymesh.tapstream`` and never include record contents.  kafka-python
itself logs every failed reconnect at ERROR under ``kafka.*``; the tap service and the
sink raise that logger's level (their own logs say when the broker is away).
"""

from __future__ import annotations

import gc
import logging
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kafka import KafkaProducer
from kafka import errors as kerr

from core.kafka import KafkaAuth, client_config
from tapstream.spool import DEFAULT_MAX_BYTES, Position, Spool, SpooledRecord

log = logging.getLogger("greymesh.tapstream")

# Defaults for kafka-python's KafkaProducer; TapProducer(**producer_config) overrides them.
PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "enable_idempotence": True,
    "linger_ms": 5,
    # JSON compresses ~5x: zstd doubles what one producer sends and quadruples what the
    # sink's kafka-python consumer fetches (measured: docs/benchmarks-taps.md).
    "compression_type": "zstd",
    "batch_size": 1 << 20,  # several 100-300 KB records per batch, under the broker's 1 MiB message.max.bytes
    "max_request_size": 2 << 20,
    "max_block_ms": 500,  # send() waits at most this for metadata: a down broker cannot stall it
    "request_timeout_ms": 10_000,
    "delivery_timeout_ms": 30_000,  # must exceed linger_ms + request_timeout_ms
    "retry_backoff_ms": 100,
    "reconnect_backoff_ms": 100,
    "reconnect_backoff_max_ms": 1_000,
    "bootstrap_timeout_ms": 2_000,  # one connection attempt while the broker is down at start
    "allow_auto_create_topics": False,  # topics are created on purpose
}
# Errors that no retry can fix for the record at fault.  Raised by KafkaProducer.send()
# they are that record's own.  Reported for a sent record they may be collateral: after
# the broker refuses one batch, kafka-python 3.0.12's idempotent producer enters a fatal
# state and fails every later batch, of any topic, with the same error.  So such a record
# is sent again on its own through a new KafkaProducer, and dropped only if it is refused
# alone SOLO_ATTEMPTS times in a row.
POISON_ERRORS: tuple[type[BaseException], ...] = (
    kerr.MessageSizeTooLargeError, kerr.RecordListTooLargeError, kerr.InvalidRecordError,
    kerr.InvalidTopicError, kerr.InvalidTimestampError,
)
_TOPIC_RE = re.compile(r"^[a-zA-Z0-9._-]{1,249}$")


@dataclass
class ProducerStats:
    """A snapshot of a TapProducer's counters (JSON-able via dataclasses.asdict)."""

    sent_records: int  # acknowledged by Kafka (direct or replayed)
    sent_events: int
    spooled_records: int  # appended to the spool by this producer
    spool_records: int  # in the spool now, waiting for the broker
    spool_bytes: int  # bytes the spool occupies on disk
    dropped_records: int  # lost on purpose and reported: spool full, or a record Kafka refuses
    dropped_events: int
    replayed_records: int  # delivered from the spool
    broker_up: bool  # the last attempt to reach the broker succeeded
    last_error: str  # the last broker or spool problem ("" if none yet)


class _Rec:
    """A record sent directly, kept until Kafka acknowledges it."""

    __slots__ = ("topic", "key", "value", "events", "sent_at")

    def __init__(self, topic: str, key: bytes, value: bytes, events: int, sent_at: float) -> None:
        self.topic, self.key, self.value, self.events, self.sent_at = topic, key, value, events, sent_at


class _Refused(Exception):
    """KafkaProducer.send() itself refused the record (e.g. larger than max_request_size)."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(f"{type(exc).__name__}: {exc}")
        self.exc = exc


class _Chunk:
    """One replay step: spooled records handed to kafka-python, and their outcomes as
    kafka-python's I/O thread reports them: None (pending), True (acknowledged) or the
    exception.  A *solo* chunk is one record sent with nothing else in flight, to learn
    whether the broker refuses that record itself."""

    def __init__(self, records: list[SpooledRecord], deadline: float, solo: bool = False) -> None:
        self.records = records
        self.solo = solo
        self.deadline = deadline  # give up waiting after this (kafka-python has by then)
        self.outcome: list[Any] = [None] * len(records)
        self._pending = len(records)
        self._lock = threading.Lock()
        self.done = threading.Event()
        self.progress_at = time.monotonic()
        if not records:
            self.done.set()

    @property
    def pending(self) -> int:
        return self._pending

    def ok(self, i: int, _metadata: Any) -> None:
        self._set(i, True)

    def fail(self, i: int, exc: BaseException) -> None:
        self._set(i, exc)

    def _set(self, i: int, value: Any) -> None:
        with self._lock:
            if self.outcome[i] is None:
                self.outcome[i] = value
                self._pending -= 1
                self.progress_at = time.monotonic()
                if self._pending == 0:
                    self.done.set()


class TapProducer:
    """Produces tap records to Kafka with acks=all; spools to disk while the broker is away.

    ``send`` never blocks for long and never raises for broker trouble.  See the module
    docstring for the modes, what counts as "broker down", drops and crash behaviour.
    ``auth`` is the tap service's Kafka principal (None: a broker without authentication).
    """

    STALL_S = 5.0  # no acknowledgement for this long while records wait: the broker is down
    MAX_INFLIGHT_BYTES = 64 << 20  # more than this unacknowledged in memory: spool instead
    # Larger records (key + value) are dropped at send(): a broker refuses them with its
    # default message.max.bytes (1 MiB, batch framing included).
    MAX_RECORD_BYTES = 1_000_000
    SOLO_ATTEMPTS = 2  # a record refused alone (by a fresh KafkaProducer) this often is dropped
    POLL_S = 0.2  # how often the background thread checks for stalls
    PROBE_MIN_S, PROBE_MAX_S = 1.0, 4.0  # back-off between attempts while the broker is down
    CHUNK_RECORDS, CHUNK_BYTES = 500, 8 << 20  # one replay chunk
    MAX_OUTSTANDING = 2  # replay chunks handed to kafka-python and not yet acknowledged
    DROP_LOG_INTERVAL_S = 10.0

    def __init__(self, bootstrap: str, spool_dir: Path, *, max_spool_bytes: int = DEFAULT_MAX_BYTES,
                 on_drop: Callable[[int, int], None] | None = None,
                 client_id: str = "greymesh-tapstream", auth: KafkaAuth | None = None,
                 **producer_config: Any) -> None:
        unknown = set(producer_config) - set(KafkaProducer.DEFAULT_CONFIG)
        if unknown:
            raise TypeError(f"unknown KafkaProducer settings: {sorted(unknown)}")
        if "bootstrap_servers" in producer_config or "client_id" in producer_config:
            raise TypeError("pass bootstrap and client_id as TapProducer's own arguments")
        config = {**PRODUCER_DEFAULTS, **producer_config}
        if config["delivery_timeout_ms"] < config["linger_ms"] + config["request_timeout_ms"]:
            raise ValueError("delivery_timeout_ms must be at least linger_ms + request_timeout_ms")
        self._config = {"bootstrap_servers": bootstrap, "client_id": client_id, **config, **client_config(auth)}
        self._on_drop = on_drop
        self._spool = Spool(Path(spool_dir), max_spool_bytes)

        # _send_lock serializes send(), mode switches and moving records to the spool; it
        # may be held across kafka-python and spool calls.  _mu guards counters and the
        # in-flight table for short moments only; kafka-python's callbacks take only _mu,
        # so they can never wait on a thread that is itself waiting inside kafka-python.
        self._send_lock = threading.RLock()
        self._mu = threading.Lock()
        self._cv = threading.Condition(self._mu)
        self._kp: KafkaProducer | None = None
        self._direct = False
        self._closed = False
        self._stop = threading.Event()
        self._wake = threading.Event()

        self._inflight: OrderedDict[int, _Rec] = OrderedDict()  # seq -> record, oldest first
        self._inflight_bytes = 0
        self._seq = 0
        self._last_ack = time.monotonic()
        self._direct_failure: tuple[str, bool] | None = None  # (reason, the broker refused a record)
        self._appended = len(self._spool)  # spool records appended, ever (those found at open included)
        self._acked = 0  # ... and acknowledged out of it (delivered, or dropped as undeliverable)
        self._takeovers = 0  # moves of waiting direct records to the spool started ...
        self._takeovers_done = 0  # ... and finished,
        self._takeover_appended = 0  # and _appended right after the last one finished

        self._sent_records = self._sent_events = 0
        self._spooled_records = self._replayed_records = 0
        self._dropped_records = self._dropped_events = 0
        self._broker_up: bool | None = None  # None: not known yet
        self._last_error = ""
        self._drop_reason = ""
        self._drop_notices: list[tuple[int, int]] = []
        self._drop_logged_at = float("-inf")
        self._drop_logged_records = 0

        # Owned by the background thread: replay chunks out with kafka-python, oldest first,
        # and the last spooled record handed to it (None: start at the spool's cursor).
        self._chunks: deque[_Chunk] = deque()
        self._sent_after: Position | None = None
        self._solo = False  # send the spool's next record alone (the broker refused it, or one near it)
        self._solo_refusals: tuple[Position | None, int] = (None, 0)  # that record, refusals alone in a row
        self._thread = threading.Thread(target=self._run, name="tapstream-replay", daemon=True)
        self._thread.start()

    # -- the API -------------------------------------------------------------------------

    def send(self, topic: str, key: str, value: bytes, events: int = 1) -> None:
        """Produce one record (``events`` tap events in ``value``), or spool it.  Never
        raises for broker trouble; raises TypeError/ValueError for bad arguments and
        RuntimeError after close()."""
        if not isinstance(topic, str) or not _TOPIC_RE.match(topic):
            raise ValueError(f"not a valid Kafka topic name: {topic!r}")
        if not isinstance(key, str):
            raise TypeError(f"key must be str, got {type(key).__name__}")
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"value must be bytes, got {type(value).__name__}")
        if events < 0:
            raise ValueError(f"events must be >= 0, got {events}")
        value = bytes(value)
        rec = _Rec(topic, key.encode(), value, int(events), time.monotonic())
        if len(rec.key) + len(value) > self.MAX_RECORD_BYTES:
            self._count_drop(1, rec.events, f"record of {len(rec.key) + len(value)} bytes is larger than "
                                            f"MAX_RECORD_BYTES ({self.MAX_RECORD_BYTES})")
            self._notify_drops()
            return
        with self._send_lock:
            if self._closed:
                raise RuntimeError("TapProducer is closed")
            if self._direct:
                self._send_direct(rec)
            else:
                self._to_spool([rec])
                self._wake.set()
        self._notify_drops()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every record sent before this call is acknowledged by Kafka or, if the
        broker is known to be down, is in the spool.  Returns after ``timeout`` seconds
        whatever the state (stats() tells what is left)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            target_seq, target_appended, takeovers = self._seq, self._appended, self._takeovers
            while True:
                if self._takeovers != takeovers:  # direct records sent before now may be in the spool
                    target_appended = max(target_appended, self._takeover_appended)
                oldest = next(iter(self._inflight), None)
                direct_done = (oldest is None or oldest >= target_seq) and self._takeovers_done == self._takeovers
                spool_done = (self._acked >= target_appended or self._broker_up is False
                              or len(self._spool) == 0)
                if direct_done and spool_done:
                    return
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return
                self._wake.set()
                self._cv.wait(0.5 if remaining is None else min(0.5, remaining))

    def stats(self) -> ProducerStats:
        with self._mu:
            return ProducerStats(
                self._sent_records, self._sent_events, self._spooled_records,
                len(self._spool), self._spool.bytes,
                self._dropped_records, self._dropped_events, self._replayed_records,
                bool(self._broker_up), self._last_error)

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what can be delivered within ``timeout``; everything else stays in the
        spool, which the next TapProducer on the same directory replays.  Idempotent."""
        deadline = time.monotonic() + timeout
        with self._send_lock:
            if self._closed:
                return
        self.flush(max(0.0, timeout - 1.0))
        with self._send_lock:
            self._closed = True
        self._stop.set()
        self._wake.set()
        self._thread.join(max(2.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.warning("tapstream replay thread did not stop in time; closing anyway")
        with self._send_lock:
            moved = self._take_over_inflight()  # not acknowledged yet: keep them for the next start
            self._direct = False
            kp, self._kp = self._kp, None
            broker_up = self._broker_up
        if moved:
            log.info("tapstream: %d unacknowledged records moved to the spool at close", moved)
        self._notify_drops()
        self._log_drops(force=True)
        if kp is not None:
            # With the broker away, waiting only delays the inevitable: those records are spooled.
            _close_kafka(kp, max(0.0, deadline - time.monotonic()) if broker_up else 0.0)
        left = len(self._spool)
        self._spool.close()
        if left:
            log.warning("tapstream closed with %d records in the spool; they are replayed at the next start", left)

    def __enter__(self) -> TapProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- direct sends (called with _send_lock held) -------------------------------------

    def _send_direct(self, rec: _Rec) -> None:
        assert self._kp is not None
        with self._mu:
            seq = self._seq
            self._seq += 1
            if not self._inflight:
                self._last_ack = rec.sent_at  # a stall is measured from the oldest waiting record
            self._inflight[seq] = rec
            self._inflight_bytes += len(rec.value)
            too_much = self._inflight_bytes > self.MAX_INFLIGHT_BYTES
        try:
            future = self._kp.send(rec.topic, value=rec.value, key=rec.key)
        except POISON_ERRORS as exc:
            with self._mu:
                if self._inflight.pop(seq, None) is not None:
                    self._inflight_bytes -= len(rec.value)
            self._count_drop(1, rec.events, f"record refused ({type(exc).__name__}): {exc}")
            return
        except Exception as exc:  # KafkaTimeoutError: no metadata within max_block_ms; anything else alike
            self._leave_direct(f"send to {rec.topic} failed: {type(exc).__name__}: {exc}")
            return
        future.add_callback(self._direct_ok, seq)
        future.add_errback(self._direct_failed, seq)
        if too_much:
            self._leave_direct(f"more than {self.MAX_INFLIGHT_BYTES} bytes waiting for Kafka's acknowledgement")

    def _direct_ok(self, seq: int, _metadata: Any) -> None:
        """kafka-python's I/O thread: a direct record is acknowledged."""
        with self._mu:
            self._last_ack = time.monotonic()
            rec = self._inflight.pop(seq, None)
            if rec is None:
                return  # already moved to the spool: it will be sent again (a duplicate)
            self._inflight_bytes -= len(rec.value)
            self._sent_records += 1
            self._sent_events += rec.events
            if not self._inflight:
                self._cv.notify_all()

    def _direct_failed(self, seq: int, exc: BaseException) -> None:
        """kafka-python's I/O thread: a direct record failed.  The replay thread moves the
        waiting records to the spool (never this thread: it must not wait on _send_lock);
        a record the broker refused is judged there, sent on its own."""
        with self._mu:
            if seq not in self._inflight:
                return
            if self._direct_failure is None:
                self._direct_failure = (f"delivery to {self._inflight[seq].topic} failed: {type(exc).__name__}: {exc}",
                                        isinstance(exc, POISON_ERRORS))
        self._wake.set()

    def _leave_direct(self, reason: str, refused: bool = False) -> None:
        """Switch to spooling: the records still waiting for Kafka go to the spool first,
        in the order they were sent, then everything newer.  ``refused``: the broker is up
        but refused a record, which the replay will find.  _send_lock held."""
        with self._mu:
            was_direct = self._direct
            self._direct = False
            self._direct_failure = None
            if not refused:
                self._broker_up = False
            self._last_error = reason
            self._cv.notify_all()
        moved = self._take_over_inflight()
        if was_direct:
            what = "Kafka refused a record" if refused else "Kafka unavailable"
            moved_note = f"; {moved} unacknowledged records moved there, they may arrive twice" if moved else ""
            log.warning("tapstream: %s (%s); spooling to %s%s", what, reason, self._spool.directory, moved_note)
        self._wake.set()

    def _take_over_inflight(self) -> int:
        """Move every record waiting for its acknowledgement to the spool.  _send_lock held."""
        with self._mu:  # flush() must never see these records in neither place
            recs = list(self._inflight.values())
            self._inflight.clear()
            self._inflight_bytes = 0
            self._takeovers += 1
        try:
            self._to_spool(recs)
        finally:
            with self._mu:
                self._takeovers_done += 1
                self._takeover_appended = self._appended
                self._cv.notify_all()
        return len(recs)

    def _to_spool(self, recs: list[_Rec]) -> None:
        """Append to the spool; count what does not fit.  _send_lock held."""
        for rec in recs:
            try:
                ok = self._spool.append(rec.topic, rec.key, rec.value, rec.events)
                why = f"spool full ({self._spool.max_bytes} bytes)"
            except (OSError, ValueError) as exc:
                ok, why = False, f"spool write failed: {exc}"
            if ok:
                with self._mu:
                    self._spooled_records += 1
                    self._appended += 1
            else:
                self._count_drop(1, rec.events, why)

    # -- drops ---------------------------------------------------------------------------

    def _count_drop(self, records: int, events: int, why: str) -> None:
        with self._mu:
            self._dropped_records += records
            self._dropped_events += events
            self._drop_reason = why
            if not why.startswith("spool full"):
                self._last_error = why
            self._drop_notices.append((records, events))
        self._wake.set()

    def _notify_drops(self) -> None:
        """Tell on_drop about new drops and log them (rate-limited).  Called with no lock
        held, never from kafka-python's I/O thread."""
        with self._mu:
            notices, self._drop_notices = self._drop_notices, []
        if notices and self._on_drop is not None:
            for records, events in notices:
                try:
                    self._on_drop(records, events)
                except Exception:
                    log.exception("tapstream: on_drop callback failed")
        if notices:
            self._log_drops()

    def _log_drops(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._mu:
            new = self._dropped_records - self._drop_logged_records
            if new <= 0 or (not force and now - self._drop_logged_at < self.DROP_LOG_INTERVAL_S):
                return
            self._drop_logged_at = now
            self._drop_logged_records = self._dropped_records
            totals = (self._dropped_records, self._dropped_events, self._drop_reason)
        log.error("tapstream: DROPPED %d tap records in the last interval; %d records / %d events dropped "
                  "since start (last reason: %s)", new, *totals)

    # -- the background thread -------------------------------------------------------------
    #
    # Spooling mode: replay chunks go to kafka-python in order, up to MAX_OUTSTANDING at a
    # time; each is "settled" (acked in the spool) oldest first once kafka-python reports
    # on all its records.  As soon as every spooled record has been handed to
    # kafka-python, new records can go directly: kafka-python keeps the order per
    # partition, so direct mode starts while the last chunks are still waiting for their
    # acknowledgements.  If a chunk then fails, the spool still holds, from its cursor,
    # everything not acknowledged, in order: leave direct mode (which appends the waiting
    # direct records after them) and replay again from the cursor.

    def _run(self) -> None:
        backoff = self.PROBE_MIN_S
        while not self._stop.is_set():
            try:
                self._notify_drops()
                self._log_drops()
                if self._kp is None:
                    if self._connect():
                        backoff = self.PROBE_MIN_S
                        continue
                elif self._step():
                    backoff = self.PROBE_MIN_S
                    continue
            except Exception as exc:  # never die silently: log, back off, go on
                log.exception("tapstream replay thread: unexpected error")
                with self._mu:
                    self._last_error = f"replay thread: {type(exc).__name__}: {exc}"
                self._chunks.clear()
                self._sent_after = None
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self.PROBE_MAX_S)
        # Stopping (close()): record what was delivered, so the next start does not resend it.
        try:
            while self._chunks and self._chunks[0].done.is_set() and self._settle(self._chunks.popleft()):
                pass
        except Exception:
            log.exception("tapstream replay thread: settling at close failed")

    def _connect(self) -> bool:
        try:
            kp = KafkaProducer(**self._config)
        except Exception as exc:
            # A KafkaProducer that failed to bootstrap leaves its sockets in reference
            # cycles; collect them now, or a long outage leaks a file descriptor per try.
            gc.collect()
            with self._mu:
                self._broker_up = False
                self._last_error = f"cannot reach Kafka at {self._config['bootstrap_servers']}: {type(exc).__name__}: {exc}"
                self._cv.notify_all()
            return False
        with self._send_lock:
            if self._closed:
                _close_kafka(kp, 1.0)
                return False
            self._kp = kp
            with self._mu:
                self._broker_up = True  # it just answered the bootstrap
                self._cv.notify_all()
        log.info("tapstream: connected to Kafka at %s", self._config["bootstrap_servers"])
        return True

    def _step(self) -> bool:
        """One round of the background thread; False to back off (the broker is away)."""
        now = time.monotonic()
        while self._chunks and (self._chunks[0].done.is_set() or now > self._chunks[0].deadline):
            chunk = self._chunks.popleft()
            if not self._settle(chunk):
                # Replay again from the spool's cursor; outcomes of chunks still out are
                # ignored (their records are re-sent: duplicates, never a gap).
                reason = self._chunk_failure(chunk)
                self._reset_kafka(reason, refused=self._solo)
                if self._solo:  # a record the broker refused: not an outage; try it alone now
                    with self._mu:
                        self._last_error = reason
                    return True
                self._mark_down(reason)
                return False
        if self._direct:
            self._check_direct()
        elif not (self._chunks and self._chunks[-1].solo):  # a solo record travels alone
            while len(self._chunks) < self.MAX_OUTSTANDING:
                solo, self._solo = self._solo, False
                records = self._spool.peek(1 if solo else self.CHUNK_RECORDS, self.CHUNK_BYTES,
                                           after=self._sent_after)
                if not records:
                    self._maybe_go_direct()
                    break
                chunk = self._send_chunk(records, solo)
                self._chunks.append(chunk)
                self._sent_after = records[-1].position
                if solo or chunk.done.is_set():
                    break  # alone, or refused at send(): settle it first
        if self._chunks:
            oldest = self._chunks[0]
            if not oldest.done.wait(self.POLL_S) and time.monotonic() - oldest.progress_at > self.STALL_S:
                self._mark_down(f"no acknowledgement from Kafka for {self.STALL_S:.0f} s (replaying the spool)")
        else:
            self._wake.wait(self.POLL_S)
            self._wake.clear()
        return True

    def _send_chunk(self, records: list[SpooledRecord], solo: bool = False) -> _Chunk:
        kp = self._kp
        assert kp is not None
        chunk = _Chunk(records, time.monotonic() + self._config["delivery_timeout_ms"] / 1000 + 5, solo)
        for i, r in enumerate(records):
            try:
                future = kp.send(r.topic, value=r.value, key=r.key)
            except POISON_ERRORS as exc:
                chunk.fail(i, _Refused(exc))
            except Exception as exc:  # no metadata within max_block_ms: the broker is away
                for j in range(i, len(records)):
                    chunk.fail(j, exc)
                break
            else:
                future.add_callback(chunk.ok, i)
                future.add_errback(chunk.fail, i)
        return chunk

    def _settle(self, chunk: _Chunk) -> bool:
        """Ack the chunk's records up to its first failure; True if all were delivered
        (or refused for good and counted as dropped)."""
        last, delivered, delivered_events = -1, 0, 0
        drops: list[tuple[int, str]] = []
        for i, r in enumerate(chunk.records):
            outcome = chunk.outcome[i]
            if outcome is True:
                delivered += 1
                delivered_events += r.events
            elif isinstance(outcome, _Refused):
                drops.append((r.events, f"record refused by the Kafka client ({outcome})"))
            elif isinstance(outcome, POISON_ERRORS) and chunk.solo and self._refused_alone(r.position):
                drops.append((r.events, f"record refused by Kafka {self.SOLO_ATTEMPTS} times on its own "
                                        f"({type(outcome).__name__}): {outcome}"))
            else:
                if isinstance(outcome, POISON_ERRORS):
                    self._solo = True  # this record, or one it was batched or queued with: find out alone
                break
            last = i
        if last >= 0:
            with self._mu:  # the spool and the counters change together for stats()
                self._spool.ack(chunk.records[last].position)
                self._acked += last + 1
                self._sent_records += delivered
                self._sent_events += delivered_events
                self._replayed_records += delivered
                if delivered:
                    self._broker_up = True
                self._cv.notify_all()
            for events, why in drops:
                self._count_drop(1, events, why)
        return last == len(chunk.records) - 1

    def _refused_alone(self, position: Position) -> bool:
        """One more refusal of the record at ``position`` sent alone; True when that makes
        SOLO_ATTEMPTS in a row (then it is dropped)."""
        seen, count = self._solo_refusals
        count = count + 1 if seen == position else 1
        self._solo_refusals = (None, 0) if count >= self.SOLO_ATTEMPTS else (position, count)
        return count >= self.SOLO_ATTEMPTS

    @staticmethod
    def _chunk_failure(chunk: _Chunk) -> str:
        for r, outcome in zip(chunk.records, chunk.outcome):
            if isinstance(outcome, BaseException) and not isinstance(outcome, _Refused):
                return f"replay to {r.topic} failed: {type(outcome).__name__}: {outcome}"
        return "replay: no acknowledgement from Kafka within delivery_timeout_ms"

    def _maybe_go_direct(self) -> None:
        """Every spooled record is with kafka-python: new records may go directly, unless
        some are still waiting and the broker has not confirmed it is up (then wait for
        their outcome first, rather than pile direct records up behind them)."""
        with self._send_lock:
            if self._closed or self._spool.peek(1, after=self._sent_after):
                return  # something was appended meanwhile: another round
            with self._mu:
                if self._chunks and self._broker_up is not True:
                    return
                self._direct = True
                self._last_ack = time.monotonic()
                self._cv.notify_all()
            if self._spooled_records or self._replayed_records:
                log.info("tapstream: spool replayed; sending directly to Kafka again")

    def _check_direct(self) -> None:
        now = time.monotonic()
        with self._mu:
            failure = self._direct_failure
            oldest = next(iter(self._inflight.values()), None)
            stalled = (oldest is not None and now - oldest.sent_at > self.STALL_S
                       and now - self._last_ack > self.STALL_S)
        if failure is not None:  # kafka-python reported a failed record
            self._reset_kafka(*failure)
        elif stalled:  # the broker went quiet: keep the producer, it reconnects by itself
            with self._send_lock:
                if self._direct:
                    self._leave_direct(f"no acknowledgement from Kafka for {self.STALL_S:.0f} s")

    def _reset_kafka(self, reason: str, refused: bool = False) -> None:
        """kafka-python reported a failed record: leave direct mode (the records it still
        holds are in the spool then) and replace the KafkaProducer.  kafka-python 3.0.12 can
        leave an idempotent producer permanently failed (see POISON_ERRORS); a new one
        starts clean, and its records are replayed from the spool's cursor."""
        with self._send_lock:
            if self._direct:
                self._leave_direct(reason, refused)
            kp, self._kp = self._kp, None
        self._chunks.clear()  # the old producer's outcomes no longer count
        self._sent_after = None
        if kp is not None:
            _close_kafka(kp, 0.0)

    def _mark_down(self, reason: str) -> None:
        with self._mu:
            was_up = self._broker_up
            self._broker_up = False
            self._last_error = reason
            self._cv.notify_all()
        if was_up is not False:
            log.warning("tapstream: Kafka unavailable (%s); records stay in the spool %s until it is back",
                        reason, self._spool.directory)


def _close_kafka(kp: KafkaProducer, timeout: float) -> None:
    """Close a KafkaProducer that may still hold undeliverable records.  kafka-python
    3.0.12's close() raises KafkaTimeoutError instead of giving up on them when the broker
    is away, and leaves its I/O thread running; those records are in the spool, so stop
    the thread (a private attribute: there is no public way)."""
    try:
        kp.close(timeout=timeout)
        return
    except Exception as exc:
        log.debug("tapstream: KafkaProducer.close: %s: %s", type(exc).__name__, exc)
    sender = getattr(kp, "_sender", None)
    if sender is not None and sender.is_alive():
        try:
            sender.force_close()
            sender.join(1.0)
        except Exception:
            log.debug("tapstream: force-closing kafka-python's sender failed", exc_info=True)
