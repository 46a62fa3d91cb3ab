"""Alerts: noise control (actions/alerts.py), the durable outbox (actions/outbox.py) and
delivery (actions/receivers.py) against the contract receivers of tests/support/receivers.py.

Most tests drive the clock by hand (``now`` arguments); the ones that measure a wait
(Retry-After, a slow receiver) use the real clock.

Crash tests close the SQLite connection where a kill -9 would stop the process and open the
database again.  What is guaranteed: a crash before the notifier's state is committed loses
nothing (the same input, replayed from Kafka, makes the same decisions with the same dedup
ids); a crash after the commit and before the send loses nothing and sends once; a crash
between a send and the commit of its outcome sends that message again (at least once).
PagerDuty deduplicates the re-sent event by its ``dedup_key`` (still one incident); a Slack
webhook cannot deduplicate, so the re-sent Slack message is posted twice, marked as a
possible duplicate.
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from actions.alerts import Notifier
from actions.model import Alert
from actions.outbox import Outbox
from actions.receivers import (DUPLICATE_NOTE, PAGERDUTY_EVENT, SLACK, Dispatcher, pagerduty_trigger_body,
                               slack_body)
from core.loopspec import AlertRoute, AlertsSpec, PagerDutyReceiver, Receiver, SecretRef, SlackReceiver
from tests.support.receivers import PagerDutyEvents, SlackWebhook

T0 = 1_700_000_000.0


def write_secret(path: Path, value: str) -> Path:
    """A secret file as the operator keeps one (0600), replaced whole."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    return path


def slack_receiver(name: str, secret: Path) -> Receiver:
    return Receiver(name, slack=SlackReceiver(SecretRef(file=str(secret))))


def pd_receiver(name: str, pd: PagerDutyEvents, ref: SecretRef) -> Receiver:
    return Receiver(name, pagerduty=PagerDutyReceiver(ref, url=pd.enqueue_url, change_url=pd.change_url))


def spec(*receivers: Receiver, routes: tuple[AlertRoute, ...] = (), **timers: float) -> AlertsSpec:
    routes = routes or (AlertRoute(tuple(r.name for r in receivers)),)
    return AlertsSpec(receivers=receivers, routes=routes, **timers)


def alert(service: str, kind: str, at: float = T0, severity: str = "error", summary: str = "") -> Alert:
    return Alert(f"{service}/{kind}", service, kind, severity, summary or f"{kind} up on {service}", True, at,
                 details=(("score", "0.93"),), links=(("evidence", f"https://console.local/{service}"),))


def settle(d: Dispatcher, now: float) -> None:
    """Every send ``now`` allows, concluded (each receiver sends at most once per instant)."""
    d.tick(now)
    while d.busy:
        d.wait(5.0)
        d.tick(now)


def slack_texts(db: sqlite3.Connection) -> list[str]:
    return [json.loads(b)["text"] for (b,) in db.execute("SELECT body FROM outbox_messages WHERE kind = ? "
                                                          "ORDER BY id", (SLACK,))]


def slack_blocks(db: sqlite3.Connection) -> list[str]:
    return [json.dumps(json.loads(b)["blocks"]) for (b,) in
            db.execute("SELECT body FROM outbox_messages WHERE kind = ? ORDER BY id", (SLACK,))]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(tmp_path / "state.db")
    yield conn
    conn.close()


@pytest.fixture
def slack() -> Iterator[SlackWebhook]:
    with SlackWebhook() as s:
        yield s


@pytest.fixture
def pd() -> Iterator[PagerDutyEvents]:
    with PagerDutyEvents() as p:
        yield p


@pytest.fixture
def key() -> str:
    return secrets.token_hex(16)  # PagerDuty's routing keys are 32 characters


@pytest.fixture
def team(tmp_path: Path, slack: SlackWebhook) -> Receiver:
    return slack_receiver("team", write_secret(tmp_path / "team.url", slack.url))


@pytest.fixture
def oncall(tmp_path: Path, pd: PagerDutyEvents, key: str) -> Receiver:
    return pd_receiver("oncall", pd, SecretRef(file=str(write_secret(tmp_path / "oncall.key", key))))


UNSENT = Receiver("team", slack=SlackReceiver(SecretRef(env="GREYMESH_TEST_UNUSED")))  # notifier-only tests


# --- noise control ---------------------------------------------------------------------


def test_alerts_of_a_service_within_group_wait_are_one_slack_message(db: sqlite3.Connection) -> None:
    n = Notifier(db, spec(UNSENT, group_wait_s=30))
    for i, kind in enumerate(("latency", "errors", "load")):
        n.fire(alert("payments", kind, at=T0 + 5 * i), T0 + 5 * i)
    n.fire(alert("orders", "latency", at=T0 + 12), T0 + 12)
    assert n.tick(T0 + 29.9) == 0  # payments' group waits 30 s from its first alert
    assert n.tick(T0 + 30) == 1
    [text] = slack_texts(db)
    assert text.startswith("[FIRING:3] payments")
    assert all(f"payments/{k}" in slack_blocks(db)[0] for k in ("latency", "errors", "load"))
    assert n.tick(T0 + 41) == 0  # orders' own group: 30 s after its alert
    assert n.tick(T0 + 42) == 1
    assert slack_texts(db)[1].startswith("[FIRING:1] orders")


def test_repeat_interval_and_duplicates_suppressed(db: sqlite3.Connection) -> None:
    n = Notifier(db, spec(UNSENT, group_wait_s=30, group_interval_s=300, repeat_interval_s=3600))
    n.fire(alert("payments", "latency"), T0)
    assert n.tick(T0 + 30) == 1
    for t in range(60, 3600, 10):  # the anomaly fires every window: the same episode, nothing new to say
        episode = n.fire(alert("payments", "latency", at=T0 + t), T0 + t)
        assert n.tick(T0 + t) == 0
    assert episode == f"payments/latency@{round(T0 * 1000)}"
    assert n.tick(T0 + 3630) == 1  # the first flush at or after repeat_interval re-sends
    n.fire(alert("payments", "errors", at=T0 + 3700), T0 + 3700)
    assert n.tick(T0 + 3929) == 0  # joins the existing group: waits for its next flush, not group_wait
    assert n.tick(T0 + 3930) == 1
    n.resolve("payments/latency", T0 + 4000)
    n.resolve("payments/errors", T0 + 4001)
    assert n.tick(T0 + 4230) == 1
    texts = slack_texts(db)
    assert [t.split(" ")[0] for t in texts] == ["[FIRING:1]", "[FIRING:1]", "[FIRING:2]", "[RESOLVED]"]
    assert n.status(T0 + 4230).groups == 0 and n.status(T0 + 4230).firing == ()
    assert n.tick(T0 + 9000) == 0


def test_an_alert_that_opens_and_closes_between_flushes_is_not_sent(db: sqlite3.Connection) -> None:
    n = Notifier(db, spec(UNSENT, group_wait_s=30))
    n.fire(alert("payments", "latency"), T0)
    n.resolve("payments/latency", T0 + 10)
    assert n.tick(T0 + 30) == 0
    assert db.execute("SELECT count(*) FROM alerts_episodes").fetchone()[0] == 0  # forgotten


def test_routes_first_match_by_service_and_severity(db: sqlite3.Connection) -> None:
    pager = Receiver("pager", pagerduty=PagerDutyReceiver(SecretRef(env="GREYMESH_TEST_UNUSED")))
    routes = (AlertRoute(("pager",), services=("payments",), severities=("critical",)),
              AlertRoute(("team",), services=("payments",)),
              AlertRoute(("team", "pager"), severities=("critical",)))
    n = Notifier(db, spec(UNSENT, pager, routes=routes))
    assert n.route("payments", "critical") == ("pager",)
    assert n.route("payments", "warning") == ("team",)
    assert n.route("orders", "critical") == ("team", "pager")
    assert n.route("orders", "info") == ()
    n.fire(alert("payments", "errors", severity="critical"), T0)
    n.fire(alert("orders", "load", severity="info"), T0)
    assert n.tick(T0 + 30) == 1
    assert Outbox(db).messages() == [(f"pd:pager:trigger:payments/errors@{round(T0 * 1000)}", PAGERDUTY_EVENT,
                                      "pending")]
    routed = {a.key: a.receivers for a in n.status(T0 + 30).firing}
    assert routed == {"payments/errors": ("pager",), "orders/load": ()}  # unrouted: shown, sent nowhere


def test_silences_mute_until_they_end_or_are_expired(db: sqlite3.Connection) -> None:
    n = Notifier(db, spec(UNSENT, group_wait_s=30, group_interval_s=300))
    with pytest.raises(ValueError, match="service, a kind, or both"):
        n.silence(until=T0 + 100, by="ann", comment="deploy", now=T0)
    with pytest.raises(ValueError, match="in the future"):
        n.silence(service="payments", until=T0, by="ann", comment="deploy", now=T0)
    with pytest.raises(ValueError, match="who set it"):
        n.silence(service="payments", until=T0 + 1, by=" ", comment="deploy", now=T0)
    s = n.silence(service="payments", kind="latency", until=T0 + 100, by="ann", comment="deploy", now=T0)
    n.fire(alert("payments", "latency"), T0)
    n.fire(alert("payments", "errors"), T0)
    assert n.tick(T0 + 30) == 1
    assert slack_texts(db)[0].startswith("[FIRING:1]") and "payments/latency" not in slack_blocks(db)[0]
    firing = {a.key: a.muted for a in n.status(T0 + 30).firing}
    assert firing == {"payments/latency": f"silence {s.id}", "payments/errors": None}
    assert n.silences(T0 + 30) == [s] and n.silences(T0 + 100) == []  # it ends by itself
    assert n.tick(T0 + 330) == 1  # still firing when the silence ended: sent at the next flush
    assert slack_texts(db)[1].startswith("[FIRING:2]")

    other = n.silence(service="orders", until=T0 + 10_000, by="bob", comment="noisy", now=T0 + 400)
    assert n.expire_silence(other.id, T0 + 500) and not n.expire_silence(other.id, T0 + 501)
    assert n.silences(T0 + 501) == [] and [x.id for x in n.silences(T0 + 501, include_ended=True)] == [s.id, other.id]


def test_inhibition_mutes_symptoms_while_an_action_runs(db: sqlite3.Connection) -> None:
    n = Notifier(db, spec(UNSENT, group_wait_s=30, group_interval_s=300))
    n.inhibit("payments", T0 + 200)
    n.inhibit("payments", T0 + 100)  # a shorter one does not cut it short
    for kind in ("latency", "errors", "load"):
        n.fire(alert("payments", kind), T0)
    n.fire(alert("orders", "latency"), T0)
    assert n.tick(T0 + 30) == 2
    payments, orders = slack_blocks(db)
    assert "payments/load" in payments and "payments/latency" not in payments and "payments/errors" not in payments
    assert "orders/latency" in orders  # another service's symptoms are not muted
    assert [(i.service, i.until) for i in n.inhibitions(T0 + 30)] == [("payments", T0 + 200)]
    assert n.tick(T0 + 330) == 1  # the action is over, the symptoms still fire
    assert slack_texts(db)[2].startswith("[FIRING:3] payments")


# --- PagerDuty: one incident per episode --------------------------------------------------


def test_one_pagerduty_incident_per_episode(db: sqlite3.Connection, pd: PagerDutyEvents, oncall: Receiver) -> None:
    s = spec(oncall, group_wait_s=30, group_interval_s=300)
    n, d = Notifier(db, s), Dispatcher(db, s)

    def step(now: float) -> None:
        n.tick(now)
        db.commit()
        settle(d, now)

    for w in range(10):  # an error burst: one anomaly per 10 s window
        n.fire(alert("payments", "errors", at=T0 + 10 * w), T0 + 10 * w)
        step(T0 + 10 * w)
    n.resolve("payments/errors", T0 + 100)
    step(T0 + 330)
    assert len(pd.incidents) == 1 and pd.incidents[0].triggers == 1 and pd.incidents[0].resolved
    assert pd.incidents[0].dedup_key == f"payments/errors@{round(T0 * 1000)}"

    n.fire(alert("payments", "errors", at=T0 + 400), T0 + 400)  # a new episode: a new incident
    step(T0 + 430)
    assert len(pd.incidents) == 2 and pd.incidents[1].dedup_key != pd.incidents[0].dedup_key
    assert not pd.incidents[1].resolved and n.status(T0 + 430).open_incidents == 1
    assert [json.loads(r.body)["event_action"] for r in pd.requests()] == ["trigger", "resolve", "trigger"]
    assert pd.dropped_resolves == 0


def test_a_silenced_incident_is_still_resolved(db: sqlite3.Connection, pd: PagerDutyEvents, oncall: Receiver) -> None:
    s = spec(oncall, group_wait_s=30, group_interval_s=300)
    n, d = Notifier(db, s), Dispatcher(db, s)
    n.fire(alert("payments", "latency"), T0)
    n.tick(T0 + 30)
    n.silence(service="payments", until=T0 + 10_000, by="ann", comment="known", now=T0 + 40)
    n.resolve("payments/latency", T0 + 50)
    n.tick(T0 + 330)
    db.commit()
    settle(d, T0 + 330)  # the trigger, then (rate limit) the resolve
    settle(d, T0 + 331)
    assert len(pd.incidents) == 1 and pd.incidents[0].resolved


def test_changes_go_to_pagerduty_as_change_events_and_to_slack(db: sqlite3.Connection, pd: PagerDutyEvents,
                                                               slack: SlackWebhook, key: str, team: Receiver,
                                                               oncall: Receiver) -> None:
    s = spec(team, oncall)
    n, d = Notifier(db, s), Dispatcher(db, s)
    args = dict(change_id="dec-1", at=T0, details=(("weights", "v1 75 / v2 25"),), links=(("decision", "https://c/1"),))
    assert n.change("payments", "moved 25% of payments' traffic from v2 to v1", **args) == 2
    assert n.change("payments", "moved 25% of payments' traffic from v2 to v1", **args) == 0  # the same decision
    db.commit()
    settle(d, T0)
    [change] = pd.changes
    assert change["routing_key"] == key and change["payload"]["custom_details"] == {"weights": "v1 75 / v2 25"}
    assert change["links"] == [{"href": "https://c/1", "text": "decision"}]
    assert pd.incidents == []  # a change pages nobody
    [message] = slack.messages
    assert "moved 25%" in message["text"] and "<https://c/1|decision>" in json.dumps(message["blocks"])


# --- delivery ----------------------------------------------------------------------------


def test_slack_429_retry_after_is_honoured(db: sqlite3.Connection, slack: SlackWebhook, team: Receiver) -> None:
    d = Dispatcher(db, spec(team))
    slack.answer_next(1, 429, retry_after=1)
    Outbox(db).enqueue("team", SLACK, slack_body("hello", []), "m1", time.time())
    db.commit()
    deadline = time.monotonic() + 10
    while (not slack.messages or d.busy) and time.monotonic() < deadline:
        d.tick(time.time())
        if not d.wait(0.05):
            time.sleep(0.01)
    first, second = slack.requests()
    assert (first.status, second.status) == (429, 200)
    assert 1.0 <= second.at - first.at < 2.0, f"gap {second.at - first.at:.3f} s after Retry-After: 1"
    [status] = d.status(time.time())
    assert (status.state, status.sent, status.queued) == ("ok", 1, 0)

    slack.answer_next(1, 429, retry_after=7)  # the same on the test's clock: the wait is Slack's, not a backoff
    t = time.time() + 10  # past the real clock's holds
    Outbox(db).enqueue("team", SLACK, slack_body("again", []), "m2", t)
    db.commit()
    settle(d, t)
    settle(d, t + 6.99)
    assert len(slack.requests()) == 3 and d.status(t + 6.99)[0].state == "retrying"
    settle(d, t + 7)
    assert [r.status for r in slack.requests()] == [429, 200, 429, 200]
    d.close()


def test_slack_gets_at_most_one_message_per_second(db: sqlite3.Connection, slack: SlackWebhook,
                                                   team: Receiver) -> None:
    d, outbox = Dispatcher(db, spec(team)), Outbox(db)
    for i in range(3):
        outbox.enqueue("team", SLACK, slack_body(f"m{i}", []), f"m{i}", T0)
    db.commit()
    counts = []
    for t in (0.0, 0.5, 0.99, 1.0, 1.5, 2.0, 2.0, 9.0):
        settle(d, T0 + t)
        counts.append(len(slack.messages))
    assert counts == [1, 1, 1, 2, 2, 3, 3, 3]
    assert [m["text"] for m in slack.messages] == ["m0", "m1", "m2"]  # queued, in order, none dropped


def test_refused_messages_are_not_retried(db: sqlite3.Connection, slack: SlackWebhook, pd: PagerDutyEvents,
                                          team: Receiver, oncall: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    d, outbox = Dispatcher(db, spec(team, oncall)), Outbox(db)
    outbox.enqueue("team", SLACK, slack_body("", []), "empty", T0)  # Slack: 400 no_text
    outbox.enqueue("team", SLACK, slack_body("next", []), "next", T0)
    bad = json.loads(pagerduty_trigger_body("k", summary="s", source="greymesh", severity="info", at=T0))
    bad["payload"]["severity"] = "fatal"
    outbox.enqueue("oncall", PAGERDUTY_EVENT, json.dumps(bad), "bad", T0)  # PagerDuty: 400 invalid event
    db.commit()
    with caplog.at_level(logging.ERROR, logger="greymesh.actions"):
        for t in (0, 1, 100, 1000):
            settle(d, T0 + t)
    assert [r.status for r in slack.requests()] == [400, 200]
    assert [r.status for r in pd.requests()] == [400]
    assert "no_text" in caplog.text and "'payload.severity' is invalid" in caplog.text
    states = {s.name: s for s in d.status(T0 + 1000)}
    assert (states["team"].failed, states["team"].sent, states["team"].state) == (1, 1, "ok")
    assert (states["oncall"].failed, states["oncall"].queued) == (1, 0)
    assert "invalid event" in (states["oncall"].error or "")
    assert outbox.messages(state="failed") == [("empty", SLACK, "failed"), ("bad", PAGERDUTY_EVENT, "failed")]


def test_5xx_429_and_no_answer_are_retried_with_backoff(db: sqlite3.Connection, pd: PagerDutyEvents,
                                                        oncall: Receiver) -> None:
    d, outbox = Dispatcher(db, spec(oncall), rng=random.Random(7)), Outbox(db)
    pd.answer_next(2, 503)
    pd.answer_next(1, 429)
    outbox.enqueue("oncall", PAGERDUTY_EVENT, pagerduty_trigger_body("pay/errors@1", summary="errors up",
                                                                     source="greymesh", severity="error", at=T0),
                   "t1", T0)
    db.commit()
    now, gaps = T0, []
    settle(d, now)
    for _ in range(3):
        [status] = d.status(now)
        assert status.state == "retrying" and status.next_attempt_at is not None
        settle(d, status.next_attempt_at - 0.01)  # not a moment early
        assert len(pd.requests()) == len(gaps) + 1
        gaps.append(status.next_attempt_at - now)
        now = status.next_attempt_at
        settle(d, now)
    assert [r.status for r in pd.requests()] == [503, 503, 429, 202]
    assert 1.0 <= gaps[0] <= 1.25 and 2.0 <= gaps[1] <= 2.5 and 4.0 <= gaps[2] <= 5.0
    assert len(pd.incidents) == 1 and d.status(now)[0].state == "ok"


def test_no_answer_is_retried(db: sqlite3.Connection, tmp_path: Path, key: str) -> None:
    with PagerDutyEvents() as gone:
        receiver = pd_receiver("oncall", gone, SecretRef(file=str(write_secret(tmp_path / "k", key))))
    d = Dispatcher(db, spec(receiver))  # nothing listens there any more
    Outbox(db).enqueue("oncall", PAGERDUTY_EVENT, json.dumps({"event_action": "resolve", "dedup_key": "x"}), "r", T0)
    db.commit()
    settle(d, T0)
    [status] = d.status(T0)
    assert status.state == "retrying" and "no answer" in (status.error or "") and status.queued == 1


@pytest.mark.parametrize(("code", "error"), [(403, "invalid_token"), (404, "channel_not_found"),
                                             (410, "channel_is_archived")])
def test_slack_403_404_410_break_the_receiver_until_its_configuration_changes(
        db: sqlite3.Connection, tmp_path: Path, slack: SlackWebhook, team: Receiver, code: int, error: str) -> None:
    d, outbox = Dispatcher(db, spec(team)), Outbox(db)
    slack.answer_next(1, code)
    outbox.enqueue("team", SLACK, slack_body("m1", []), "m1", T0)
    outbox.enqueue("team", SLACK, slack_body("m2", []), "m2", T0)
    db.commit()
    settle(d, T0)
    for t in (10, 100, 3600):
        settle(d, T0 + t)
    [status] = d.status(T0 + 3600)
    assert (status.state, status.queued, status.sent) == ("broken", 2, 0)
    assert status.error == f"{code}: {error}" and status.error_at == T0
    assert len(slack.requests()) == 1  # not retried while the configuration stays

    write_secret(tmp_path / "team.url", slack.url + "?v=2")  # the operator fixes the webhook
    settle(d, T0 + 3601)
    settle(d, T0 + 3602)
    assert [m["text"] for m in slack.messages] == ["m1", "m2"]
    assert d.status(T0 + 3602)[0].state == "ok"


def test_a_webhook_slack_does_not_know_and_a_missing_secret_break_the_receiver(
        db: sqlite3.Connection, tmp_path: Path, slack: SlackWebhook) -> None:
    secret = tmp_path / "team.url"
    d = Dispatcher(db, spec(slack_receiver("team", secret)))
    Outbox(db).enqueue("team", SLACK, slack_body("m1", []), "m1", T0)
    db.commit()
    settle(d, T0)
    [status] = d.status(T0)
    assert status.state == "broken" and str(secret) in (status.error or "") and slack.requests() == []
    write_secret(secret, slack.base + "/services/T0/B0/removed")
    settle(d, T0 + 1)
    assert d.status(T0 + 1)[0].error == "404: no_service"
    write_secret(secret, slack.url)
    settle(d, T0 + 2)
    assert len(slack.messages) == 1


def test_a_slow_receiver_does_not_hold_up_the_others(db: sqlite3.Connection, slack: SlackWebhook,
                                                     pd: PagerDutyEvents, team: Receiver, oncall: Receiver) -> None:
    d, outbox = Dispatcher(db, spec(team, oncall), timeout_s=1.0), Outbox(db)
    slack.delay_next(1, 3.0)
    outbox.enqueue("team", SLACK, slack_body("slow", []), "slow", time.time())
    outbox.enqueue("oncall", PAGERDUTY_EVENT, pagerduty_trigger_body("a@1", summary="s", source="g", severity="info",
                                                                     at=T0), "fast", time.time())
    db.commit()
    start = time.monotonic()
    while not pd.incidents and time.monotonic() - start < 5:
        d.tick(time.time())
        d.wait(0.05)
    assert pd.incidents and time.monotonic() - start < 0.9 and d.busy  # Slack still hangs
    while d.busy and time.monotonic() - start < 5:
        d.wait(0.5)
        d.tick(time.time())
    states = {s.name: s for s in d.status(time.time())}
    assert 0.9 < time.monotonic() - start < 2.5  # the timeout ended the wait, not the 3 s answer
    assert states["team"].state == "retrying" and "timed out" in (states["team"].error or "")
    assert states["oncall"].sent == 1
    d.close()


def test_secrets_never_reach_rows_logs_or_status(db: sqlite3.Connection, slack: SlackWebhook, pd: PagerDutyEvents,
                                                 team: Receiver, key: str, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("GREYMESH_TEST_PD_KEY", key)
    oncall = pd_receiver("oncall", pd, SecretRef(env="GREYMESH_TEST_PD_KEY"))
    s = spec(team, oncall, group_wait_s=30, group_interval_s=300)
    n, d = Notifier(db, s), Dispatcher(db, s)
    pd.answer_next(1, 400, body=json.dumps({"status": "invalid event", "errors": [f"unknown routing key {key}"]}))
    slack.answer_next(1, 500, body=f"upstream failed posting to {slack.url}")
    slack.answer_next(1, 404)
    caplog.set_level(logging.DEBUG)
    n.fire(alert("payments", "errors"), T0)
    n.fire(alert("orders", "errors"), T0)
    n.tick(T0 + 30)
    n.change("payments", "shifted weight", change_id="d1", at=T0 + 31)
    db.commit()
    for t in (31, 33, 40, 50):
        settle(d, T0 + t)
    assert pd.requests(400) and slack.requests(500) and slack.requests(404)  # every error path ran
    dump = repr([db.execute(f"SELECT * FROM {t}").fetchall() for (t,) in
                 db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")])
    shown = repr(d.status(T0 + 50)) + repr(n.status(T0 + 50)) + dump + caplog.text
    token = slack.path.rsplit("/", 1)[1]
    for secret in (slack.url, token, key):
        assert secret not in shown
    assert "<secret>" in shown  # the answers quoting them were scrubbed, not dropped


# --- restarts ----------------------------------------------------------------------------


@pytest.fixture
def both(team: Receiver, oncall: Receiver) -> AlertsSpec:
    return spec(team, oncall, group_wait_s=30, group_interval_s=300)


def test_crash_before_commit_loses_nothing(tmp_path: Path, slack: SlackWebhook, pd: PagerDutyEvents,
                                           both: AlertsSpec) -> None:
    path = tmp_path / "crash.db"
    db = sqlite3.connect(path)
    n = Notifier(db, both)
    n.fire(alert("payments", "errors"), T0)
    assert n.tick(T0 + 30) == 2
    db.close()  # killed before the commit: the anomaly's offset was not committed either

    db = sqlite3.connect(path)
    n, d = Notifier(db, both), Dispatcher(db, both)
    assert Outbox(db).messages() == []
    n.fire(alert("payments", "errors"), T0)  # Kafka gives the same anomaly again
    assert n.tick(T0 + 30) == 2
    db.commit()
    settle(d, T0 + 30)
    assert len(slack.messages) == 1 and len(pd.incidents) == 1 and pd.incidents[0].triggers == 1
    db.close()


def test_crash_between_enqueue_and_send_sends_once(tmp_path: Path, slack: SlackWebhook, pd: PagerDutyEvents,
                                                   both: AlertsSpec) -> None:
    path = tmp_path / "crash.db"
    db = sqlite3.connect(path)
    n = Notifier(db, both)
    n.fire(alert("payments", "errors"), T0)
    n.tick(T0 + 30)
    db.commit()
    db.close()  # killed before the dispatcher sent anything

    db = sqlite3.connect(path)
    n, d = Notifier(db, both), Dispatcher(db, both)
    n.fire(alert("payments", "errors", at=T0 + 31), T0 + 31)  # the next window: the same episode
    assert n.tick(T0 + 31) == 0
    db.commit()
    for t in (31, 32, 60, 400):
        n.tick(T0 + t)
        db.commit()
        settle(d, T0 + t)
    assert len(slack.messages) == 1 and len(pd.requests()) == 1 and len(pd.incidents) == 1
    assert {s for _, _, s in Outbox(db).messages()} == {"sent"}
    db.close()


def test_crash_between_send_and_mark_sends_again(tmp_path: Path, slack: SlackWebhook, pd: PagerDutyEvents,
                                                 both: AlertsSpec) -> None:
    """At least once: PagerDuty folds the re-sent trigger into the same incident by its
    dedup_key; Slack cannot, so its message is posted twice, the second marked as such."""
    path = tmp_path / "crash.db"
    db = sqlite3.connect(path)
    n, d = Notifier(db, both), Dispatcher(db, both)
    n.fire(alert("payments", "errors"), T0)
    n.tick(T0 + 30)
    db.commit()
    d.tick(T0 + 30)  # both sends start ...
    deadline = time.monotonic() + 5
    while (not slack.messages or not pd.incidents) and time.monotonic() < deadline:
        time.sleep(0.01)
    d.close()  # ... and reach their receivers; the process dies before recording that
    db.close()

    db = sqlite3.connect(path)
    d = Dispatcher(db, both)
    for t in (31, 32, 100):
        settle(d, T0 + t)
    assert len(slack.messages) == 2 and slack.messages[1]["text"].startswith(DUPLICATE_NOTE)
    assert slack.messages[1]["text"].endswith(slack.messages[0]["text"])
    triggers = [json.loads(r.body)["dedup_key"] for r in pd.requests()]
    assert len(triggers) == 2 and triggers[0] == triggers[1]
    assert len(pd.incidents) == 1 and pd.incidents[0].triggers == 2  # one incident
    assert {s for _, _, s in Outbox(db).messages()} == {"sent"}
    db.close()


# --- the outbox itself -------------------------------------------------------------------


def test_outbox_enqueue_is_idempotent_and_bounded(db: sqlite3.Connection,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    outbox = Outbox(db)
    assert outbox.enqueue("team", SLACK, "{}", "a", T0) and not outbox.enqueue("team", SLACK, "{}", "a", T0)
    assert len(outbox.messages()) == 1
    monkeypatch.setattr("actions.outbox.MAX_PENDING", 3)
    for i in range(5):
        outbox.enqueue("team", SLACK, "{}", f"b{i}", T0)
    assert [d for d, _, s in outbox.messages() if s == "pending"] == ["b2", "b3", "b4"]
    [state] = outbox.receivers()
    assert (state.dropped, state.queued) == (3, 3)
    outbox.mark_sent(outbox.due(T0)[0].id, T0)
    assert outbox.prune(T0 + 1) == 4 and len(outbox.messages()) == 2


def test_greymesh_alerts_test_sends_outside_the_outbox(db: sqlite3.Connection, slack: SlackWebhook,
                                                       pd: PagerDutyEvents, team: Receiver, oncall: Receiver) -> None:
    d = Dispatcher(db, spec(team, oncall))
    assert d.test("team", T0).outcome == "sent" and "test message" in slack.messages[0]["text"]
    assert d.test("oncall", T0).outcome == "sent" and pd.changes and pd.incidents == []
    missing = d.test("nobody", T0)
    assert missing.outcome == "failed" and "oncall, team" in missing.error
    assert Outbox(db).messages() == []
