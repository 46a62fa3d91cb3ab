"""The durable outbox of notifications: what the actions stage has decided to tell Slack
and PagerDuty, until each receiver has taken it.

A row is one message to one receiver: its kind (the wire format, see actions/receivers.py),
its body as JSON *without secrets* (a row names the receiver; the webhook URL or routing
key is read from the receiver's SecretRef only when it is sent) and a dedup id.  Tables:
``outbox_messages`` (the rows) and ``outbox_receivers`` (per receiver: when it may be sent
to next, whether it is broken, its counters).

**Order.**  Messages to one receiver go out one at a time, oldest first: :meth:`Outbox.due`
gives each ready receiver's oldest pending message (its head) and nothing behind it.  A
retried head therefore holds back its receiver's later messages, so a PagerDuty resolve never
overtakes the trigger it resolves; other receivers are not held back.

**Transactions.**  No method commits: the caller does, and that is the contract that makes
a kill -9 lose and double nothing.

* Enqueue inside the transaction that decided to notify (the anomaly's Kafka offsets, the
  notifier's group state), then commit once.  Killed before the commit: neither the decision
  nor the row exists, and both are made again from the same input.  The dedup id is derived
  from that input (never random), so enqueueing it again is a no-op: the same dedup id twice
  is one row.
* Sending (actions/receivers.py, :class:`~actions.receivers.Dispatcher`): :meth:`started`
  and commit *before* the request, then the request, then :meth:`mark_sent` (or
  :meth:`retry_at`, :meth:`fail`, :meth:`mark_broken`) and commit.  Killed before the first
  commit: the message was never sent, it is sent after the restart.  Killed between the two
  commits: the receiver may or may not have the message; the row is still pending with
  ``resumed`` set, and it is sent again.  So delivery is **at least once**, and a duplicate
  needs a crash inside one request's round trip (at most one duplicate per receiver per
  crash, since a receiver has at most one message in flight).  What a duplicate does there:
  PagerDuty deduplicates alert events by ``dedup_key`` (a second trigger for an open alert
  adds a log entry to the same incident, a second resolve is dropped), so a re-sent alert
  event is harmless; a re-sent change event shows twice in the service's change list.  A
  Slack incoming webhook has no idempotency key: a re-sent message is posted twice, and the
  dispatcher marks such a re-send as possibly a duplicate in its text.

**Bounds.**  A receiver keeps at most :data:`MAX_PENDING` pending messages (a broken
receiver queues until its configuration is fixed); beyond that its oldest are dropped,
counted and logged.  Delivered and failed rows are kept for :meth:`prune` (their dedup ids
answer a re-enqueue until then).
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger("greymesh.actions.outbox")

MAX_PENDING = 10_000  # per receiver
State = Literal["pending", "sent", "failed", "dropped"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dedup_id TEXT NOT NULL UNIQUE,
    receiver TEXT NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    inflight INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    done_at REAL);
CREATE INDEX IF NOT EXISTS outbox_messages_pending ON outbox_messages (receiver, state, id);
CREATE TABLE IF NOT EXISTS outbox_receivers (
    name TEXT PRIMARY KEY,
    not_before REAL NOT NULL DEFAULT 0,
    broken TEXT,
    broken_at REAL,
    fingerprint TEXT,
    last_error TEXT,
    last_error_at REAL,
    sent INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    dropped INTEGER NOT NULL DEFAULT 0);
"""


@dataclass(frozen=True)
class Message:
    """One pending message.  ``resumed``: an attempt started and never concluded (the process
    died during it), so the receiver may already have it."""

    id: int
    dedup_id: str
    receiver: str
    kind: str
    body: str  # JSON, no secrets
    created_at: float
    attempts: int
    resumed: bool


@dataclass(frozen=True)
class ReceiverState:
    """What the outbox knows of one receiver (actions/receivers.py turns it into a status)."""

    name: str
    not_before: float  # nothing is sent to it before this (rate limit, Retry-After, backoff)
    broken: str | None  # why it is broken (its answer), or None
    broken_at: float | None
    fingerprint: str | None  # of the configuration it broke with; a new one repairs it
    last_error: str | None
    last_error_at: float | None
    sent: int
    failed: int
    dropped: int
    queued: int  # pending messages
    head_error: str | None  # why its oldest pending message is not delivered yet (None: not tried yet)


class Outbox:
    def __init__(self, db: sqlite3.Connection):
        self.db = db
        db.executescript(_SCHEMA)

    def _receiver(self, name: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO outbox_receivers (name) VALUES (?)", (name,))

    def enqueue(self, receiver: str, kind: str, body: str, dedup_id: str, now: float) -> bool:
        """Queue ``body`` for ``receiver``; False when ``dedup_id`` is already queued or done."""
        self._receiver(receiver)
        cur = self.db.execute("INSERT OR IGNORE INTO outbox_messages (dedup_id, receiver, kind, body, created_at) "
                              "VALUES (?, ?, ?, ?, ?)", (dedup_id, receiver, kind, body, now))
        if cur.rowcount == 0:
            return False
        over = self.db.execute("SELECT count(*) FROM outbox_messages WHERE receiver = ? AND state = 'pending'",
                               (receiver,)).fetchone()[0] - MAX_PENDING
        if over > 0:
            self.db.execute("UPDATE outbox_messages SET state = 'dropped', done_at = ?, last_error = 'queue full' "
                            "WHERE id IN (SELECT id FROM outbox_messages WHERE receiver = ? AND state = 'pending' "
                            "AND inflight = 0 ORDER BY id LIMIT ?)", (now, receiver, over))
            self.db.execute("UPDATE outbox_receivers SET dropped = dropped + ? WHERE name = ?", (over, receiver))
            log.error("receiver %s: %d messages wait (the limit is %d); dropped the oldest %d",
                      receiver, MAX_PENDING + over, MAX_PENDING, over)
        return True

    def due(self, now: float) -> list[Message]:
        """The oldest pending message of every receiver that is not broken and may be sent to now."""
        rows = self.db.execute(
            "SELECT m.id, m.dedup_id, m.receiver, m.kind, m.body, m.created_at, m.attempts, m.inflight "
            "FROM outbox_messages m JOIN outbox_receivers r ON r.name = m.receiver "
            "WHERE m.id IN (SELECT min(id) FROM outbox_messages WHERE state = 'pending' GROUP BY receiver) "
            "AND r.broken IS NULL AND r.not_before <= ? ORDER BY m.id", (now,)).fetchall()
        return [Message(i, d, r, k, b, c, a, bool(f)) for i, d, r, k, b, c, a, f in rows]

    def started(self, message_id: int) -> None:
        """An attempt begins (commit before sending): counted, and remembered as in flight."""
        self.db.execute("UPDATE outbox_messages SET attempts = attempts + 1, inflight = 1 WHERE id = ?",
                        (message_id,))

    def hold(self, receiver: str, until: float) -> None:
        """Send nothing to ``receiver`` before ``until`` (a later hold already set stays)."""
        self._receiver(receiver)
        self.db.execute("UPDATE outbox_receivers SET not_before = max(not_before, ?) WHERE name = ?",
                        (until, receiver))

    def mark_sent(self, message_id: int, now: float) -> None:
        self._conclude(message_id, "sent", now, None, "sent")

    def fail(self, message_id: int, error: str, now: float) -> None:
        """Failed for good (the receiver refused this message; it is not retried)."""
        self._conclude(message_id, "failed", now, error, "failed")
        self._error(message_id, error, now)

    def retry_at(self, message_id: int, at: float, error: str, now: float) -> None:
        """Not delivered; try again at ``at`` (the receiver waits until then, keeping its order)."""
        row = self.db.execute("SELECT receiver FROM outbox_messages WHERE id = ?", (message_id,)).fetchone()
        self.db.execute("UPDATE outbox_messages SET inflight = 0, last_error = ? WHERE id = ?", (error, message_id))
        if row:
            self.hold(row[0], at)
        self._error(message_id, error, now)

    def mark_broken(self, message_id: int, error: str, fingerprint: str, now: float) -> None:
        """The receiver refused because of its configuration: nothing is sent to it (its
        messages wait) until :meth:`repair`, which the dispatcher calls once the receiver's
        configuration no longer has ``fingerprint``."""
        row = self.db.execute("SELECT receiver FROM outbox_messages WHERE id = ?", (message_id,)).fetchone()
        self.db.execute("UPDATE outbox_messages SET inflight = 0, last_error = ? WHERE id = ?", (error, message_id))
        if row:
            self.db.execute("UPDATE outbox_receivers SET broken = ?, broken_at = ?, fingerprint = ? WHERE name = ?",
                            (error, now, fingerprint, row[0]))
        self._error(message_id, error, now)

    def repair(self, receiver: str) -> None:
        self.db.execute("UPDATE outbox_receivers SET broken = NULL, broken_at = NULL, fingerprint = NULL, "
                        "not_before = 0 WHERE name = ?", (receiver,))

    def _conclude(self, message_id: int, state: State, now: float, error: str | None, counter: str) -> None:
        row = self.db.execute("SELECT receiver FROM outbox_messages WHERE id = ? AND state = 'pending'",
                              (message_id,)).fetchone()
        if row is None:
            return
        self.db.execute("UPDATE outbox_messages SET state = ?, inflight = 0, done_at = ?, "
                        "last_error = coalesce(?, last_error) WHERE id = ?", (state, now, error, message_id))
        self.db.execute(f"UPDATE outbox_receivers SET {counter} = {counter} + 1 WHERE name = ?", (row[0],))

    def _error(self, message_id: int, error: str, now: float) -> None:
        self.db.execute("UPDATE outbox_receivers SET last_error = ?, last_error_at = ? "
                        "WHERE name = (SELECT receiver FROM outbox_messages WHERE id = ?)", (error, now, message_id))

    def receivers(self) -> list[ReceiverState]:
        rows = self.db.execute(
            "SELECT r.name, r.not_before, r.broken, r.broken_at, r.fingerprint, r.last_error, r.last_error_at, "
            "r.sent, r.failed, r.dropped, (SELECT count(*) FROM outbox_messages m WHERE m.receiver = r.name "
            "AND m.state = 'pending'), (SELECT m.last_error FROM outbox_messages m WHERE m.receiver = r.name "
            "AND m.state = 'pending' ORDER BY m.id LIMIT 1) FROM outbox_receivers r ORDER BY r.name").fetchall()
        return [ReceiverState(*row) for row in rows]

    def messages(self, receiver: str | None = None, state: State | None = None) -> list[tuple[str, str, State]]:
        """(dedup id, kind, state) of the rows kept, oldest first, optionally of one receiver/state."""
        sql = "SELECT dedup_id, kind, state FROM outbox_messages WHERE 1=1"
        args: list[str] = []
        if receiver is not None:
            sql, args = sql + " AND receiver = ?", [*args, receiver]
        if state is not None:
            sql, args = sql + " AND state = ?", [*args, state]
        return [(d, k, s) for d, k, s in self.db.execute(sql + " ORDER BY id", args)]

    def prune(self, before: float) -> int:
        """Forget delivered, failed and dropped rows concluded before ``before``."""
        cur = self.db.execute("DELETE FROM outbox_messages WHERE state != 'pending' AND done_at < ?", (before,))
        return cur.rowcount
