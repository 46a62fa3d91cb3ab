"""The tap service of one host (`python -m tapstream.service`, started by `greymesh up`).

One process holds the two ways events enter the pipe and the one way they leave it:

    sidecars --ALS gRPC--> Collector ----\\
                                          TapProducer --> Kafka (spool on disk while it is away)
    OPA --decision logs HTTP--> receiver -/

Its HTTP port serves OPA's ``POST /logs`` and ``GET /stats`` (collector, producer and
decision counters; `greymesh status` and `greymesh taps stats` read it).  Events the
spool had to drop are never silent: they are counted in the stats, logged, and once the
broker takes records again an alert record goes to ``greymesh.alerts``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from core.contracts import ALERTS_TOPIC, AUDIT_TOPIC, TapDropAlert
from core.credentials import CredentialError
from core.jsonhttp import CLI, Access, Credential
from core.kafka import KafkaAuth, add_secret_argument, auth_from_args
from core.sidecar_auth import Authenticator, SidecarTokens
from tapstream.collector import Collector, serve
from tapstream.decisionlog import OPA, AuditRecord, DecisionLogReceiver, receiver_access
from tapstream.producer import TapProducer

log = logging.getLogger("greymesh.tapstream")

ALERT_CHECK_S = 5.0


class DropAlerts:
    """Turns the producer's drop callbacks into one alert record per burst, sent once the
    broker is back (an alert sent while it is away would only be dropped too)."""

    def __init__(self, host: str):
        self.host = host
        self._lock = threading.Lock()
        self._pending = [0, 0]  # records, events dropped since the last alert
        self._since_us = 0

    def on_drop(self, records: int, events: int) -> None:
        with self._lock:
            if self._pending == [0, 0]:
                self._since_us = time.time_ns() // 1000
            self._pending[0] += records
            self._pending[1] += events

    def flush(self, producer: TapProducer) -> None:
        if not producer.stats().broker_up:
            return
        with self._lock:
            (records, events), self._pending = self._pending, [0, 0]
            since = self._since_us
        if events or records:
            alert = TapDropAlert(
                host=self.host, time_us=time.time_ns() // 1000, since_us=since,
                dropped_records=records, dropped_events=events,
                message=f"the tap spool on {self.host} was full: {events} events in {records} records were "
                        "dropped while Kafka was unreachable; raise --max-spool-mb or fix the broker sooner",
            )
            producer.send(ALERTS_TOPIC, self.host, json.dumps(alert.to_event()).encode())


def run(*, data_dir: Path, host: str, grpc_port: int, http_port: int, access: Access, bootstrap: str,
        max_spool_bytes: int, stop: threading.Event, sidecars: Authenticator,
        auth: KafkaAuth | None = None) -> None:
    """Serve until ``stop`` is set, then flush what can be flushed; ALS streams only from the
    sidecars ``sidecars`` authenticates."""
    alerts = DropAlerts(host)
    producer = TapProducer(bootstrap, data_dir / "taps" / "spool", max_spool_bytes=max_spool_bytes,
                           on_drop=alerts.on_drop, auth=auth)
    collector = Collector(producer, sidecars)

    def publish_decisions(records: list[AuditRecord]) -> None:
        by_callee: dict[str, list[dict[str, Any]]] = {}
        for record in records:
            by_callee.setdefault(record.callee, []).append(record.to_event())
        for callee, events in by_callee.items():
            producer.send(AUDIT_TOPIC, callee, json.dumps(events, separators=(",", ":")).encode(),
                          events=len(events))

    def stats() -> dict[str, Any]:
        return {"collector": collector.stats.snapshot(), "producer": asdict(producer.stats())}

    receiver = DecisionLogReceiver(publish_decisions, access, host, http_port, extra_stats=stats).start()
    server, port = serve(collector, host, grpc_port)
    log.info("tap collector: ALS on %s:%d, decision logs and /stats on %s; Kafka at %s",
             host, port, receiver.url, bootstrap)
    try:
        while not stop.wait(ALERT_CHECK_S):
            alerts.flush(producer)
    finally:
        server.stop(grace=2).wait()  # sidecars reconnect to the next collector
        receiver.stop()
        alerts.flush(producer)
        producer.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tapstream.service", description="Run the tap collector of one host.")
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--grpc-port", type=int, required=True, help="the ALS port sidecars stream to")
    p.add_argument("--http-port", type=int, required=True, help="OPA's decision logs and /stats")
    p.add_argument("--kafka", required=True, help="bootstrap servers, host:port[,host:port...]")
    p.add_argument("--max-spool-mb", type=int, default=256, help="disk spool bound while Kafka is away")
    p.add_argument("--opa-token-file", type=Path, required=True, help="OPA's decision-log token (0600): POST /logs")
    p.add_argument("--api-token-file", type=Path, required=True, help="the CLI's token (0600): GET /stats")
    p.add_argument("--sidecar-key-file", type=Path, required=True,
                   help="the key (0600) that checks the sidecars' access-log credentials (core/sidecar_auth.py)")
    add_secret_argument(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # a line per failed reconnect, many a second
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        access = receiver_access(Credential.load(OPA, args.opa_token_file), Credential.load(CLI, args.api_token_file))
        sidecars = SidecarTokens.load(args.sidecar_key_file, "als")
        kafka_auth = auth_from_args(args)
    except CredentialError as exc:
        log.error("%s", exc)
        return 2
    try:
        run(data_dir=args.data_dir, host=args.host, grpc_port=args.grpc_port, http_port=args.http_port, access=access,
            bootstrap=args.kafka, max_spool_bytes=args.max_spool_mb << 20, stop=stop, sidecars=sidecars,
            auth=kafka_auth)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
