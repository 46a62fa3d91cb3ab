"""The store sink: a Kafka consumer group that batch-inserts tap events into ClickHouse.

Rows are gathered for up to BATCH_S or BATCH_ROWS and inserted one INSERT per table.
Offsets are committed only after the rows they carry are in the store, so a crash
replays, and never skips, what was not stored.  A replay must not duplicate rows, and
the producer side may itself have written a record twice (a send whose ack was lost is
spooled and sent again), so every row carries its Kafka partition and offset and
events are deduplicated by ``event_id``:

* per partition, the ids of the most recent events are kept in a bounded window; an
  event whose id is in it is dropped;
* when a partition is assigned (start, rebalance), its window is seeded from the store
  with the ids stored since a little before the committed offset;
* after a failed insert, the ids of the batch that did reach the store are read back
  before the insert is retried, since a failure may hide a partial success.

A record that is not a JSON array of well-formed events is counted and skipped (its
offset is committed like any other): one bad record never blocks a partition.  While
the store is down the sink retries the same batch with backoff and polls nothing more;
Kafka holds the backlog, and the sink catches up when the store returns.

Sinks scale with partitions: run as many as the topics have partitions, all in the
same group; each owns its partitions' windows.
"""

from __future__ import annotations

import argparse
import json
import logging
import operator
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from audit.store import Store, StoreError, open_store, table_for
from core import contracts, credentials
from core.credentials import CredentialError
from core.kafka import SINK_GROUP, KafkaAuth, add_secret_argument, auth_from_args, client_config
from core.jsonhttp import ACTIONS, CLI, Access, ApiHandler, Credential, serve

log = logging.getLogger("greymesh.sink")

GROUP = SINK_GROUP
MAX_RECORD_BYTES = 8 << 20  # a collector's records are < 0.5 MiB; anything this big is not ours
WINDOW_EVENTS = 200_000  # ids remembered per partition for deduplication
SEED_RECORDS = 2_000  # seed a window from the store starting this many records before the commit
RETRY_MAX_S = 5.0
STATS_EVERY_S = 2.0
# ClickHouse wants few large inserts (each makes a part per table and view, merged later
# in the background): a batch is stored at this many rows or this age, whichever first.
BATCH_ROWS = 50_000
BATCH_S = 0.5
MAX_QUERY_BODY_BYTES = 1 << 20  # {"sql": ...}: a query, not data
SCORER = "scorer"  # the principal of the scorer's token: it may query, nothing else

EVENT_ID = 1  # the column index of event_id in every layer (asserted below)
assert all(names.index("event_id") == EVENT_ID for names in contracts.NAMES.values())
_INT_RANGE = {"UInt8": 1 << 8, "UInt16": 1 << 16, "UInt32": 1 << 32, "UInt64": 1 << 64}


class Malformed(ValueError):
    """A record or event that does not follow tapstream.contracts."""


class EventDecoder:
    """Turns one layer's records into checked row tuples in the store's column order."""

    def __init__(self, layer: contracts.Layer, max_record_bytes: int = MAX_RECORD_BYTES):
        self.layer = layer
        self.max_record_bytes = max_record_bytes
        self.names = contracts.NAMES[layer]
        kinds = [kind for _, kind, _ in contracts.COLUMNS[layer]]
        # Checked with C-level calls only (this runs for every event): the exact type of
        # every column at once, then the integer columns against their bounds.
        self._types = tuple(int if kind in _INT_RANGE else float if kind == "Float64" else str for kind in kinds)
        self._floats = "Float64" in kinds
        ints = [i for i, kind in enumerate(kinds) if kind in _INT_RANGE]
        self._int_values = operator.itemgetter(*ints)
        self._int_bounds = tuple(_INT_RANGE[kinds[i]] for i in ints)

    def rows(self, value: bytes) -> tuple[list[tuple[Any, ...]], int]:
        """The record's rows, and how many of its events were malformed (skipped).
        Malformed when the record as a whole is not a JSON array."""
        if len(value) > self.max_record_bytes:
            raise Malformed(f"record of {len(value)} bytes, more than {self.max_record_bytes}")
        try:
            events = json.loads(value)
        except ValueError as exc:
            raise Malformed(f"not JSON: {exc}") from None
        if not isinstance(events, list):
            raise Malformed(f"a JSON {type(events).__name__}, not an array of events")
        rows, bad = [], 0
        names, types, int_values, bounds = self.names, self._types, self._int_values, self._int_bounds
        lt = operator.lt
        for event in events:
            try:
                row = tuple([event[n] for n in names])
            except (KeyError, TypeError):
                bad += 1
                continue
            if tuple(map(type, row)) != types and self._floats:
                # A Float64 value written as a whole number (2, not 2.0) is still a number.
                row = tuple(float(v) if t is float and type(v) is int else v for v, t in zip(row, types))
            if tuple(map(type, row)) == types:
                values = int_values(row)
                if min(values) >= 0 and all(map(lt, values, bounds)):
                    rows.append(row)
                    continue
            bad += 1
        return rows, bad


class RecentIds:
    """A bounded window of the event ids most recently stored from one partition."""

    def __init__(self, capacity: int = WINDOW_EVENTS):
        self._order: deque[str] = deque()
        self._ids: set[str] = set()
        self.capacity = capacity

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._ids

    def add(self, event_id: str) -> bool:
        """Remember ``event_id``; False if it was already remembered (a duplicate)."""
        if event_id in self._ids:
            return False
        self._ids.add(event_id)
        self._order.append(event_id)
        if len(self._order) > self.capacity:
            self._ids.discard(self._order.popleft())
        return True


@dataclass
class SinkStats:
    records: int = 0  # Kafka records consumed
    rows: dict[str, int] = field(default_factory=lambda: {t: 0 for t in contracts.LAYERS})  # inserted, by layer
    duplicates: int = 0  # events dropped as already stored
    malformed_records: int = 0
    malformed_events: int = 0
    insert_failures: int = 0
    lag: dict[str, int] = field(default_factory=dict)  # topic -> records not yet consumed
    last_error: str = ""
    last_insert_unix: float = 0.0
# A killed sink's partitions wait this long for the restarted one (kafka-python's default
# is 45 s).  6 s is the least a broker accepts by default (group.min.session.timeout.ms).
SESSION_TIMEOUT_MS = 6_000


class Sink:
    """Consumes the tap topics into ``store``; call :meth:`run` (or :meth:`step` in tests)."""

    def __init__(self, store: Store, bootstrap: str, *, group: str = GROUP, auth: KafkaAuth | None = None,
                 layers: Iterable[contracts.Layer] = contracts.LAYERS, max_poll_records: int = 2_000,
                 max_record_bytes: int = MAX_RECORD_BYTES):
        self.store = store
        self.decoders = {contracts.topic(layer): EventDecoder(layer, max_record_bytes) for layer in layers}
        self.windows: dict[TopicPartition, RecentIds] = {}
        self.stats = SinkStats()
        self.store_lock = threading.Lock()  # the store is shared with the query API's threads
        self._lag_at = 0.0
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group, client_id=f"{group}-{id(self):x}",
            enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=max_poll_records,
            max_partition_fetch_bytes=max(max_record_bytes, 1 << 20), fetch_max_bytes=64 << 20,
            # Retrying an insert against a store that is down for minutes must not cost us
            # the group membership: the heartbeat thread keeps it, this bounds the wait.
            max_poll_interval_ms=15 * 60 * 1000,
            # A killed sink's partitions go to the group again (a restarted sink, or another)
            # once its session expires.  Static membership (group_instance_id) would skip the
            # wait, but kafka-python's static member did not rejoin after a broker restart.
            session_timeout_ms=SESSION_TIMEOUT_MS, heartbeat_interval_ms=SESSION_TIMEOUT_MS // 6,
            **client_config(auth),
        )
        # kafka-python calls the listener on its I/O thread, where no blocking call (the
        # committed offset, the store) may run: it only notes the partitions.
        self._unseeded: set[TopicPartition] = set()
        # The batch being gathered: rows by topic, and the offsets to commit once stored.
        self._pending: dict[str, list[tuple[Any, ...]]] = {}
        self._offsets: dict[TopicPartition, int] = {}
        self._pending_rows = 0
        self._pending_since: float | None = None
        self.consumer.subscribe(list(self.decoders), listener=_Rebalance(self._unseeded.update))

    def _seed(self, tp: TopicPartition) -> None:
        """Start a newly assigned partition's window with what the store already has from
        it, from a little before the committed offset on."""
        committed = self.consumer.committed(tp) or 0
        table = table_for(contracts.layer_of_topic(tp.topic))
        with self.store_lock:
            ids = self._retrying(lambda: self.store.existing_event_ids(table, tp.partition,
                                                                       max(0, committed - SEED_RECORDS)))
        window = self.windows[tp] = RecentIds()
        for event_id in ids:
            window.add(event_id)
        log.info("%s[%d]: from offset %d, %d event ids already stored", tp.topic, tp.partition, committed, len(ids))

    def step(self, timeout_ms: int = 1000) -> int:
        """Poll once and add what came to the pending batch; store the batch and commit
        its offsets when it is large or old enough.  Returns the rows inserted."""
        if self._pending_since is not None:  # do not sleep past the batch's deadline
            timeout_ms = max(0, min(timeout_ms, int((self._pending_since + BATCH_S - time.monotonic()) * 1000)))
        polled = self.consumer.poll(timeout_ms=timeout_ms)
        while self._unseeded:  # assigned during that poll; seeded before any of their records
            self._seed(self._unseeded.pop())
        for tp, records in polled.items():
            rows = self._decode(tp, records)
            if rows:
                self._pending.setdefault(tp.topic, []).extend(rows)
                self._pending_rows += len(rows)
            self._offsets[tp] = records[-1].offset + 1
            self.stats.records += len(records)
        if polled and self._pending_since is None:
            self._pending_since = time.monotonic()
        inserted = 0
        if self._offsets and (self._pending_rows >= BATCH_ROWS or time.monotonic() - self._pending_since >= BATCH_S):
            inserted = self.flush()
        if time.monotonic() - self._lag_at > STATS_EVERY_S:
            self._measure_lag()
        return inserted

    def flush(self) -> int:
        """Store every pending row (retrying while the store is away), then commit the
        offsets they came from; returns the rows inserted."""
        inserted = 0
        for topic, rows in self._pending.items():
            self._insert(topic, rows)
            inserted += len(rows)
        # Stored: the batch is done even if the commit fails (a rebalance took a partition);
        # its records then come back to the partition's next owner and are deduplicated.
        offsets = {tp: OffsetAndMetadata(o, "", -1) for tp, o in self._offsets.items()}
        self._pending.clear()
        self._offsets.clear()
        self._pending_rows, self._pending_since = 0, None
        if offsets:
            self.consumer.commit(offsets)
        return inserted

    def _decode(self, tp: TopicPartition, records: list[Any]) -> list[tuple[Any, ...]]:
        decoder = self.decoders[tp.topic]
        window = self.windows[tp]
        rows: list[tuple[Any, ...]] = []
        for record in records:
            try:
                record_rows, bad = decoder.rows(record.value)
            except Malformed as exc:
                self.stats.malformed_records += 1
                log.warning("%s[%d]@%d skipped: %s", tp.topic, tp.partition, record.offset, exc)
                continue
            self.stats.malformed_events += bad
            for row in record_rows:
                # Into the window now: the row is pending, and stays so until it is stored.
                if window.add(row[EVENT_ID]):
                    rows.append((*row, tp.partition, record.offset))
                else:
                    self.stats.duplicates += 1
        return rows

    def _insert(self, topic: str, rows: list[tuple[Any, ...]]) -> None:
        layer = contracts.layer_of_topic(topic)
        table = table_for(layer)
        columns = (*contracts.NAMES[layer], "kpartition", "koffset")
        pending = rows
        delay = 0.2
        while pending:
            try:
                with self.store_lock:
                    self.store.insert(table, columns, pending)
                break
            except StoreError as exc:
                self.stats.insert_failures += 1
                self.stats.last_error = str(exc)
                log.warning("insert of %d rows into %s failed, retrying in %.1f s: %s", len(pending), table, delay, exc)
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                # The failed insert may have reached the store after all: never insert twice.
                try:
                    stored = self._stored_ids(table, pending)
                except StoreError:
                    continue
                pending = [r for r in pending if r[EVENT_ID] not in stored]
        self.stats.rows[layer] += len(rows)
        self.stats.last_insert_unix = time.time()

    def _stored_ids(self, table: str, rows: list[tuple[Any, ...]]) -> set[str]:
        """The ids of ``rows`` already in the store (rows end with partition, offset)."""
        first: dict[int, int] = {}
        for *_, partition, offset in rows:
            first[partition] = min(offset, first.get(partition, offset))
        stored: set[str] = set()
        with self.store_lock:
            for partition, offset in first.items():
                stored |= self.store.existing_event_ids(table, partition, offset)
        return stored

    def _measure_lag(self) -> None:
        self._lag_at = time.monotonic()
        assigned = self.consumer.assignment()
        if not assigned:
            return
        try:
            ends = self.consumer.end_offsets(list(assigned))
        except Exception as exc:  # the broker is away: keep the last figure
            log.debug("lag not measured: %s", exc)
            return
        lag: dict[str, int] = {}
        for tp, end in ends.items():
            lag[tp.topic] = lag.get(tp.topic, 0) + max(0, end - self.consumer.position(tp))
        self.stats.lag = lag

    def _retrying(self, call: Callable[[], Any]) -> Any:
        delay = 0.2
        while True:
            try:
                return call()
            except StoreError as exc:
                self.stats.last_error = str(exc)
                log.warning("store not answering, retrying in %.1f s: %s", delay, exc)
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    def snapshot(self) -> dict[str, Any]:
        doc = asdict(self.stats)
        doc["store"] = self.store.url
        return doc

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set.  Kafka trouble is logged and waited out, never fatal:
        uncommitted records come back (to this sink or another) and are deduplicated."""
        while not stop.is_set():
            try:
                self.step()
            except KafkaError as exc:
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("Kafka: %s; going on", self.stats.last_error)
                stop.wait(1.0)
        try:
            self.flush()  # what was gathered goes in before the sink leaves the group
        except KafkaError as exc:  # not committed: the next owner reads it again, deduplicated
            log.warning("last commit failed: %s", exc)

    def close(self) -> None:
        self.consumer.close()


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, on_assigned: Callable[[Iterable[TopicPartition]], None]):
        self.on_assigned = on_assigned

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        pass  # every batch is committed as soon as it is stored: nothing is pending here

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self.on_assigned(assigned)


def api_access(api_token: Path, scorer_token: Path, actions_token: Path | None = None) -> Access:
    """Who may call the sink's API: the CLI (both paths), the scorer and the actions stage
    (``/query`` only)."""
    readers = (Credential.load(SCORER, scorer_token),
               *((Credential.load(ACTIONS, actions_token),) if actions_token else ()))
    return Access((Credential.load(CLI, api_token), *readers), MAX_QUERY_BODY_BYTES,
                  only={"/stats": frozenset({CLI}), "/query": frozenset({CLI, *(r.principal for r in readers)})})


def serve_api(sink: Sink, host: str, port: int, access: Access) -> ThreadingHTTPServer:
    """The sink's loopback API: ``GET /stats`` and ``POST /query`` (``{"sql": ...}``,
    read-only), for the holders ``access`` names (core/jsonhttp.py checks every request).
    Queries go through the sink because an embedded (chdb) store belongs to the one
    process that opened it."""

    class Handler(ApiHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path == "/stats":
                self.send_json(200, sink.snapshot())
            else:
                self.send_json(404, {"error": f"no {self.path} here: GET /stats, POST /query"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/query":
                self.send_json(404, {"error": f"no {self.path} here: GET /stats, POST /query"})
                return
            try:
                sql = json.loads(self.read_body())["sql"]
                if not isinstance(sql, str):
                    raise TypeError("sql must be a string")
            except (ValueError, KeyError, TypeError) as exc:
                self.send_json(400, {"error": f'send {{"sql": "SELECT ..."}}: {exc}'})
                return
            try:  # the store's sandbox bounds it; the sink's inserts do not wait for it
                columns, rows = sink.store.query_readonly(sql)
            except StoreError as exc:
                self.send_json(400, {"error": str(exc)})
                return
            self.send_json(200, {"columns": columns, "rows": [[_jsonable(v) for v in r] for r in rows]})

    server = serve(Handler, host, port, access)
    threading.Thread(target=server.serve_forever, name="sink-api", daemon=True).start()
    return server


def _jsonable(value: Any) -> Any:
    """Query values as JSON: DateTime columns as ISO 8601 text, everything else as is."""
    return value.isoformat() if isinstance(value, (datetime, date)) else value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m audit.sink", description="Consume the tap topics into the store.")
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--kafka", required=True, help="bootstrap servers, host:port[,host:port...]")
    p.add_argument("--store", default=None, help="clickhouse://[user@]host:9000/db[?secure=1&ca_certs=FILE] "
                                                 "(default: embedded chdb in the data dir)")
    p.add_argument("--store-password-file", type=Path, default=None,
                   help="a 0600 file holding the ClickHouse server's password (never the password itself)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, required=True, help="the /stats and /query API")
    p.add_argument("--api-token-file", type=Path, required=True, help="the CLI's token (0600): /stats and /query")
    p.add_argument("--scorer-token-file", type=Path, required=True, help="the scorer's token (0600): /query")
    p.add_argument("--actions-token-file", type=Path, help="the actions stage's token (0600): /query")
    add_secret_argument(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # a line per failed reconnect, many a second
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        access = api_access(args.api_token_file, args.scorer_token_file, args.actions_token_file)
        kafka_auth = auth_from_args(args)
        password = credentials.read(args.store_password_file) if args.store_password_file else ""
    except CredentialError as exc:
        log.error("%s", exc)
        return 2
    store = open_store(args.store, data_dir=args.data_dir, password=password)
    applied = store.migrate()
    log.info("store %s: migrations applied now: %s", store.url, applied or "none (up to date)")
    sink = Sink(store, args.kafka, auth=kafka_auth)
    server = serve_api(sink, args.host, args.http_port, access)
    log.info("sink: Kafka %s -> %s; API on %s:%d", args.kafka, store.url, args.host, args.http_port)
    try:
        sink.run(stop)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        sink.close()
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
