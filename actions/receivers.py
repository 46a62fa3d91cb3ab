"""Delivery of the outbox to Slack incoming webhooks and PagerDuty's Events API v2.

The wire formats (bodies built by :func:`slack_body`, :func:`pagerduty_trigger_body`,
:func:`pagerduty_resolve_body`, :func:`pagerduty_change_body`; a row keeps no secret) and what each answer means:

Slack incoming webhook (POST JSON ``{"text", "blocks"}`` to the webhook URL; docs.slack.dev
"Sending messages using incoming webhooks", api.slack.com changelog 2016-05-17 "Improving
error conditions for Incoming Webhooks", api.slack.com/docs/rate-limits):

    200 "ok"                          sent
    429 + Retry-After: N              the webhook waits N s, then the same message again
    400 invalid_payload, no_text ...  this message is refused: failed, logged with the answer, not retried
    403 action_prohibited, invalid_token; 404 channel_not_found, no_service, no_team;
    410 channel_is_archived           the receiver is broken: nothing is sent to it (its messages
                                      wait) until its configuration (spec entry or secret) changes
    5xx, no answer, timeout           retried with exponential backoff
    one message per second per webhook (Slack allows short bursts, then answers 429)

PagerDuty Events API v2 (POST ``/v2/enqueue`` and ``/v2/change/enqueue``; developer.pagerduty.com
"Send an Alert Event", "Send a Change Event", "Events API v2 Overview": response codes and
retry logic, "Events API Rate Limits": about 120 events a minute per routing key):

    202 {"status": "success", ...}    sent
    400 {"status": "invalid event"}   refused: failed, logged with PagerDuty's errors, not retried
    429, 5xx, no answer, timeout      retried with backoff (no Retry-After is documented):
                                      1 s doubling to 60 s, with jitter
    401, 403, 404                     the receiver is broken (a wrong URL or key in the configuration)
    one event per 0.5 s per routing key

Every receiver is sent to one message at a time, oldest first (actions/outbox.py), from a
small thread pool, so a slow or hanging receiver (each request has a short timeout) holds up
only its own queue.  Secrets (the webhook URL, the routing key) are read from the receiver's
:class:`~core.loopspec.SecretRef` just before each request and kept nowhere: not in the
outbox, the status, an exception or a log line (any answer quoting one is scrubbed).
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import random
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from actions.model import SUMMARY_LIMIT
from actions.outbox import Message, Outbox
from core.credentials import CredentialError, read
from core.errors import GreymeshError
from core.loopspec import AlertsSpec, Receiver, SecretRef, Severity

log = logging.getLogger("greymesh.actions.receivers")

# Message kinds (outbox rows): the wire format of the body.
SLACK = "slack"
PAGERDUTY_EVENT = "pagerduty.event"
PAGERDUTY_CHANGE = "pagerduty.change"

SLACK_INTERVAL_S = 1.0  # Slack: one message per second per webhook
PAGERDUTY_INTERVAL_S = 0.5  # PagerDuty: ~120 events per minute per routing key
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
RETRY_AFTER_MAX_S = 3600.0  # a longer Retry-After is taken as this
GIVE_UP_AFTER_S = 86400.0  # a message still undelivered (retryable errors) after a day fails
HTTP_TIMEOUT_S = 5.0
ERROR_CHARS = 500  # of an answer kept in the status and logs
DUPLICATE_NOTE = ":warning: re-sent after a restart of greymesh's actions process: this may be a duplicate."


class SecretUnavailable(GreymeshError):
    """A receiver's secret cannot be read (missing file or variable, open permissions)."""


def read_secret(ref: SecretRef) -> str:
    """The secret ``ref`` names; SecretUnavailable naming the file or variable (never the value)."""
    if ref.file:
        path = Path(ref.file)
        if not path.exists():
            raise SecretUnavailable(f"{path}: no such file; write the receiver's secret there (mode 0600)")
        try:
            return read(path)
        except CredentialError as exc:
            raise SecretUnavailable(str(exc)) from None
    if ref.env:
        value = os.environ.get(ref.env, "").strip()
        if not value:
            raise SecretUnavailable(f"environment variable {ref.env} is not set or empty; set it in the "
                                    "environment of the actions process")
        return value
    raise SecretUnavailable("the receiver names neither a secret file nor an environment variable")


# --- bodies ---------------------------------------------------------------------------


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}+0000"


def _links(links: tuple[tuple[str, str], ...]) -> list[dict[str, str]]:
    return [{"href": href, "text": text} for text, href in links]


def slack_body(text: str, blocks: list[dict[str, object]]) -> str:
    return json.dumps({"text": text, "blocks": blocks})


def pagerduty_trigger_body(dedup_key: str, *, summary: str, source: str, severity: Severity, at: float,
                           details: tuple[tuple[str, str], ...] = (), links: tuple[tuple[str, str], ...] = ()) -> str:
    """An alert event opening (or updating) the alert ``dedup_key``; the routing key is added when sent."""
    return json.dumps({"event_action": "trigger", "dedup_key": dedup_key,
                       "payload": {"summary": summary[:SUMMARY_LIMIT], "source": source, "severity": severity,
                                   "timestamp": _iso(at), "custom_details": dict(details)},
                       "links": _links(links)})


def pagerduty_resolve_body(dedup_key: str) -> str:
    return json.dumps({"event_action": "resolve", "dedup_key": dedup_key})


def pagerduty_change_body(summary: str, *, source: str, at: float, details: tuple[tuple[str, str], ...] = (),
                          links: tuple[tuple[str, str], ...] = ()) -> str:
    return json.dumps({"payload": {"summary": summary[:SUMMARY_LIMIT], "source": source, "timestamp": _iso(at),
                                   "custom_details": dict(details)}, "links": _links(links)})


# --- HTTP -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    """A receiver's answer: ``status`` None when there was none (``body`` says why)."""

    status: int | None
    body: str
    retry_after: float | None = None


def _retry_after(value: str | None, now: float) -> float | None:
    """Retry-After as seconds from now: a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX_S)


def post(url: str, body: bytes, secret: str, timeout_s: float = HTTP_TIMEOUT_S) -> Response:
    """POST JSON; never raises.  ``secret`` is scrubbed from whatever comes back."""
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return Response(resp.status, _scrub(resp.read(ERROR_CHARS).decode("utf-8", "replace"), secret))
    except urllib.error.HTTPError as exc:
        text = exc.read(ERROR_CHARS).decode("utf-8", "replace")
        return Response(exc.code, _scrub(text, secret), _retry_after(exc.headers.get("Retry-After"), time.time()))
    except (OSError, ValueError) as exc:  # refused, reset, timeout, TLS, a malformed URL
        reason = getattr(exc, "reason", exc)
        return Response(None, _scrub(f"no answer: {type(reason).__name__}: {reason}", secret))


def _scrub(text: str, secret: str) -> str:
    return text.replace(secret, "<secret>") if secret else text


# --- what an answer means -------------------------------------------------------------

Outcome = Literal["sent", "retry", "failed", "broken"]


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    error: str  # "" when sent
    retry_after: float | None = None  # the receiver's own wait (Slack's Retry-After)


def _describe(resp: Response) -> str:
    return f"{resp.status}: {resp.body.strip()[:ERROR_CHARS]}" if resp.status else resp.body


def judge_slack(resp: Response) -> Verdict:
    if resp.status == 200:
        return Verdict("sent", "")
    if resp.status == 429:
        return Verdict("retry", _describe(resp), resp.retry_after)
    if resp.status in (403, 404, 410):
        return Verdict("broken", _describe(resp))
    if resp.status is None or resp.status >= 500:
        return Verdict("retry", _describe(resp))
    return Verdict("failed", _describe(resp))


def judge_pagerduty(resp: Response) -> Verdict:
    if resp.status is not None and 200 <= resp.status < 300:
        return Verdict("sent", "")
    if resp.status is None or resp.status == 429 or resp.status >= 500:
        return Verdict("retry", _describe(resp))
    if resp.status in (401, 403, 404):
        return Verdict("broken", _describe(resp))
    return Verdict("failed", _describe(resp))


def backoff(attempts: int, rng: random.Random) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: 1 s doubling to 60 s,
    each stretched by up to a quarter at random (so retries of many messages spread out)."""
    base = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** max(0, attempts - 1))
    return min(BACKOFF_MAX_S, base * rng.uniform(1.0, 1.25))


# --- the dispatcher -------------------------------------------------------------------


@dataclass(frozen=True)
class ReceiverStatus:
    """One receiver, for ``greymesh status``: never its URL or key."""

    name: str
    type: Literal["slack", "pagerduty", "unconfigured"]
    state: Literal["ok", "retrying", "broken"]
    error: str | None  # why it is broken, else its last error (None: none yet)
    error_at: float | None
    sent: int
    failed: int  # refused for good (400s, or undelivered for a day)
    dropped: int  # its queue was full
    queued: int
    next_attempt_at: float | None  # when it waits (rate limit, Retry-After, backoff)


@dataclass(frozen=True)
class _Request:
    url: str
    body: bytes
    secret: str
    judge: Callable[[Response], Verdict]


def _type(receiver: Receiver) -> Literal["slack", "pagerduty"]:
    return "slack" if receiver.slack else "pagerduty"


def _secret_ref(receiver: Receiver) -> SecretRef:
    if receiver.slack:
        return receiver.slack.webhook_url
    assert receiver.pagerduty is not None, f"receiver {receiver.name} is neither slack nor pagerduty"
    return receiver.pagerduty.routing_key


def fingerprint(receiver: Receiver) -> str:
    """A digest of a receiver's configuration: its spec entry and its secret's value (hashed;
    or why it is unreadable).  A broken receiver is tried again once this changes."""
    try:
        secret = "secret:" + hashlib.sha256(read_secret(_secret_ref(receiver)).encode()).hexdigest()
    except SecretUnavailable as exc:
        secret = f"unavailable:{exc}"
    return hashlib.sha256(f"{receiver!r}\0{secret}".encode()).hexdigest()[:16]


class Dispatcher:
    """Sends what the outbox has due.  Call :meth:`tick` often (it never blocks on the network
    and commits after every step: call it outside a transaction), :meth:`wait` to sleep until
    a send concludes, :meth:`close` at the end."""

    def __init__(self, db: sqlite3.Connection, spec: AlertsSpec, *, timeout_s: float = HTTP_TIMEOUT_S,
                 rng: random.Random | None = None, workers: int = 4):
        self.db = db
        self.outbox = Outbox(db)
        self.timeout_s = timeout_s
        self.rng = rng or random.Random()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="greymesh-alerts")
        self._inflight: dict[str, tuple[Message, Future[Verdict]]] = {}
        self.update_spec(spec)

    def update_spec(self, spec: AlertsSpec) -> None:
        self.receivers = {r.name: r for r in spec.receivers}

    # -- one round --

    def tick(self, now: float) -> int:
        """Conclude the sends that finished, retry receivers whose configuration was fixed, and
        start the next message of every receiver that is ready.  Returns how many concluded."""
        if self.db.in_transaction:
            raise RuntimeError("Dispatcher.tick commits after every message: commit the open transaction first")
        concluded = self._collect(now)
        self._repair()
        self._start(now)
        return concluded

    def wait(self, timeout_s: float) -> bool:
        """Block until a send in flight concludes (True) or ``timeout_s`` passes (False)."""
        futures = [f for _, f in self._inflight.values()]
        if not futures:
            return False
        done, _ = wait(futures, timeout=timeout_s, return_when=FIRST_COMPLETED)
        return bool(done)

    @property
    def busy(self) -> bool:
        return bool(self._inflight)

    def close(self) -> None:
        """Stop; sends in flight finish (bounded by the timeout), their rows stay in flight and
        are sent again by the next dispatcher (at least once)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _collect(self, now: float) -> int:
        concluded = 0
        for name, (message, future) in list(self._inflight.items()):
            if not future.done():
                continue
            del self._inflight[name]
            self._apply(message, future.result(), now)
            self.db.commit()
            concluded += 1
        return concluded

    def _apply(self, message: Message, verdict: Verdict, now: float) -> None:
        name, what = message.receiver, f"message {message.dedup_id}"
        if verdict.outcome == "sent":
            self.outbox.mark_sent(message.id, now)
            log.info("receiver %s took %s", name, what)
        elif verdict.outcome == "failed":
            self.outbox.fail(message.id, verdict.error, now)
            log.error("receiver %s refused %s; not retried: %s", name, what, verdict.error)
        elif verdict.outcome == "broken":
            receiver = self.receivers.get(name)
            self.outbox.mark_broken(message.id, verdict.error, fingerprint(receiver) if receiver else "", now)
            log.error("receiver %s is broken (%s): its messages wait until its configuration in mesh.yaml "
                      "or its secret changes", name, verdict.error)
        elif now - message.created_at >= GIVE_UP_AFTER_S:
            error = f"undelivered after {message.attempts} attempts over {GIVE_UP_AFTER_S / 3600:g} h: {verdict.error}"
            self.outbox.fail(message.id, error, now)
            log.error("receiver %s: gave up %s: %s", name, what, error)
        else:
            delay = verdict.retry_after if verdict.retry_after is not None else backoff(message.attempts, self.rng)
            self.outbox.retry_at(message.id, now + delay, verdict.error, now)
            log.warning("receiver %s: %s not delivered (%s); again in %.1f s", name, what, verdict.error, delay)

    def _repair(self) -> None:
        for state in self.outbox.receivers():
            receiver = self.receivers.get(state.name)
            if state.broken and receiver and fingerprint(receiver) != state.fingerprint:
                self.outbox.repair(state.name)
                self.db.commit()
                log.info("receiver %s: its configuration changed; trying it again", state.name)

    def _start(self, now: float) -> None:
        for message in self.outbox.due(now):
            if message.receiver in self._inflight:
                continue
            receiver = self.receivers.get(message.receiver)
            request = self._request(message, receiver, now)
            if request is None:
                self.db.commit()
                continue
            assert receiver is not None
            self.outbox.started(message.id)
            interval = SLACK_INTERVAL_S if receiver.slack else PAGERDUTY_INTERVAL_S
            self.outbox.hold(message.receiver, now + interval)
            self.db.commit()
            attempt = replace(message, attempts=message.attempts + 1)  # counting this one
            self._inflight[message.receiver] = (attempt, self._pool.submit(self._send, request))

    def _request(self, message: Message, receiver: Receiver | None, now: float) -> _Request | None:
        """What to send for ``message``, or None when it cannot be sent (concluded or broken here)."""
        if receiver is None:
            self.outbox.fail(message.id, f"receiver {message.receiver} is no longer in mesh.yaml's alerts", now)
            log.error("receiver %s is no longer configured: message %s dropped", message.receiver, message.dedup_id)
            return None
        kinds = (SLACK,) if receiver.slack else (PAGERDUTY_EVENT, PAGERDUTY_CHANGE)
        if message.kind not in kinds:
            self.outbox.fail(message.id, f"receiver {receiver.name} is now a {_type(receiver)} receiver; "
                                         f"a {message.kind} message cannot go to it", now)
            return None
        try:
            secret = read_secret(_secret_ref(receiver))
        except SecretUnavailable as exc:
            self.outbox.mark_broken(message.id, f"secret: {exc}", fingerprint(receiver), now)
            log.error("receiver %s is broken: its secret: %s", receiver.name, exc)
            return None
        doc = json.loads(message.body)
        if receiver.slack:
            if message.resumed:
                doc["text"] = f"{DUPLICATE_NOTE}\n{doc.get('text', '')}"
            return _Request(secret, json.dumps(doc).encode(), secret, judge_slack)
        assert receiver.pagerduty is not None
        url = receiver.pagerduty.url if message.kind == PAGERDUTY_EVENT else receiver.pagerduty.change_url
        return _Request(url, json.dumps({"routing_key": secret, **doc}).encode(), secret, judge_pagerduty)

    def _send(self, request: _Request) -> Verdict:
        return request.judge(post(request.url, request.body, request.secret, self.timeout_s))

    # -- a test message, and status --

    def test(self, name: str, now: float) -> Verdict:
        """Send a test message to receiver ``name`` now, outside the outbox (``greymesh alerts
        test``): a Slack message, or a PagerDuty change event (which pages nobody)."""
        receiver = self.receivers.get(name)
        if receiver is None:
            known = ", ".join(sorted(self.receivers)) or "none"
            return Verdict("failed", f"no receiver {name!r} in mesh.yaml's alerts (receivers: {known})")
        try:
            secret = read_secret(_secret_ref(receiver))
        except SecretUnavailable as exc:
            return Verdict("broken", f"secret: {exc}")
        summary = f"greymesh test message to receiver {name}"
        if receiver.slack:
            return self._send(_Request(secret, slack_body(summary, []).encode(), secret, judge_slack))
        assert receiver.pagerduty is not None
        body = {"routing_key": secret, **json.loads(pagerduty_change_body(summary, source="greymesh", at=now))}
        return self._send(_Request(receiver.pagerduty.change_url, json.dumps(body).encode(), secret, judge_pagerduty))

    def status(self, now: float) -> list[ReceiverStatus]:
        states = {s.name: s for s in self.outbox.receivers()}
        out = []
        for name in sorted(set(states) | set(self.receivers)):
            s, receiver = states.get(name), self.receivers.get(name)
            kind = _type(receiver) if receiver else "unconfigured"
            if s is None:
                out.append(ReceiverStatus(name, kind, "ok", None, None, 0, 0, 0, 0, None))
                continue
            waiting = s.not_before > now and s.queued > 0
            state = "broken" if s.broken else "retrying" if s.head_error else "ok"
            out.append(ReceiverStatus(name, kind, state, s.broken or s.last_error, s.broken_at or s.last_error_at,
                                      s.sent, s.failed, s.dropped, s.queued, s.not_before if waiting else None))
        return out
