"""Scoring each new window as it lands, with hysteresis, into anomaly events.

The scorer polls the store (through the sink's ``/query``) for windows that have
closed: a window ``[w, w+10)`` is read once ``lateness_s`` has passed after its end, so
the access logs of its requests have reached the store (Envoy flushes every second, the
sink stores every half second).  Each service's new windows are scored by the current
model with the ``seq_len`` windows before them as context, and go through that
service's :class:`Tracker`:

    opens      when ``raise_hits`` of the last ``raise_span`` windows are above the
               threshold (2 of 3: one noisy window raises nothing, a signal that flaps
               above and below raises once)
    stays open while windows keep crossing, tracking its peak
    resolves   after ``clear_after`` windows in a row below the threshold

so an anomaly is two events, ``open`` and ``resolved``, however much its signal flaps.
Events go to Kafka ``greymesh.anomalies`` (tapstream.schema's ``anomaly`` layer), and
from there the sink stores them in the ``anomalies`` table.

The model is re-read from the registry when its CURRENT changes; a version that does
not load is logged and the one already loaded keeps scoring.  With ``auto_train_s``, a
scorer whose registry is empty trains the first version itself once it has seen that
much traffic (what ``greymesh up`` does, so the demo needs no manual step); any later
version comes from ``greymesh ml train``.  The scorer keeps no state that matters
across restarts but the open anomalies, which a restart resolves implicitly (it starts
from the newest closed window): any number of scorers can run, one per partition of
the services (``--shard i/n``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import signal
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ml.detectors import DEFAULT_DETECTOR
from ml.features import FEATURES, ServiceSeries, series_by_service
from ml.model import MeshModel, TrainingError, train_from
from ml.registry import ModelError, Registry
from core.contracts import ANOMALY_TOPIC, VERSION, WINDOW_SECONDS, AnomalyEvent
from core.kafka import KafkaAuth, add_secret_argument, auth_from_args, client_config
from core.storeclient import StoreClient, StoreError
from ml.windows import LATENESS_S, SinkWindows, WindowSource, closed_until

log = logging.getLogger("greymesh.ml.scorer")
MAX_UNSENT = 10_000


@dataclass(frozen=True)
class Hysteresis:
    raise_hits: int = 2
    raise_span: int = 3
    clear_after: int = 6


@dataclass
class _Open:
    anomaly_id: str
    opened: int
    peak: float
    windows: int = 0
    below: int = 0


@dataclass
class Tracker:
    """One service's hysteresis state."""

    service: str
    rules: Hysteresis = field(default_factory=Hysteresis)
    recent: deque[bool] = field(default_factory=deque)
    open: _Open | None = None

    def step(self, window: int, score: float, threshold: float) -> tuple[str, _Open] | None:
        """Feed one window; ("open" or "resolved", the anomaly) when that happens at this window."""
        above = score > threshold
        self.recent.append(above)
        while len(self.recent) > self.rules.raise_span:
            self.recent.popleft()
        if self.open is None:
            if sum(self.recent) >= self.rules.raise_hits:
                anomaly_id = hashlib.sha256(f"{self.service}|{window}".encode()).hexdigest()[:32]
                self.open = _Open(anomaly_id, window, score, windows=1)
                return "open", self.open
            return None
        self.open.windows += 1
        self.open.peak = max(self.open.peak, score)
        self.open.below = 0 if above else self.open.below + 1
        if self.open.below >= self.rules.clear_after:
            closed, self.open = self.open, None
            self.recent.clear()
            return "resolved", closed
        return None


@dataclass
class ScorerStats:
    model_version: str | None = None
    model_error: str | None = None
    windows_scored: int = 0
    last_window: int | None = None
    anomalies_opened: int = 0
    open_now: list[str] = field(default_factory=list)
    source_error: str | None = None
    auto_train_at: int | None = None  # when the first model will be trained (no model yet)
    unsent: int = 0  # anomaly events waiting for Kafka
    at: float = 0.0


class Scorer:
    def __init__(self, source: WindowSource, registry: Registry, emit: Callable[[list[AnomalyEvent]], None], *,
                 lateness_s: float = LATENESS_S, rules: Hysteresis = Hysteresis(), shard: tuple[int, int] = (0, 1),
                 auto_train_s: float | None = None, detector: str = DEFAULT_DETECTOR):
        self.source, self.registry, self.emit = source, registry, emit
        self.lateness_s, self.rules, self.shard = lateness_s, rules, shard
        self.auto_train_s, self.detector = auto_train_s, detector
        self._traffic_since: int | None = None  # first window with traffic this scorer saw (auto-training)
        self.model: MeshModel | None = None
        self.trackers: dict[str, Tracker] = {}
        self.next_window: int | None = None  # the first window not yet scored
        self.stats = ScorerStats()
        self._unsent: list[AnomalyEvent] = []

    def reload(self) -> None:
        """Take the registry's current version if it changed and loads; else keep the one we have."""
        current = self.registry.current()
        if current is None or current == self.stats.model_version:
            return
        try:
            version, model = self.registry.load(current)
        except ModelError as exc:
            if self.stats.model_error != str(exc):
                log.error("model %s refused, %s keeps scoring: %s", current, self.stats.model_version or "nothing",
                          exc)
            self.stats.model_error = str(exc)
            return
        self.model, self.stats.model_version, self.stats.model_error = model, version, None
        log.info("scoring with model %s (%s, %d services)", version, model.detector, len(model.services))

    def _auto_train(self, done: int) -> None:
        """Train and store the first version once ``auto_train_s`` of traffic has been seen."""
        if self.registry.versions():
            return  # a version exists (perhaps one that does not load): people decide from here
        if self._traffic_since is None:
            try:
                if self.source.fetch(done - WINDOW_SECONDS, done):
                    self._traffic_since = done - WINDOW_SECONDS
            except StoreError as exc:
                self.stats.source_error = str(exc)
            return
        self.stats.auto_train_at = int(self._traffic_since + self.auto_train_s)
        if done < self.stats.auto_train_at:
            return
        log.info("training the first model on the traffic since %d (%d s)", self._traffic_since,
                 done - self._traffic_since)
        try:
            model = train_from(self.source, self.detector, since=self._traffic_since, until=done,
                               progress=log.info)
        except (TrainingError, StoreError) as exc:
            log.warning("could not train the first model yet: %s", exc)
            self._traffic_since = None  # start counting again
            return
        version = self.registry.save(model, metrics={"trained_by": "scorer (first model, automatic)"})
        self.stats.auto_train_at = None
        log.info("stored %s; scoring with it from now on", version)
        self.reload()

    def _mine(self, service: str) -> bool:
        index, count = self.shard
        return zlib.crc32(service.encode()) % count == index

    def step(self, now: float | None = None) -> list[AnomalyEvent]:
        """Score every window that closed since the last step; emit and return the events."""
        self.reload()
        now = time.time() if now is None else now
        done = closed_until(now, self.lateness_s)
        if self.model is None and self.auto_train_s is not None:
            self._auto_train(done)
        model = self.model
        if model is None:
            return []
        if self.next_window is None:
            self.next_window = done - WINDOW_SECONDS
        if done <= self.next_window:
            return []
        context = max((sm.detector.context for sm in model.services.values()), default=1)
        since = self.next_window - (context - 1) * WINDOW_SECONDS
        services = [s for s in model.services if self._mine(s)]
        try:
            rows = self.source.fetch(since, done, services)
            self.stats.source_error = None
        except StoreError as exc:
            self.stats.source_error = str(exc)
            log.warning("%s", exc)
            return []
        series = series_by_service(rows, since, done)
        events: list[AnomalyEvent] = []
        for service in services:
            sm = model.services[service]
            # No row at all in the range: no requests, which is itself worth scoring (an outage).
            s = series.get(service) or ServiceSeries(service, since, np.zeros(((done - since) // WINDOW_SECONDS,
                                                                             len(FEATURES))))
            scores, parts = sm.score(s.raw)
            tracker = self.trackers.setdefault(service, Tracker(service, self.rules))
            threshold = sm.detector.threshold_
            for i in np.nonzero(s.windows >= self.next_window)[0]:
                window, score = int(s.windows[i]), float(scores[i])
                self.stats.windows_scored += 1
                change = tracker.step(window, score, threshold)
                if change is None:
                    continue
                text, causes = sm.explain(s.raw[i], parts[i])
                events.append(self._event(service, *change, window, score, threshold, text, causes, model))
                self.stats.anomalies_opened += change[0] == "open"
        self.next_window = done
        self.stats.last_window = done - WINDOW_SECONDS
        self.stats.open_now = sorted(s for s, t in self.trackers.items() if t.open is not None)
        self._send(events)
        return events

    def _send(self, events: list[AnomalyEvent]) -> None:
        """Emit this round's events after any that earlier rounds could not send; what
        fails now is kept (the oldest dropped past MAX_UNSENT) and tried next round."""
        self._unsent = (self._unsent + events)[-MAX_UNSENT:]
        if not self._unsent:
            return
        try:
            self.emit(self._unsent)
        except Exception as exc:  # noqa: BLE001 (Kafka away: keep scoring, send later)
            self.stats.unsent = len(self._unsent)
            log.warning("could not send %d anomaly events (%s); retrying next round", len(self._unsent), exc)
            return
        for e in self._unsent:  # once each, when sent: a retried batch is not logged again
            log.warning("anomaly %s: %s (score %.3g, threshold %.3g, window %d)", e.state, e.explanation,
                        e.score, e.threshold, e.window)
        self._unsent, self.stats.unsent = [], 0

    def _event(self, service: str, state: str, op: _Open, window: int, score: float, threshold: float, text: str,
               causes: list, model: MeshModel) -> AnomalyEvent:
        return AnomalyEvent(
            v=VERSION, event_id=f"{op.anomaly_id}-{state}", time_us=window * 1_000_000,
            service=service, anomaly_id=op.anomaly_id, state=state, window=window,
            score=score, threshold=threshold, peak_score=op.peak, windows=op.windows,
            explanation=text if state == "open" else f"{text} (resolved after {op.windows} windows, "
                                                     f"peak score {op.peak / threshold:.1f}x the threshold)",
            causes=json.dumps([asdict(c) for c in causes]), detector=model.detector,
            model_version=self.stats.model_version or "",
        )


def kafka_emitter(bootstrap: str, auth: KafkaAuth | None = None) -> Callable[[list[AnomalyEvent]], None]:
    """Send events to greymesh.anomalies as ``auth`` (the scorer's principal), one JSON-array
    record per service, and wait for the acks."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", client_id="greymesh-ml-scorer",
                             **client_config(auth))

    def emit(events: list[AnomalyEvent]) -> None:
        by_service: dict[str, list[dict[str, Any]]] = {}
        for e in events:
            by_service.setdefault(e.service, []).append(e.to_event())
        futures = [producer.send(ANOMALY_TOPIC, key=s.encode(), value=json.dumps(evs).encode())
                   for s, evs in by_service.items()]
        for f in futures:
            f.get(timeout=30)

    return emit


def run(scorer: Scorer, stats_path: Path | None, stop: threading.Event, interval_s: float = 2.0) -> None:
    while not stop.is_set():
        try:
            scorer.step()
        except Exception:  # noqa: BLE001 (one bad round must not end the daemon; the next retries)
            log.exception("scoring round failed; retrying")
        scorer.stats.at = time.time()
        if stats_path is not None:
            tmp = stats_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(scorer.stats)))
            tmp.replace(stats_path)
        stop.wait(interval_s)


def _shard(text: str) -> tuple[int, int]:
    index, slash, count = text.partition("/")
    if not (slash and index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected i/n with 0 <= i < n (this scorer's share of the "
                                         "services), e.g. 0/1 for all of them")
    return int(index), int(count)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ml.scorer", description="Score new windows into anomaly events.")
    p.add_argument("--sink-url", required=True, help="the sink's API, http://127.0.0.1:PORT")
    p.add_argument("--sink-token-file", type=Path, required=True,
                   help="the secret file (0600) with the scorer's token for the sink's /query")
    p.add_argument("--kafka", required=True, help="bootstrap servers for greymesh.anomalies")
    p.add_argument("--registry", type=Path, required=True)
    p.add_argument("--stats", type=Path, help="write the scorer's state here (JSON) every round")
    p.add_argument("--lateness", type=float, default=LATENESS_S, help="seconds after a window ends before it is scored")
    p.add_argument("--shard", type=_shard, default=(0, 1), help="i/n: score the services whose name hashes to i "
                   "of n (default: all)")
    p.add_argument("--auto-train-minutes", type=float,
                   help="with no model yet, train the first one after this much traffic")
    add_secret_argument(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    scorer = Scorer(SinkWindows(StoreClient(args.sink_url, args.sink_token_file)), Registry(args.registry),
                    kafka_emitter(args.kafka, auth_from_args(args)),
                    lateness_s=args.lateness, shard=args.shard,
                    auto_train_s=None if args.auto_train_minutes is None else args.auto_train_minutes * 60)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    log.info("scoring windows from %s with models from %s", args.sink_url, args.registry)
    run(scorer, args.stats, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
