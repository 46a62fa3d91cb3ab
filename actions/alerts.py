"""Alert noise control, as Alertmanager does it: routing, grouping, silences, inhibition,
and one PagerDuty incident per episode.  What it decides to send goes to the outbox
(actions/outbox.py); actions/receivers.py delivers it.

**Episodes.**  :meth:`Notifier.fire` opens an episode of ``alert.key`` (service/kind) or
updates the open one (an anomaly firing window after window is one episode); :meth:`resolve`
closes it.  An episode's id is ``<key>@<start in ms>``: it is PagerDuty's ``dedup_key``, so
the episode is one incident (a trigger when it is first notified, a resolve when it closes,
never one per window) and the next episode of the same key is a new incident.

**Routing.**  An alert goes to the receivers of the first ``AlertRoute`` matching its service
and severity (none: it is kept and shown, and sent nowhere).

**Grouping** per (receiver, service).  A group is created by its first alert and flushed
``group_wait`` later, then every ``group_interval`` while it has alerts.  A flush notifies:

* Slack: one message listing the group's firing alerts, when an alert is new since the last
  message or one of those has resolved, and again every ``repeat_interval`` while any fires.
  An alert that opens and resolves between two flushes is never sent.
* PagerDuty: a trigger for each firing episode not yet triggered, a resolve for each
  triggered episode that has closed (resolves are sent even when the alert is silenced:
  an incident is never left open).  PagerDuty re-notifies by itself, so no repeats.

**Silences** mute alerts matching a service and/or a kind until they end or are expired;
**inhibition** (:meth:`inhibit`, called by the loop while it moves a service's traffic) mutes
that service's symptom alerts (kinds in :data:`SYMPTOMS`) for a while.  A muted alert is left
out of notifications; if it still fires when the mute ends, the next flush sends it.

**Changes** (:meth:`change`, the loop's actions) go out at once: a PagerDuty change event (it
pages nobody) and a Slack message, to every receiver the service's alerts are routed to.

State is in SQLite (tables ``alerts_*`` on the connection given); no method commits: the
caller commits the notifier's state together with whatever caused it (the anomalies' Kafka
offsets), so after a kill -9 the same input produces the same decisions again, and the
outbox's dedup ids (derived from the state, never random) make the re-enqueue a no-op.
Clocks are ``now`` arguments.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import uuid
from dataclasses import dataclass

from actions.model import Alert
from actions.outbox import Outbox
from actions.receivers import (PAGERDUTY_CHANGE, PAGERDUTY_EVENT, SLACK, pagerduty_change_body,
                               pagerduty_resolve_body, pagerduty_trigger_body, slack_body)
from core.loopspec import SEVERITIES, AlertsSpec, Receiver, Severity

log = logging.getLogger("greymesh.actions.alerts")

SYMPTOMS = ("latency", "errors")  # the kinds a routing action is expected to cause, muted by inhibit()
SLACK_MAX_ALERTS = 20  # listed per message (Slack allows 50 blocks); the rest are counted
SLACK_SECTION_CHARS = 2900  # Slack cuts a section's text at 3000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts_episodes (
    id TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    service TEXT NOT NULL,
    kind TEXT NOT NULL,
    severity TEXT NOT NULL,
    summary TEXT NOT NULL,
    details TEXT NOT NULL,
    links TEXT NOT NULL,
    source TEXT NOT NULL,
    started_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    resolved_at REAL);
CREATE INDEX IF NOT EXISTS alerts_episodes_key ON alerts_episodes (key, resolved_at);
CREATE TABLE IF NOT EXISTS alerts_groups (
    gid INTEGER PRIMARY KEY AUTOINCREMENT,
    receiver TEXT NOT NULL,
    service TEXT NOT NULL,
    next_flush_at REAL NOT NULL,
    notified_at REAL,
    notified TEXT NOT NULL DEFAULT '[]',
    seq INTEGER NOT NULL DEFAULT 0,
    UNIQUE (receiver, service));
CREATE TABLE IF NOT EXISTS alerts_incidents (
    receiver TEXT NOT NULL,
    episode TEXT NOT NULL,
    service TEXT NOT NULL,
    PRIMARY KEY (receiver, episode));
CREATE TABLE IF NOT EXISTS alerts_silences (
    id TEXT PRIMARY KEY,
    service TEXT,
    kind TEXT,
    created_at REAL NOT NULL,
    ends_at REAL NOT NULL,
    created_by TEXT NOT NULL,
    comment TEXT NOT NULL,
    expired_at REAL);
CREATE TABLE IF NOT EXISTS alerts_inhibitions (service TEXT PRIMARY KEY, until REAL NOT NULL);
"""


@dataclass(frozen=True)
class Silence:
    id: str
    service: str | None  # None: any service
    kind: str | None  # None: any kind
    created_at: float
    ends_at: float
    created_by: str
    comment: str
    expired_at: float | None  # expired by hand before ends_at

    def active(self, now: float) -> bool:
        return self.expired_at is None and now < self.ends_at

    def matches(self, service: str, kind: str) -> bool:
        return self.service in (None, service) and self.kind in (None, kind)


@dataclass(frozen=True)
class Inhibition:
    service: str
    until: float


@dataclass(frozen=True)
class AlertStatus:
    key: str
    episode: str  # PagerDuty's dedup_key
    severity: Severity
    summary: str
    since: float
    receivers: tuple[str, ...]  # where it is routed
    muted: str | None  # "silence <id>" or "inhibited until <time>", else None


@dataclass(frozen=True)
class NotifierStatus:
    firing: tuple[AlertStatus, ...]
    silences: tuple[Silence, ...]  # active ones
    inhibitions: tuple[Inhibition, ...]  # active ones
    groups: int
    open_incidents: int  # PagerDuty incidents triggered and not yet resolved


@dataclass(frozen=True)
class _Episode:
    id: str
    key: str
    service: str
    kind: str
    severity: Severity
    summary: str
    details: tuple[tuple[str, str], ...]
    links: tuple[tuple[str, str], ...]
    source: str
    started_at: float
    resolved_at: float | None


_EPISODE_COLUMNS = "id, key, service, kind, severity, summary, details, links, source, started_at, resolved_at"


def _episode(row: tuple) -> _Episode:
    i, key, service, kind, severity, summary, details, links, source, started, resolved = row
    return _Episode(i, key, service, kind, severity, summary, tuple(map(tuple, json.loads(details))),
                    tuple(map(tuple, json.loads(links))), source, started, resolved)


def _mrkdwn(text: str) -> str:
    """Slack's three control characters escaped (https://api.slack.com/reference/surfaces/formatting)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class Notifier:
    def __init__(self, db: sqlite3.Connection, spec: AlertsSpec):
        self.db = db
        self.outbox = Outbox(db)
        db.executescript(_SCHEMA)
        self.update_spec(spec)

    def update_spec(self, spec: AlertsSpec) -> None:
        """A new applied spec: its receivers, routes and timers count from the next call."""
        self.spec = spec
        self.receivers: dict[str, Receiver] = {r.name: r for r in spec.receivers}

    # -- routing --

    def route(self, service: str, severity: Severity) -> tuple[str, ...]:
        """The receivers of the first route matching; () when none does."""
        for r in self.spec.routes:
            if (not r.services or service in r.services) and (not r.severities or severity in r.severities):
                return tuple(name for name in r.receivers if name in self.receivers)
        return ()

    def _join(self, service: str, severity: Severity, now: float) -> None:
        """Make sure the groups this alert belongs to exist (a new one flushes after group_wait)."""
        for receiver in self.route(service, severity):
            self.db.execute("INSERT OR IGNORE INTO alerts_groups (receiver, service, next_flush_at) VALUES (?, ?, ?)",
                            (receiver, service, now + self.spec.group_wait_s))

    # -- alerts in --

    def fire(self, alert: Alert, now: float) -> str:
        """Open or update the episode of ``alert.key``; returns its id.  An alert that is not
        firing resolves its key instead."""
        if not alert.firing:
            self.resolve(alert.key, now)
            return ""
        details, links = json.dumps(alert.details), json.dumps(alert.links)
        row = self.db.execute("SELECT id FROM alerts_episodes WHERE key = ? AND resolved_at IS NULL",
                              (alert.key,)).fetchone()
        if row:
            self.db.execute("UPDATE alerts_episodes SET severity = ?, summary = ?, details = ?, links = ?, "
                            "updated_at = ? WHERE id = ?", (alert.severity, alert.summary, details, links, now, row[0]))
            episode = row[0]
        else:
            last = self.db.execute("SELECT max(started_at) FROM alerts_episodes WHERE key = ?",
                                   (alert.key,)).fetchone()[0]
            start = alert.at if last is None else max(alert.at, last + 0.001)  # ids stay distinct
            episode = f"{alert.key}@{round(start * 1000)}"
            self.db.execute(f"INSERT INTO alerts_episodes ({_EPISODE_COLUMNS}, updated_at) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
                            (episode, alert.key, alert.service, alert.kind, alert.severity, alert.summary, details,
                             links, alert.source, start, now))
            log.info("alert %s opened (episode %s)", alert.key, episode)
        self._join(alert.service, alert.severity, now)
        return episode

    def resolve(self, key: str, now: float) -> bool:
        """Close the open episode of ``key``; False when none is open."""
        cur = self.db.execute("UPDATE alerts_episodes SET resolved_at = ?, updated_at = ? "
                              "WHERE key = ? AND resolved_at IS NULL", (now, now, key))
        if cur.rowcount:
            log.info("alert %s resolved", key)
        return cur.rowcount > 0

    # -- silences and inhibition --

    def silence(self, *, service: str | None = None, kind: str | None = None, until: float, by: str,
                    comment: str, now: float) -> Silence:
        """Mute alerts of ``service`` and/or ``kind`` until ``until``; ValueError saying what is missing."""
        if not service and not kind:
            raise ValueError("a silence needs a service, a kind, or both (it would mute every alert)")
        if until <= now:
            raise ValueError(f"a silence must end in the future (it ends {until - now:.0f} s from now)")
        if not by.strip() or not comment.strip():
            raise ValueError("a silence needs who set it and a comment saying why")
        silence = Silence(uuid.uuid4().hex[:12], service or None, kind or None, now, until, by, comment, None)
        self.db.execute("INSERT INTO alerts_silences VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                        (silence.id, silence.service, silence.kind, now, until, by, comment))
        log.info("silence %s by %s until %.0f: service=%s kind=%s (%s)", silence.id, by, until, service, kind, comment)
        return silence

    def expire_silence(self, silence_id: str, now: float) -> bool:
        """End a silence now; False when there is no such active silence."""
        cur = self.db.execute("UPDATE alerts_silences SET expired_at = ? WHERE id = ? AND expired_at IS NULL "
                              "AND ends_at > ?", (now, silence_id, now))
        return cur.rowcount > 0

    def silences(self, now: float, include_ended: bool = False) -> list[Silence]:
        rows = self.db.execute("SELECT * FROM alerts_silences ORDER BY created_at, id").fetchall()
        return [s for s in (Silence(*row) for row in rows) if include_ended or s.active(now)]

    def inhibit(self, service: str, until: float) -> None:
        """Mute ``service``'s symptom alerts (SYMPTOMS) until ``until`` (a later end already set stays)."""
        self.db.execute("INSERT INTO alerts_inhibitions VALUES (?, ?) ON CONFLICT(service) DO UPDATE "
                        "SET until = max(until, excluded.until)", (service, until))

    def inhibitions(self, now: float) -> list[Inhibition]:
        return [Inhibition(s, u) for s, u in
                self.db.execute("SELECT service, until FROM alerts_inhibitions WHERE until > ? ORDER BY service",
                                (now,))]

    def _muted(self, episode: _Episode, silences: list[Silence], now: float) -> str | None:
        for s in silences:
            if s.matches(episode.service, episode.kind):
                return f"silence {s.id}"
        if episode.kind in SYMPTOMS:
            row = self.db.execute("SELECT until FROM alerts_inhibitions WHERE service = ? AND until > ?",
                                  (episode.service, now)).fetchone()
            if row:
                return f"inhibited until {row[0]:.0f}"
        return None

    # -- changes --

    def change(self, service: str, summary: str, *, change_id: str, at: float,
               details: tuple[tuple[str, str], ...] = (), links: tuple[tuple[str, str], ...] = ()) -> int:
        """Tell every receiver ``service``'s alerts go to about an action (``change_id``: the
        decision's id, so calling again for it sends nothing more).  Returns the messages queued."""
        receivers = sorted({name for severity in SEVERITIES for name in self.route(service, severity)})
        queued = 0
        for name in receivers:
            if self.receivers[name].slack:
                text = f":gear: {service}: {summary}"
                fields = "\n".join(f"*{_mrkdwn(k)}*: {_mrkdwn(v)}" for k, v in details)
                blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": _mrkdwn(text)[:SLACK_SECTION_CHARS]}}]
                if fields or links:
                    blocks.append(self._section(fields, links))
                kind, body = SLACK, slack_body(text, blocks)
            else:
                kind, body = PAGERDUTY_CHANGE, pagerduty_change_body(summary, source=f"greymesh:{service}", at=at,
                                                                     details=details, links=links)
            queued += self.outbox.enqueue(name, kind, body, f"change:{change_id}:{name}", at)
        return queued

    # -- flushing --

    def tick(self, now: float) -> int:
        """Flush every group that is due; returns the notifications queued."""
        for service, severity in self.db.execute("SELECT service, severity FROM alerts_episodes "
                                                 "WHERE resolved_at IS NULL").fetchall():
            self._join(service, severity, now)  # groups of receivers a new spec routes to
        silences = self.silences(now)
        queued = 0
        for gid, receiver, service in self.db.execute(
                "SELECT gid, receiver, service FROM alerts_groups WHERE next_flush_at <= ? ORDER BY gid",
                (now,)).fetchall():
            queued += self._flush(gid, receiver, service, silences, now)
        self._forget()
        return queued

    def _open(self, service: str) -> list[_Episode]:
        return [_episode(r) for r in self.db.execute(
            f"SELECT {_EPISODE_COLUMNS} FROM alerts_episodes WHERE service = ? AND resolved_at IS NULL "
            "ORDER BY started_at, id", (service,))]

    def _flush(self, gid: int, receiver: str, service: str, silences: list[Silence], now: float) -> int:
        spec = self.receivers.get(receiver)
        if spec is None:
            log.warning("receiver %s is gone from the spec: dropped its group of %s", receiver, service)
            self.db.execute("DELETE FROM alerts_groups WHERE gid = ?", (gid,))
            self.db.execute("DELETE FROM alerts_incidents WHERE receiver = ? AND service = ?", (receiver, service))
            return 0
        routed = [e for e in self._open(service) if receiver in self.route(service, e.severity)]
        firing = [e for e in routed if self._muted(e, silences, now) is None]
        if spec.slack:
            queued, remains = self._flush_slack(gid, receiver, service, firing, now)
        else:
            queued, remains = self._flush_pagerduty(receiver, service, firing, now)
        if routed or remains:
            self.db.execute("UPDATE alerts_groups SET next_flush_at = ? WHERE gid = ?",
                            (now + self.spec.group_interval_s, gid))
        else:
            self.db.execute("DELETE FROM alerts_groups WHERE gid = ?", (gid,))
        return queued

    def _flush_slack(self, gid: int, receiver: str, service: str, firing: list[_Episode],
                     now: float) -> tuple[int, bool]:
        notified_at, notified_doc, seq = self.db.execute(
            "SELECT notified_at, notified, seq FROM alerts_groups WHERE gid = ?", (gid,)).fetchone()
        notified = set(json.loads(notified_doc))
        current = {e.id for e in firing}
        still_open = {e.id for e in self._open(service)}
        resolved = self._episodes(sorted(notified - still_open))
        new = current - notified
        repeat = bool(firing) and notified_at is not None and now - notified_at >= self.spec.repeat_interval_s
        queued = 0
        if new or resolved or repeat:
            seq += 1
            text, blocks = self._slack_message(service, firing, resolved)
            queued = int(self.outbox.enqueue(receiver, SLACK, slack_body(text, blocks), f"group:{gid}:{seq}", now))
            notified_at = now
        self.db.execute("UPDATE alerts_groups SET notified = ?, notified_at = ?, seq = ? WHERE gid = ?",
                        (json.dumps(sorted(current)), notified_at, seq, gid))
        return queued, bool(current)

    def _flush_pagerduty(self, receiver: str, service: str, firing: list[_Episode], now: float) -> tuple[int, bool]:
        triggered = {e for (e,) in self.db.execute("SELECT episode FROM alerts_incidents WHERE receiver = ? "
                                                   "AND service = ?", (receiver, service))}
        queued = 0
        for e in firing:
            if e.id in triggered:
                continue
            body = pagerduty_trigger_body(e.id, summary=e.summary, source=e.source, severity=e.severity,
                                          at=e.started_at, details=e.details, links=e.links)
            queued += self.outbox.enqueue(receiver, PAGERDUTY_EVENT, body, f"pd:{receiver}:trigger:{e.id}", now)
            self.db.execute("INSERT INTO alerts_incidents VALUES (?, ?, ?)", (receiver, e.id, service))
            triggered.add(e.id)
        still_open = {e.id for e in self._open(service)}
        for episode in sorted(triggered - still_open):
            queued += self.outbox.enqueue(receiver, PAGERDUTY_EVENT, pagerduty_resolve_body(episode),
                                          f"pd:{receiver}:resolve:{episode}", now)
            self.db.execute("DELETE FROM alerts_incidents WHERE receiver = ? AND episode = ?", (receiver, episode))
            triggered.discard(episode)
        return queued, bool(triggered)

    def _episodes(self, ids: list[str]) -> list[_Episode]:
        marks = ",".join("?" * len(ids))
        return [_episode(r) for r in self.db.execute(
            f"SELECT {_EPISODE_COLUMNS} FROM alerts_episodes WHERE id IN ({marks}) ORDER BY started_at, id", ids)]

    def _forget(self) -> None:
        """Delete closed episodes nothing refers to any more (no group lists them, no incident is open)."""
        kept = {e for (doc,) in self.db.execute("SELECT notified FROM alerts_groups") for e in json.loads(doc)}
        kept |= {e for (e,) in self.db.execute("SELECT episode FROM alerts_incidents")}
        for (episode,) in self.db.execute("SELECT id FROM alerts_episodes WHERE resolved_at IS NOT NULL").fetchall():
            if episode not in kept:
                self.db.execute("DELETE FROM alerts_episodes WHERE id = ?", (episode,))

    # -- Slack's message --

    @staticmethod
    def _section(fields: str, links: tuple[tuple[str, str], ...]) -> dict[str, object]:
        refs = " · ".join(f"<{href}|{_mrkdwn(text)}>" for text, href in links)
        text = "\n".join(part for part in (fields, refs) if part)
        return {"type": "section", "text": {"type": "mrkdwn", "text": text[:SLACK_SECTION_CHARS]}}

    def _slack_message(self, service: str, firing: list[_Episode],
                       resolved: list[_Episode]) -> tuple[str, list[dict[str, object]]]:
        if firing:
            head = f"[FIRING:{len(firing)}] {service}: " + "; ".join(e.summary for e in firing[:3])
        else:
            head = f"[RESOLVED] {service}: " + "; ".join(e.summary for e in resolved[:3])
        blocks: list[dict[str, object]] = [{"type": "header", "text": {"type": "plain_text",
                                                                       "text": head[:150]}}]
        for mark, episodes, with_links in ((":red_circle:", firing, True),
                                           (":large_green_circle: resolved:", resolved, False)):
            for e in episodes[:SLACK_MAX_ALERTS]:
                line = f"{mark} *{_mrkdwn(e.key)}* ({e.severity}) {_mrkdwn(e.summary)}"
                fields = "\n".join(f"*{_mrkdwn(k)}*: {_mrkdwn(v)}" for k, v in e.details)
                blocks.append(self._section("\n".join(p for p in (line, fields) if p), e.links if with_links else ()))
            if len(episodes) > SLACK_MAX_ALERTS:
                blocks.append({"type": "context", "elements": [
                    {"type": "mrkdwn", "text": f"and {len(episodes) - SLACK_MAX_ALERTS} more"}]})
        return head, blocks

    # -- status --

    def status(self, now: float) -> NotifierStatus:
        silences = self.silences(now)
        firing = []
        for e in (_episode(r) for r in self.db.execute(
                f"SELECT {_EPISODE_COLUMNS} FROM alerts_episodes WHERE resolved_at IS NULL ORDER BY started_at, id")):
            firing.append(AlertStatus(e.key, e.id, e.severity, e.summary, e.started_at,
                                      self.route(e.service, e.severity), self._muted(e, silences, now)))
        groups = self.db.execute("SELECT count(*) FROM alerts_groups").fetchone()[0]
        incidents = self.db.execute("SELECT count(*) FROM alerts_incidents").fetchone()[0]
        return NotifierStatus(tuple(firing), tuple(silences), tuple(self.inhibitions(now)), groups, incidents)
