"""Kafka at the actions stage's edges: anomalies in, decisions out, both through its SQLite state.

**In** (:class:`AnomalyFeed`).  The stage reads ``greymesh.anomalies`` with no consumer
group: it assigns itself every partition and keeps each partition's next offset in the
``feed_offsets`` table of its own database.  The caller handles a batch and calls
:meth:`AnomalyFeed.advance` *inside the same transaction* as the state the batch produced,
then commits; so after a kill -9 the stage resumes exactly after the last batch whose
effects it kept: no anomaly is lost and none is handled twice.  A partition with no stored
offset (a new data dir) starts at its end when the stage first sees it: an anomaly older
than the stage is history, not something to act on now.

**Out** (:class:`DecisionLog`).  A decision is written to ``feed_unsent`` in the
transaction that took it; :meth:`DecisionLog.flush`, after the commit, sends what is
unsent to ``greymesh.actions`` (acks=all) and deletes what Kafka acknowledged.  While
Kafka is away decisions wait in the table, in order (up to :data:`MAX_UNSENT`; beyond,
the oldest are dropped and counted, so a long outage cannot fill the disk).  A crash
between Kafka's ack and the delete sends a decision twice with the same ``event_id``;
the sink stores it once (it deduplicates by event id).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from core.contracts import ACTION_TOPIC, ANOMALY_TOPIC, NAMES, ActionDecision, AnomalyEvent
from core.kafka import KafkaAuth, client_config

log = logging.getLogger("greymesh.actions.feed")

MAX_UNSENT = 100_000
MAX_RECORD_BYTES = 4 * 1024 * 1024  # a record of anomalies larger than this is refused, not parsed
_SCHEMA = """
CREATE TABLE IF NOT EXISTS feed_offsets (partition INTEGER PRIMARY KEY, next_offset INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS feed_unsent (seq INTEGER PRIMARY KEY AUTOINCREMENT, service TEXT NOT NULL,
                                        event TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS feed_counts (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Batch:
    """Anomaly events read from Kafka, and the offsets to store once they are handled."""

    events: tuple[AnomalyEvent, ...]
    next_offsets: tuple[tuple[int, int], ...]  # (partition, next offset)
    refused: int  # records that were not JSON arrays of anomaly events (logged, skipped)


def decode(value: bytes) -> list[AnomalyEvent]:
    """The anomaly events of one record; ValueError saying what is wrong with it."""
    if len(value) > MAX_RECORD_BYTES:
        raise ValueError(f"record of {len(value)} bytes; the limit is {MAX_RECORD_BYTES}")
    doc = json.loads(value)
    if not isinstance(doc, list):
        raise ValueError("a record is a JSON array of anomaly events")
    events = []
    for i, item in enumerate(doc):
        if not isinstance(item, dict) or set(item) != set(NAMES["anomaly"]):
            raise ValueError(f"item {i}: not an anomaly event (keys must be {list(NAMES['anomaly'])})")
        if item["state"] not in ("open", "resolved"):
            raise ValueError(f"item {i}: state {item['state']!r} is neither open nor resolved")
        events.append(AnomalyEvent(**item))
    return events


class AnomalyFeed:
    """Kafka is connected on first use, so the process starts (and serves its API) while
    Kafka is away; every method but :meth:`advance` may raise KafkaError then."""

    def __init__(self, db: sqlite3.Connection, bootstrap: str, auth: KafkaAuth | None):
        self.db = db
        db.executescript(_SCHEMA)
        self.bootstrap, self.auth = bootstrap, auth
        self._consumer: KafkaConsumer | None = None
        self._assigned: set[int] = set()

    @property
    def consumer(self) -> KafkaConsumer:
        if self._consumer is None:
            self._consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False,
                                           client_id="greymesh-actions", **client_config(self.auth))
        return self._consumer

    def _assign(self) -> None:
        """Take every partition of the topic (new ones too), at the stored offsets."""
        partitions = self.consumer.partitions_for_topic(ANOMALY_TOPIC) or set()
        if partitions <= self._assigned:
            return
        tps = [TopicPartition(ANOMALY_TOPIC, p) for p in sorted(partitions)]
        self.consumer.assign(tps)
        stored = dict(self.db.execute("SELECT partition, next_offset FROM feed_offsets").fetchall())
        ends = self.consumer.end_offsets([tp for tp in tps if tp.partition not in stored])
        for tp in tps:
            offset = stored.get(tp.partition, ends.get(tp))
            self.consumer.seek(tp, offset)
            if tp.partition not in stored:  # start from here for good, even if nothing arrives yet
                self.db.execute("INSERT INTO feed_offsets VALUES (?, ?)", (tp.partition, offset))
        self.db.commit()
        self._assigned = set(partitions)

    def poll(self, timeout_ms: int = 500) -> Batch:
        """The events that arrived (possibly none).  Nothing is stored until :meth:`advance`."""
        self._assign()
        events: list[AnomalyEvent] = []
        offsets: dict[int, int] = {}
        refused = 0
        for tp, records in self.consumer.poll(timeout_ms=timeout_ms, max_records=500).items():
            for record in records:
                try:
                    events.extend(decode(record.value))
                except (ValueError, TypeError) as exc:
                    refused += 1
                    log.warning("skipped record %s/%d@%d: %s", tp.topic, tp.partition, record.offset, exc)
                offsets[tp.partition] = record.offset + 1
        return Batch(tuple(events), tuple(sorted(offsets.items())), refused)

    def advance(self, batch: Batch) -> None:
        """Store the batch's offsets; call inside the transaction that kept its effects."""
        self.db.executemany("INSERT OR REPLACE INTO feed_offsets VALUES (?, ?)", batch.next_offsets)

    def rewind(self) -> None:
        """After a failed batch (rolled back): read again from the stored offsets."""
        self._assigned = set()

    def lag(self) -> int:
        """Records in the topic not yet read (0 when nothing is assigned)."""
        assigned = self.consumer.assignment() if self._consumer is not None else set()
        if not assigned:
            return 0
        ends = self.consumer.end_offsets(list(assigned))
        return sum(max(0, end - self.consumer.position(tp)) for tp, end in ends.items())

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()


class DecisionLog:
    """Like the feed, connects to Kafka on the first :meth:`flush`."""

    def __init__(self, db: sqlite3.Connection, bootstrap: str, auth: KafkaAuth | None):
        self.db = db
        db.executescript(_SCHEMA)
        self.bootstrap, self.auth = bootstrap, auth
        self._producer: KafkaProducer | None = None

    def record(self, decision: ActionDecision) -> None:
        """Keep a decision to send; call inside the transaction that took it."""
        self.db.execute("INSERT INTO feed_unsent (service, event) VALUES (?, ?)",
                        (decision.service, json.dumps(decision.to_event())))
        over = self.unsent() - MAX_UNSENT
        if over > 0:
            self.db.execute("DELETE FROM feed_unsent WHERE seq IN (SELECT seq FROM feed_unsent ORDER BY seq LIMIT ?)",
                            (over,))
            self.db.execute("INSERT INTO feed_counts VALUES ('dropped', ?) ON CONFLICT(name) DO UPDATE "
                            "SET value = value + excluded.value", (over,))
            log.error("Kafka has been away too long: dropped the %d oldest unsent decisions", over)

    def unsent(self) -> int:
        return self.db.execute("SELECT count(*) FROM feed_unsent").fetchone()[0]

    def dropped(self) -> int:
        row = self.db.execute("SELECT value FROM feed_counts WHERE name = 'dropped'").fetchone()
        return row[0] if row else 0

    def _pending(self, limit: int) -> Iterator[tuple[int, str, str]]:
        yield from self.db.execute("SELECT seq, service, event FROM feed_unsent ORDER BY seq LIMIT ?", (limit,))

    def flush(self, limit: int = 1000) -> int:
        """Send unsent decisions in order, one record per decision keyed by service; delete
        those Kafka acknowledged.  Returns how many were sent; a Kafka error leaves the rest."""
        rows = list(self._pending(limit))
        sent: list[int] = []
        try:
            if rows and self._producer is None:
                self._producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all",
                                               client_id="greymesh-actions", max_block_ms=5000,
                                               **client_config(self.auth))
            for seq, service, event in rows:
                self._producer.send(ACTION_TOPIC, key=service.encode(),
                                   value=json.dumps([json.loads(event)]).encode()).get(timeout=10)
                sent.append(seq)
        except KafkaError as exc:
            log.warning("could not send decisions to %s (%s); %d wait", ACTION_TOPIC, exc, len(rows) - len(sent))
        if sent:
            self.db.executemany("DELETE FROM feed_unsent WHERE seq = ?", [(s,) for s in sent])
            self.db.commit()
        return len(sent)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=5)
