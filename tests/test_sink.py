"""The store sink on a real Kafka broker, into both store backends (chdb and the
ClickHouse 18.16 server): bad records are counted and skipped, and no replay, whether
from the producer re-sending or from a sink crash, stores an event twice."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from core import contracts
from core.kafka import SCORER, TAPS
from audit.sink import Sink
from audit.store import Store, StoreError, table_for
from tests.support.kafka import Broker, running_broker
from tests.support.mesh import wait_for

TOPIC = contracts.topic("l7")


@pytest.fixture
def kafka(tmp_path: Path) -> Iterator[Broker]:
    # Secured as in a mesh: records are produced as the taps and the scorer; the tests' sinks
    # join groups of their own, which only the admin may (the sink's principal has one group).
    with running_broker(tmp_path / "kafka") as b:
        yield b


def event(sidecar: str, i: int) -> dict[str, Any]:
    """A well-formed l7 event (every column of the schema, right types)."""
    doc: dict[str, Any] = {name: (0 if kind.startswith("UInt") else "") for name, kind, _ in contracts.COLUMNS["l7"]}
    doc.update(v=1, event_id=f"{sidecar}-{i:06d}".ljust(32, "0"), time_us=1_795_000_000_000_000 + i * 1000,
               sidecar=sidecar, service="payments", direction="inbound", method="GET", path=f"/p/{i}", status=200)
    return doc


def produce(kafka: Broker, values: list[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", **kafka.auth(TAPS).client_config())
    for value in values:
        producer.send(TOPIC, key=b"payments", value=value)
    producer.flush(30)
    producer.close()


def stored(store: Store, sidecar: str) -> list[tuple]:
    return store.query(f"SELECT event_id FROM {table_for('l7')} WHERE sidecar = %(s)s ORDER BY event_id", {"s": sidecar})


def consume_until(sink: Sink, done: Any, what: str) -> None:
    wait_for(lambda: sink.step(timeout_ms=500) >= 0 and done(), 60, what, interval=0)


def test_bad_records_are_counted_and_skipped_and_resent_events_stored_once(kafka: Broker, store: Store):
    sidecar = f"sink-{uuid.uuid4().hex[:8]}"
    good = [event(sidecar, i) for i in range(300)]
    wrong_type = event(sidecar, 900) | {"status": "200"}
    missing = {k: v for k, v in event(sidecar, 901).items() if k != "path"}
    negative = event(sidecar, 902) | {"duration_us": -1}
    values = [
        json.dumps(good[:100]).encode(),
        b"{not json",
        json.dumps({"an": "object"}).encode(),
        json.dumps([wrong_type, *good[100:200], missing, negative]).encode(),
        b"[" + b" " * 300_000 + b"]",  # over the sink's record limit
        json.dumps(good[100:300]).encode(),  # the producer re-sent a record: 100 events again
    ]
    produce(kafka, values)
    # A record limit below the broker's own (1 MiB), so that the broker lets one through.
    sink = Sink(store, kafka.bootstrap, auth=kafka.admin, group=f"g-{sidecar}", layers=["l7"], max_record_bytes=200_000)
    try:
        consume_until(sink, lambda: sink.stats.records >= len(values), "every record to be consumed")
        sink.flush()
    finally:
        sink.close()
    assert [r[0] for r in stored(store, sidecar)] == sorted(e["event_id"] for e in good)
    assert sink.stats.malformed_records == 3  # not JSON, not an array, too large
    assert sink.stats.malformed_events == 3  # wrong type, missing field, negative
    assert sink.stats.duplicates == 100


class FailsAfterInserting:
    """A store whose next insert reaches the table and then reports failure, as a
    connection lost after the server applied the INSERT would."""

    def __init__(self, inner: Store):
        self.inner, self.armed, self.url = inner, True, inner.url

    def insert(self, table: str, columns: Any, rows: Any) -> None:
        self.inner.insert(table, columns, rows)
        if self.armed:
            self.armed = False
            raise StoreError("connection lost after the insert (simulated)")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_sink_crash_or_a_failed_insert_that_did_land_stores_nothing_twice(kafka: Broker, store: Store):
    sidecar = f"sink-{uuid.uuid4().hex[:8]}"
    events = [event(sidecar, i) for i in range(1_000)]
    records = [json.dumps(events[i:i + 50]).encode() for i in range(0, 1_000, 50)]
    produce(kafka, records[:10])
    group = f"g-{sidecar}"

    # 1: the insert lands but reports failure; the retry must not insert it again.
    flaky = FailsAfterInserting(store)
    sink = Sink(flaky, kafka.bootstrap, auth=kafka.admin, group=group, layers=["l7"])  # type: ignore[arg-type]
    consume_until(sink, lambda: sink.stats.rows["l7"] >= 500, "the first records, through the failing insert")
    assert sink.stats.insert_failures == 1 and not flaky.armed
    assert [r[0] for r in stored(store, sidecar)] == sorted(e["event_id"] for e in events[:500])

    # 2: the sink dies after storing a batch but before committing it.
    produce(kafka, records[10:])
    sink.consumer.commit = lambda *a, **k: (_ for _ in ()).throw(SystemExit("crash"))  # type: ignore[method-assign]
    with pytest.raises(SystemExit):
        while True:
            sink.step(timeout_ms=500)
    sink.consumer.close(autocommit=False)
    before = len(stored(store, sidecar))
    assert before > 0

    # A new sink of the same group re-reads what was not committed.
    sink = Sink(store, kafka.bootstrap, auth=kafka.admin, group=group, layers=["l7"])
    try:
        consume_until(sink, lambda: len(stored(store, sidecar)) >= 1_000 and not any(sink.stats.lag.values()),
                      "the rest of the topic")
    finally:
        sink.close()
    assert [r[0] for r in stored(store, sidecar)] == sorted(e["event_id"] for e in events)
    assert sink.stats.duplicates > 0  # it did see the replayed events, and dropped them


def test_anomaly_events_are_stored_with_their_scores(kafka: Broker, store: Store):
    """The ml stage's events take the same path; Float64 columns take whole numbers too."""
    run = uuid.uuid4().hex[:8]

    def anomaly(i: int, **fields: Any) -> dict[str, Any]:
        doc: dict[str, Any] = {name: (0 if kind.startswith("UInt") else 0.5 if kind == "Float64" else "")
                               for name, kind, _ in contracts.COLUMNS["anomaly"]}
        return doc | {"v": 1, "event_id": f"{run}-{i}", "time_us": 1_795_000_000_000_000 + i * 10**7,
                      "service": f"svc-{run}", "state": "open", "score": 7.25, "threshold": 1.5} | fields

    events = [anomaly(0), anomaly(1, score=2, peak_score=3), anomaly(2, score="high")]
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", **kafka.auth(SCORER).client_config())
    producer.send(contracts.ANOMALY_TOPIC, key=b"svc", value=json.dumps(events).encode())
    producer.flush(30)
    producer.close()
    sink = Sink(store, kafka.bootstrap, auth=kafka.admin, group=f"g-{run}", layers=["anomaly"])
    try:
        consume_until(sink, lambda: sink.stats.records >= 1, "the anomaly record to be consumed")
        sink.flush()
    finally:
        sink.close()
    rows = store.query(f"SELECT event_id, score, threshold, peak_score FROM {table_for('anomaly')} "
                       "WHERE service = %(s)s ORDER BY event_id", {"s": f"svc-{run}"})
    assert rows == [(f"{run}-0", 7.25, 1.5, 0.5), (f"{run}-1", 2.0, 1.5, 3.0)]
    assert table_for("anomaly") == "anomalies"
    assert sink.stats.malformed_events == 1  # the score that is not a number
