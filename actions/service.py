"""The actions process (``python -m actions.service``): anomalies in, alerts and guarded changes out.

One thread owns the state and runs rounds of: read new anomaly events (Kafka), hand them
to the loop (decisions) and the notifier (alerts), tick both, commit, then send what the
round decided to Kafka.  A second thread delivers notifications (the dispatcher), so a
slow receiver never delays a decision.  The HTTP API (for the CLI) takes the same lock as
the round, so a revert or a mode change lands between two rounds, never inside one.

**State** lives in one SQLite database (``<data dir>/actions/state.db``, WAL, 0600): the
loop's episodes and decisions, the notifier's alerts, silences and outbox, and the Kafka
offsets of the anomalies read, all written in one transaction per round.  A kill -9
therefore loses and doubles nothing (actions/feed.py states the contract).

**Config** is the applied spec's ``alerts:`` and ``actions:`` sections (core/loopspec.py),
re-read when the file changes; a section that does not parse keeps the running one and is
shown by ``/status``.  The control plane validated it before applying, so that only
happens when the file is edited behind its back.

**Health.**  The loop acts only when it can see: the store answers, the scorer has scored
within :data:`SCORER_STALE_S`, and the anomalies topic is read with little lag.  When one
fails the loop holds every move and raises a "loop blind" alert (actions/loop.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from http.server import ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from actions.alerts import Notifier
from actions.controlplane import ControlPlaneOverrides, OverrideError
from actions.feed import AnomalyFeed, DecisionLog
from actions.loop import Loop, LoopHealth, apportion
from actions.model import Alert, anomaly_kind
from actions.receivers import Dispatcher
from actions.samples import StoreSamples
from actions.scaling import ScaleError
from core import jsonhttp
from core.contracts import ActionDecision, AnomalyEvent, ServiceRouting
from core.credentials import CredentialError
from core.datadir import PRIVATE_UMASK, DataDir
from core.kafka import add_secret_argument, auth_from_args
from core.loopspec import MAX_SILENCE_S, MODES, LoopSpec, parse_loop
from core.specread import SpecError
from core.storeclient import StoreClient, StoreError

log = logging.getLogger("greymesh.actions")

ROUND_S = 1.0  # a round at least this often: a 10 s window is acted on within a second of its anomaly
SCORER_STALE_S = 30.0  # the scorer writes its stats every 2 s; this long without is a dead scorer
MAX_LAG = 1000  # anomaly records not yet read beyond which the loop is behind, hence blind
MAX_BODY_BYTES = 64 * 1024
SCALE_TIMEOUT_S = 180.0
DELIVERY_POLL_S = 0.2


def open_state(path: Path) -> sqlite3.Connection:
    """The process's database: created 0600 in a 0700 directory, WAL so the dispatcher's
    connection reads while the round writes."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    db = sqlite3.connect(path, check_same_thread=False, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a committed round survives a process kill
    return db


class CommandScaler:
    """Scales through the runtime's own command (given by the runtime: the local runtime's
    `greymesh scale SERVICE[/SUBSET] COUNT`), and counts instances from the control plane's
    routing view.

    A service with several subsets is scaled per subset: every subset keeps one instance,
    the rest follow the traffic each subset takes now (its effective weight), and subsets
    grow before any shrinks, so capacity never dips on the way."""

    def __init__(self, command: list[str], overrides: ControlPlaneOverrides):
        self.command = command
        self.overrides = overrides

    def _routing(self, service: str) -> ServiceRouting:
        try:
            routing = {r.service: r for r in self.overrides.routing()}
        except OverrideError as exc:
            raise ScaleError(f"cannot count {service}'s instances: {exc}") from None
        if service not in routing:
            raise ScaleError(f"{service}: the control plane knows no such service")
        return routing[service]

    def instances(self, service: str) -> int:
        return sum(n for _, n in self._routing(service).instances)

    def plan(self, service: str, count: int) -> list[tuple[str, int]]:
        """The (target, count) commands that bring ``service`` to ``count`` instances."""
        routing = self._routing(service)
        have = dict(routing.instances)
        if len(have) <= 1:
            return [(service, count)]
        if count < len(have):
            raise ScaleError(f"{service}: {count} instance(s) cannot keep one for each of its subsets "
                             f"({', '.join(have)})")
        effective = dict(routing.effective)
        extra = apportion(count - len(have), {s: effective.get(s, 0) for s in have})
        want = {s: 1 + extra[s] for s in have}
        grow = [(f"{service}/{s}", want[s]) for s in have if want[s] > have[s]]
        shrink = [(f"{service}/{s}", want[s]) for s in have if want[s] < have[s]]
        return grow + shrink

    def scale(self, service: str, count: int) -> None:
        for target, n in self.plan(service, count):
            try:
                proc = subprocess.run([*self.command, target, str(n)], capture_output=True, text=True,
                                      timeout=SCALE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise ScaleError(f"scaling {target} to {n} took more than {SCALE_TIMEOUT_S:.0f}s") from None
            if proc.returncode != 0:
                raise ScaleError(f"scaling {target} to {n} failed: {proc.stderr.strip()[-500:]}")


def anomaly_alert(event: AnomalyEvent, kind: str | None = None) -> Alert:
    """The alert an anomaly event raises (open) or resolves (resolved): one per service and kind
    (``kind``: the one it opened with; by default its own causes' kind)."""
    kind = kind or anomaly_kind(event)
    ratio = event.peak_score / event.threshold if event.threshold > 0 else 0.0
    severity = "critical" if ratio >= 3 else "error"
    return Alert(key=f"{event.service}/{kind}", service=event.service, kind=kind, severity=severity,
                 summary=f"{event.service}: {event.explanation}", firing=event.state == "open",
                 at=event.window + 0.0,
                 details=(("anomaly_id", event.anomaly_id), ("score", f"{event.score:.3g}"),
                          ("threshold", f"{event.threshold:.3g}"), ("windows", str(event.windows)),
                          ("detector", f"{event.detector} {event.model_version}"), ("causes", event.causes)))


def handle(event: AnomalyEvent, loop: Loop, notifier: Notifier, now: float) -> None:
    """One anomaly event to the loop (its decisions) and the notifier (its alert); call in the
    round's transaction."""
    loop.on_anomaly(event, now)
    alert = anomaly_alert(event, loop.kind_of(event.anomaly_id))
    if alert.firing:
        notifier.fire(alert, now)
    else:
        notifier.resolve(alert.key, now)


class Service:
    def __init__(self, db: sqlite3.Connection, spec_file: Path, feed: AnomalyFeed, decisions: DecisionLog,
                 loop: Loop, notifier: Notifier, dispatcher: Dispatcher, store: StoreClient,
                 scorer_stats: Path | None):
        self.db, self.spec_file = db, spec_file
        self.feed, self.decisions, self.loop, self.notifier = feed, decisions, loop, notifier
        self.dispatcher = dispatcher
        self.store, self.scorer_stats = store, scorer_stats
        self.lock = threading.RLock()
        self.spec_problem: str | None = None
        # Set once the applied spec was read: until then the receivers are unknown, and the
        # dispatcher would fail the outbox's messages as sent to receivers that no longer exist.
        self.configured = threading.Event()
        self._spec_mtime: float | None = None
        self.health = LoopHealth(store_ok=True, scorer_ok=True, kafka_ok=True, detail="starting")
        self.rounds = 0

    def reload_spec(self) -> None:
        try:
            mtime = self.spec_file.stat().st_mtime
        except OSError as exc:
            self.spec_problem = f"cannot read {self.spec_file}: {exc.strerror}; keeping the running config"
            return
        if mtime == self._spec_mtime:
            return
        self._spec_mtime = mtime
        try:
            spec = parse_loop(self.spec_file.read_text(encoding="utf-8"), str(self.spec_file))
        except SpecError as exc:
            self.spec_problem = f"{exc}; keeping the running config"
            log.error("%s", self.spec_problem)
            return
        self.spec_problem = None
        self.loop.update_spec(spec.actions)
        self.notifier.update_spec(spec.alerts)
        self.dispatcher.update_spec(spec.alerts)
        self.configured.set()
        log.info("config from %s: mode %s, %d receiver(s)", self.spec_file, spec.actions.mode, len(spec.alerts.receivers))

    def check_health(self, now: float, kafka_ok: bool) -> LoopHealth:
        problems = []
        try:
            self.store.query("SELECT 1")
            store_ok = True
        except StoreError as exc:
            store_ok = False
            problems.append(f"store: {exc}")
        scorer_ok = True
        if self.scorer_stats is not None:
            try:
                stats = json.loads(self.scorer_stats.read_text())
                age = now - float(stats.get("at", 0))
                if age > SCORER_STALE_S:
                    scorer_ok = False
                    problems.append(f"scorer: last round {age:.0f}s ago")
                elif stats.get("source_error"):
                    scorer_ok = False
                    problems.append(f"scorer: {stats['source_error']}")
            except (OSError, ValueError) as exc:
                scorer_ok = False
                problems.append(f"scorer: no stats ({exc})")
        if not kafka_ok:
            problems.append("kafka: anomalies cannot be read, or are read too late")
        return LoopHealth(store_ok=store_ok, scorer_ok=scorer_ok, kafka_ok=kafka_ok, detail="; ".join(problems))

    def round(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        kafka_ok = True
        try:
            batch = self.feed.poll()
            kafka_ok = self.feed.lag() <= MAX_LAG
        except Exception as exc:  # noqa: BLE001 (Kafka away: the loop goes blind, the process lives)
            log.warning("cannot read anomalies: %s", exc)
            batch, kafka_ok = None, False
        with self.lock:
            self.reload_spec()
            try:
                for event in batch.events if batch else ():
                    handle(event, self.loop, self.notifier, now)
                if batch:
                    self.feed.advance(batch)
                self.db.commit()
            except Exception:
                self.db.rollback()
                self.feed.rewind()  # the batch is read again: its effects were not kept
                raise
            self.health = self.check_health(now, kafka_ok)
            try:
                self.loop.tick(now, self.health)
                self.notifier.tick(now)
                self.db.commit()
            except Exception:
                self.db.rollback()  # half a tick is never kept; the next round decides again
                raise
            self.rounds += 1
        self.decisions.flush()

    def status(self, now: float) -> dict:
        """The process's state for `greymesh status`: health, the loop, the alerts and the receivers."""
        with self.lock:
            return {"health": asdict(self.health), "spec_problem": self.spec_problem, "rounds": self.rounds,
                    "loop": self.loop.status().to_json(), "unsent_decisions": self.decisions.unsent(),
                    "dropped_decisions": self.decisions.dropped(), **self.alerts(now)}

    def alerts(self, now: float) -> dict:
        with self.lock:
            return {"alerts": asdict(self.notifier.status(now)),
                    "receivers": [asdict(r) for r in self.dispatcher.status(now)]}


def serve_api(svc: Service, host: str, port: int, access: jsonhttp.Access) -> ThreadingHTTPServer:
    """The CLI's API: GET /status, /decisions, /decisions/<id>, /alerts; POST /revert,
    /mode, /freeze, /unfreeze, /silences, /silences/expire, /alerts/test.  Every change is made as the
    authenticated principal, which the decision it leaves records."""

    class Handler(jsonhttp.ApiHandler):
        def do_GET(self) -> None:  # noqa: N802
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            if url.path == "/status":
                self.send_json(200, svc.status(time.time()))
            elif url.path == "/decisions":
                try:
                    limit = min(1000, max(1, int(query.get("limit", ["20"])[0])))
                except ValueError:
                    self.send_json(400, {"errors": ["limit: a whole number, e.g. ?limit=20"]})
                    return
                service = query.get("service", [None])[0]
                with svc.lock:
                    found = svc.loop.decisions(limit, service)
                self.send_json(200, {"decisions": [d.to_event() for d in found]})
            elif url.path.startswith("/decisions/"):
                with svc.lock:
                    found = svc.loop.decision(unquote(url.path.removeprefix("/decisions/")))
                if found is None:
                    self.send_json(404, {"errors": [f"no decision {url.path.removeprefix('/decisions/')!r}; "
                                                    "`greymesh actions list` shows them"]})
                else:
                    self.send_json(200, {"decision": found.to_event()})
            elif url.path == "/alerts":
                self.send_json(200, svc.alerts(time.time()))
            else:
                self.send_json(404, {"errors": [f"no such endpoint {url.path}"]})

        def do_POST(self) -> None:  # noqa: N802
            body = self.read_body()
            try:
                doc = json.loads(body or b"{}")
                if not isinstance(doc, dict):
                    raise ValueError("the body must be a JSON object")
            except ValueError as exc:
                self.send_json(400, {"errors": [f"bad JSON: {exc}"]})
                return
            now, by = time.time(), self.principal
            try:
                with svc.lock:
                    answer = self._post(urlsplit(self.path).path, doc, now, by)
                    svc.db.commit()
            except (ValueError, KeyError, TypeError) as exc:
                svc.db.rollback()
                self.send_json(400, {"errors": [str(exc)]})
                return
            if answer is None:
                self.send_json(404, {"errors": [f"no such endpoint {self.path}"]})
            else:
                svc.decisions.flush()
                self.send_json(200, answer)

        def _post(self, path: str, doc: dict, now: float, by: str) -> dict | None:
            if path == "/revert":
                return {"decision": svc.loop.revert(_text(doc, "id"), by, now).to_event()}
            if path == "/mode":
                service, mode = _text(doc, "service"), _text(doc, "mode")
                if mode not in MODES:
                    raise ValueError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
                svc.loop.set_mode(service, mode, by, now)
                return {"service": service, "mode": mode}
            if path == "/freeze":
                svc.loop.freeze(by, now)
                return {"frozen": True}
            if path == "/unfreeze":
                svc.loop.unfreeze(by, now)
                return {"frozen": False}
            if path == "/silences":
                duration = doc.get("duration_s")
                if isinstance(duration, bool) or not isinstance(duration, int | float) \
                        or not 0 < duration <= MAX_SILENCE_S:
                    raise ValueError(f"duration_s: seconds, more than 0 and at most {MAX_SILENCE_S}")
                silence = svc.notifier.silence(service=_optional_text(doc, "service"), kind=_optional_text(doc, "kind"),
                                               until=now + duration, by=by, comment=_text(doc, "comment"), now=now)
                return {"silence": asdict(silence)}
            if path == "/silences/expire":
                silence_id = _text(doc, "id")
                if not svc.notifier.expire_silence(silence_id, now):
                    raise ValueError(f"id: no active silence {silence_id!r}; `greymesh alerts list` shows them")
                return {"expired": silence_id}
            if path == "/alerts/test":
                verdict = svc.dispatcher.test(_text(doc, "receiver"), now)
                return {"outcome": verdict.outcome, "error": verdict.error}
            return None

    return jsonhttp.serve(Handler, host, port, access)


def _text(doc: dict, key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value or len(value) > 1024:
        raise ValueError(f"{key}: a non-empty string is required")
    return value


def _optional_text(doc: dict, key: str) -> str | None:
    """None when absent or empty (any), else as _text."""
    return _text(doc, key) if doc.get(key) not in (None, "") else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m actions.service",
                                description="Turn anomalies into alerts and guarded changes (docs/actions.md).")
    p.add_argument("--data-dir", type=Path, required=True, help="its state goes to <data dir>/actions/")
    p.add_argument("--spec", type=Path, help="the applied spec whose alerts:/actions: sections configure it "
                                              "(default: the data dir's applied spec)")
    p.add_argument("--kafka", required=True, help="bootstrap servers (greymesh.anomalies in, greymesh.actions out)")
    p.add_argument("--controlplane-url", required=True, help="the control plane's admin API (overrides)")
    p.add_argument("--sink-url", required=True, help="the sink's API (the store, read-only)")
    p.add_argument("--token-file", type=Path, required=True,
                   help="the actions stage's own token (0600), for the control plane and the sink")
    p.add_argument("--api-token-file", type=Path, required=True, help="the CLI's token (0600): who may call this API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--scorer-stats", type=Path, help="the scorer's stats file: its heartbeat, for the loop's health")
    p.add_argument("--scale-command", required=True,
                   help="the command that scales a service, given SERVICE COUNT after it (the runtime's)")
    add_secret_argument(p)
    args = p.parse_args(argv)
    os.umask(PRIVATE_UMASK)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    try:
        access = jsonhttp.Access((jsonhttp.Credential.load(jsonhttp.CLI, args.api_token_file),), MAX_BODY_BYTES)
        kafka_auth = auth_from_args(args)
    except CredentialError as exc:
        log.error("%s", exc)
        return 2
    dd = DataDir(args.data_dir)
    spec_file = args.spec or dd.spec
    db = open_state(dd.actions_state)
    feed = AnomalyFeed(db, args.kafka, kafka_auth)
    decisions = DecisionLog(db, args.kafka, kafka_auth)
    overrides = ControlPlaneOverrides(args.controlplane_url, args.token_file)
    spec = LoopSpec()  # until the applied spec is read (the first round reads it)
    notifier = Notifier(db, spec.alerts)
    dispatcher = Dispatcher(open_state(dd.actions_state), spec.alerts)

    def emit(decision: ActionDecision) -> None:
        decisions.record(decision)
        if decision.outcome == "acted":  # PagerDuty change events, Slack notes: what the mesh did
            notifier.change(decision.service, decision.reason, change_id=decision.event_id,
                            at=decision.time_us / 1e6, details=(("decision", decision.event_id),
                                                                ("action", decision.action),
                                                                ("before", decision.before),
                                                                ("after", decision.after)))

    loop = Loop(db, spec.actions, StoreSamples(StoreClient(args.sink_url, args.token_file)), overrides,
                CommandScaler(shlex.split(args.scale_command), overrides), emit,
                alert=lambda a: notifier.fire(a, a.at), inhibit=notifier.inhibit)
    db.commit()
    svc = Service(db, spec_file, feed, decisions, loop, notifier, dispatcher,
                  StoreClient(args.sink_url, args.token_file), args.scorer_stats)
    server = serve_api(svc, args.host, args.http_port, access)
    threading.Thread(target=server.serve_forever, name="greymesh-actions-api", daemon=True).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    deliverer = threading.Thread(target=deliver, args=(dispatcher, svc.configured, stop), name="greymesh-alerts",
                                 daemon=True)
    deliverer.start()
    log.info("actions on %s:%d, state %s, config from %s", args.host, args.http_port, dd.actions_state, spec_file)
    try:
        while not stop.is_set():
            started = time.monotonic()
            try:
                svc.round()
            except Exception:  # noqa: BLE001 (one bad round is logged; the state is rolled back, the next retries)
                log.exception("round failed; its changes were rolled back")
            stop.wait(max(0.0, ROUND_S - (time.monotonic() - started)))
    finally:
        server.shutdown()
        deliverer.join(timeout=10)
        dispatcher.close()
        feed.close()
        decisions.close()
        db.close()
    return 0


def deliver(dispatcher: Dispatcher, configured: threading.Event, stop: threading.Event) -> None:
    """The dispatcher's thread: once the receivers are known, start what is due, then sleep
    until a send concludes (or a short while, so new messages start promptly)."""
    while not stop.is_set() and not configured.wait(DELIVERY_POLL_S):
        pass
    while not stop.is_set():
        try:
            dispatcher.tick(time.time())
        except Exception:  # noqa: BLE001 (a delivery bug must not stop delivery for good)
            log.exception("delivering alerts failed; retrying")
        if not dispatcher.wait(DELIVERY_POLL_S):
            stop.wait(DELIVERY_POLL_S)


if __name__ == "__main__":
    sys.exit(main())
