"""`greymesh taps tail|query|stats`: look into the audit pipe of a running mesh.

``tail`` reads Kafka directly (no consumer group: it never takes records from the
sink); ``query`` and ``stats`` ask the sink's and the collector's loopback APIs, since
an embedded store can only be opened by the process that owns it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from core import contracts, credentials, jsonhttp
from core.datadir import DataDir
from core.endpoints import SINK_HTTP, TAPS_HTTP, Endpoints
from core.errors import GreymeshError, NotRunning
from core.kafka import READER, client_config, mesh_auth
from core.storeclient import StoreClient


def register(sub: Any, data_dir: Callable[[argparse.ArgumentParser], None]) -> None:
    taps = sub.add_parser("taps", help="the audit taps: follow events live, query the store, pipe statistics",
                          description="The audit taps of the running mesh (see docs/ARCHITECTURE.md, 'Audit taps').")
    tsub = taps.add_subparsers(required=True, metavar="ACTION")

    sp = tsub.add_parser("tail", help="print tap events as they arrive in Kafka (Ctrl-C stops)")
    sp.add_argument("--service", help="only events of this service (the emitting sidecar's)")
    sp.add_argument("--layer", choices=contracts.LAYERS, action="append",
                    help="only this layer (repeatable; default l7)")
    sp.add_argument("--json", action="store_true", help="one JSON event per line")
    sp.add_argument("--from-beginning", action="store_true", help="start with the oldest retained events")
    sp.set_defaults(func=_tail)
    data_dir(sp)

    sp = tsub.add_parser("query", help="run one read-only SQL query against the tap store")
    sp.add_argument("sql", help='e.g. "SELECT service, count() FROM tap_l7 GROUP BY service"')
    sp.add_argument("--json", action="store_true", help="one JSON object per row")
    sp.set_defaults(func=_query)
    data_dir(sp)

    sp = tsub.add_parser("stats", help="events/s, consumer lag, spool size and drops")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--interval", type=float, default=2.0, help="seconds between the two samples for rates")
    sp.set_defaults(func=_stats)
    data_dir(sp)


def _endpoints(args: argparse.Namespace) -> Endpoints:
    return Endpoints.require(DataDir(args.data_dir), SINK_HTTP, "taps")


def _stats_of(args: argparse.Namespace, endpoints: Endpoints, key: str) -> dict:
    url = endpoints.url(key) + "/stats"
    try:
        return jsonhttp.get(url, timeout_s=60, token=credentials.read(DataDir(args.data_dir).api_token))
    except jsonhttp.Unreachable:
        raise NotRunning(f"{url} is not reachable; is the mesh up? (`greymesh status`)") from None


def _query(args: argparse.Namespace) -> int:
    columns, rows = StoreClient.of_mesh(DataDir(args.data_dir), timeout_s=60).query(args.sql)
    if args.json:
        for row in rows:
            print(json.dumps(dict(zip(columns, row))))
        return 0
    cells = [[str(c) for c in columns], *[[str(v) for v in row] for row in rows]]
    widths = [min(60, max(len(r[i]) for r in cells)) for i in range(len(columns))]
    for n, row in enumerate(cells):
        print("  ".join(v[:60].ljust(w) for v, w in zip(row, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})", file=sys.stderr)
    return 0


def _stats(args: argparse.Namespace) -> int:
    endpoints = _endpoints(args)

    def sample() -> tuple[dict, dict]:
        return _stats_of(args, endpoints, TAPS_HTTP), _stats_of(args, endpoints, SINK_HTTP)

    first = sample()
    t0 = time.monotonic()
    time.sleep(args.interval)
    taps, sink = sample()
    elapsed = time.monotonic() - t0
    events = sum(taps["collector"]["events"].values())
    rows = sum(sink["rows"].values())
    doc = {
        "collected_events_per_s": round((events - sum(first[0]["collector"]["events"].values())) / elapsed, 1),
        "stored_rows_per_s": round((rows - sum(first[1]["rows"].values())) / elapsed, 1),
        "consumer_lag_records": sink["lag"],
        "spool_records": taps["producer"]["spool_records"],
        "spool_bytes": taps["producer"]["spool_bytes"],
        "dropped_events": taps["producer"]["dropped_events"],
        "broker_up": taps["producer"]["broker_up"],
        "malformed": {"als_messages": taps["collector"]["malformed"] + taps["collector"]["oversized"],
                      "records": sink["malformed_records"], "events": sink["malformed_events"]},
        "duplicates_dropped": sink["duplicates"],
        "store": sink["store"],
        "totals": {"collected": taps["collector"]["events"], "stored": sink["rows"]},
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    for key, value in doc.items():
        print(f"{key:<24} {value}")
    if doc["dropped_events"]:
        print(f"ALERT: {doc['dropped_events']} events were dropped because the spool was full", file=sys.stderr)
    return 0


def _tail(args: argparse.Namespace) -> int:
    from kafka import KafkaConsumer, TopicPartition

    endpoints = _endpoints(args)
    layers = args.layer or ["l7"]
    consumer = KafkaConsumer(bootstrap_servers=endpoints.kafka_bootstrap(), group_id=None,
                             enable_auto_commit=False, client_id="greymesh-taps-tail",
                             **client_config(mesh_auth(DataDir(args.data_dir), endpoints, READER)))
    try:
        partitions = [TopicPartition(contracts.topic(layer), p)
                      for layer in layers for p in sorted(consumer.partitions_for_topic(contracts.topic(layer)) or ())]
        if not partitions:
            raise GreymeshError(f"Kafka at {endpoints.kafka_bootstrap()} has no tap topics; is the mesh up?")
        consumer.assign(partitions)
        (consumer.seek_to_beginning if args.from_beginning else consumer.seek_to_end)(*partitions)
        print(f"following {', '.join(map(contracts.topic, layers))} at {endpoints.kafka_bootstrap()} (Ctrl-C stops)",
              file=sys.stderr, flush=True)
        while True:
            for records in consumer.poll(timeout_ms=1000).values():
                for record in records:
                    _print_events(record, args)
    except KeyboardInterrupt:
        return 0
    finally:
        consumer.close()


def _print_events(record: Any, args: argparse.Namespace) -> None:
    try:
        events = json.loads(record.value)
    except ValueError:
        print(f"(unreadable record at {record.topic}[{record.partition}]@{record.offset})", file=sys.stderr)
        return
    for e in events if isinstance(events, list) else []:
        # l3/l4/l7 events name their service; audit events the callee's SPIFFE ID (.../sa/<service>).
        if args.service and args.service not in (e.get("service"), str(e.get("callee", "")).rpartition("/")[2]):
            continue
        print(json.dumps(e) if args.json else _line(contracts.layer_of_topic(record.topic), e), flush=True)


def _line(layer: str, e: dict) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(e.get("time_us", 0) / 1e6))
    if layer == "l7":
        authz = f" authz={e['authz']}" if e.get("authz") else ""
        return (f"{when} {e['sidecar']:<14} {e['direction']:<8} {e['method']} {e['authority']}{e['path']} "
                f"-> {e['status']} {e['duration_us'] / 1000:.1f}ms {e['response_bytes']}B "
                f"{e.get('response_flags') or ''}{authz} peer={e['peer'] or e['src_addr']}")
    if layer == "l4":
        return (f"{when} {e['sidecar']:<14} {e['direction']:<8} conn {e['connection_id'][:8]} in={e['bytes_in']}B "
                f"out={e['bytes_out']}B {e['tls_version'] or 'plaintext'} peer={e['peer'] or '-'} {e['termination']}")
    if layer == "l3":
        return (f"{when} {e['sidecar']:<14} {e['direction']:<8} flow {e['src_addr']}:{e['src_port']} -> "
                f"{e['dst_addr']}:{e['dst_port']} {e['duration_us'] / 1000:.1f}ms")
    if layer == "anomaly":
        return (f"{when} anomaly {e['state']:<8} {e['service']:<12} score {e['score']:.3g} "
                f"(threshold {e['threshold']:.3g}): {e['explanation']}")
    return (f"{when} authz {'ALLOW' if e['allow'] else 'DENY '} {e['caller'] or '-'} -> {e['callee']} "
            f"{e['method']} {e['path']}: {e['reason']}")
