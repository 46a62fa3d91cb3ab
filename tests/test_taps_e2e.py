"""Audit taps end to end: real Envoy sidecars -> ALS -> tap collector -> real Kafka ->
sink -> a real ClickHouse server (Debian's 18.16, over the native protocol).

The mesh runs with ``--store clickhouse://...`` so that the store can be taken away;
the embedded store (chdb, the default) carries every other end-to-end module's mesh.
No load generator runs: every row counted here comes from a request the test sent,
marked with its own User-Agent.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator

import grpc
import pytest
import yaml
from envoy.service.accesslog.v3 import als_pb2

from core.datadir import DataDir
from core.sidecar_auth import SidecarIdentity, SidecarTokens, purpose_secret
from tests.support.clickhouse import ClickHouseServer
from tests.support.mesh import DEMO_SPEC, Mesh, running_mesh, tls_context, wait_for

ARRIVAL_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def clickhouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseServer]:
    server = ClickHouseServer(tmp_path_factory.mktemp("clickhouse"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, clickhouse: ClickHouseServer) -> Iterator[Mesh]:
    doc = yaml.safe_load(DEMO_SPEC.read_text())
    work = tmp_path_factory.mktemp("taps")
    store = clickhouse.url("taps_e2e")
    with running_mesh(work, doc, "delta", up_args=("--rps", "0", "--store", store)) as m:
        yield m


def send(mesh: Mesh, n: int, agent: str, *, path: str = "/anything/shop") -> list[int]:
    """n requests to the entrypoint, each on its own connection (Connection: close, so
    each makes one l3/l4 connection tap too); returns the statuses."""
    url = urllib.parse.urlsplit(mesh.entrypoint)
    statuses = []
    for _ in range(n):
        conn = http.client.HTTPSConnection(url.hostname, url.port, timeout=10, context=tls_context(mesh.entrypoint))
        try:
            conn.request("GET", path, headers={"User-Agent": agent, "Connection": "close"})
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
        except OSError:
            statuses.append(0)
        finally:
            conn.close()
    return statuses


def count(mesh: Mesh, sql: str) -> int:
    return int(mesh.query(sql)[0]["n"])


def wait_rows(mesh: Mesh, sql: str, want: int, what: str) -> None:
    wait_for(lambda: count(mesh, sql) >= want, ARRIVAL_TIMEOUT_S, what, interval=0.5)
    time.sleep(3)  # anything extra (a duplicate) would have arrived by now
    assert count(mesh, sql) == want, f"{what}: {count(mesh, sql)} rows, want exactly {want}"


def test_n_requests_give_n_l7_rows_with_their_fields_and_matching_l3_l4_rows(mesh: Mesh):
    agent, n = f"taps-e2e/{uuid.uuid4()}", 40
    t0 = time.time_ns() // 1000
    assert send(mesh, n, agent) == [200] * n
    ingress = f"FROM tap_l7 WHERE user_agent = '{agent}' AND direction = 'ingress'"
    wait_rows(mesh, f"SELECT count() AS n {ingress}", n, "the ingress l7 rows")

    rows = mesh.query(f"SELECT * {ingress}")
    assert {r["sidecar"] for r in rows} == {"frontend-1"} and {r["service"] for r in rows} == {"frontend"}
    assert {(r["method"], r["path"], r["status"], r["protocol"]) for r in rows} == {("GET", "/anything/shop", 200, "HTTP/1.1")}
    assert all(r["time_us"] >= t0 - 1_000_000 and r["duration_us"] > 0 for r in rows)
    assert all(r["response_bytes"] > 100 and r["request_bytes"] > 0 for r in rows)
    assert len({r["request_id"] for r in rows}) == n and len({r["event_id"] for r in rows}) == n
    assert all(r["upstream_cluster"] == "inbound|app" and r["src_addr"] == "127.0.0.1" for r in rows)

    # Each request is one connection: one l4 and one l3 row each, joined on the peer port.
    ports = sorted(r["src_port"] for r in rows)
    l3 = f"FROM tap_l3 WHERE sidecar = 'frontend-1' AND direction = 'ingress' AND src_port IN ({','.join(map(str, ports))}) AND time_us >= {t0 - 1_000_000}"
    wait_rows(mesh, f"SELECT count() AS n {l3}", n, "the ingress l3 rows")
    flows = mesh.query(f"SELECT connection_id, src_port, dst_port, duration_us {l3}")
    assert sorted(f["src_port"] for f in flows) == ports
    ids = "','".join(f["connection_id"] for f in flows)
    l4 = mesh.query(f"SELECT bytes_in, bytes_out, tls_version, termination FROM tap_l4 WHERE connection_id IN ('{ids}')")
    assert len(l4) == n
    assert all(c["bytes_in"] > 0 and c["bytes_out"] >= min(r["response_bytes"] for r in rows) for c in l4)
    assert {c["tls_version"] for c in l4} == {"TLSv1_3"}  # the ingress is TLS from outside the mesh too

    # Inside the mesh: orders served each of them (the demo services pass x-request-id on),
    # over mTLS from frontend, allowed by policy.
    request_ids = "','".join(r["request_id"] for r in rows)
    inbound = f"FROM tap_l7 WHERE sidecar = 'orders-1' AND direction = 'inbound' AND request_id IN ('{request_ids}')"
    wait_rows(mesh, f"SELECT count() AS n {inbound}", n, "orders' inbound l7 rows of the same requests")
    served = mesh.query(f"SELECT peer, authz, authz_reason, status {inbound}")
    assert {(r["peer"], r["authz"], r["status"]) for r in served} == {
        ("spiffe://greymesh.local/ns/default/sa/frontend", "allow", 200)}
    assert {r["authz_reason"] for r in served} == {"frontend may call orders"}


def test_a_closed_mtls_connection_leaves_its_peer_identity_and_tls_version(mesh: Mesh):
    """Sidecars pool their connections, so a connection's l3/l4 taps come when it closes:
    restarting frontend's sidecar closes its connections to orders."""
    send(mesh, 3, f"taps-e2e/{uuid.uuid4()}")
    frontend = "SELECT count() AS n FROM tap_l4 WHERE sidecar = 'orders-1' AND direction = 'inbound' " \
               "AND peer = 'spiffe://greymesh.local/ns/default/sa/frontend' AND tls_version = 'TLSv1_3'"
    before = count(mesh, frontend)
    os.killpg(mesh.status()["processes"]["envoy:frontend-1"]["pid"], signal.SIGTERM)
    wait_for(lambda: count(mesh, frontend) > before, ARRIVAL_TIMEOUT_S, "orders' l4 row of the closed connection")
    row = mesh.query(frontend.replace("count() AS n", "*") + " ORDER BY time_us DESC LIMIT 1")[0]
    assert row["bytes_in"] > 0 and row["bytes_out"] > 0
    flow = mesh.query(f"SELECT * FROM tap_l3 WHERE connection_id = '{row['connection_id']}'")
    assert len(flow) == 1 and flow[0]["duration_us"] > 0 and flow[0]["dst_port"] == mesh.placement()["sidecars"]["orders-1"]["inbound"]
    mesh.up()  # the sidecar comes back
    assert send(mesh, 1, "taps-e2e/after-restart") == [200]


def test_the_roll_ups_match_a_recomputation_from_raw_rows(mesh: Mesh):
    send(mesh, 20, f"taps-e2e/{uuid.uuid4()}")
    windows = "SELECT service, window, requests, errors_5xx, bytes_in, bytes_out, distinct_callers FROM service_windows"
    raw = ("SELECT service, toDateTime(intDiv(toUInt32(ts), 10) * 10) AS window, count() AS requests, "
           "countIf(status >= 500) AS errors_5xx, sum(request_bytes) AS bytes_in, sum(response_bytes) AS bytes_out, "
           "uniqExact(if(peer != '', peer, src_addr)) AS distinct_callers FROM tap_l7 "
           "WHERE direction IN ('inbound', 'ingress') GROUP BY service, window")
    order = " ORDER BY service, window"
    wait_for(lambda: mesh.query(f"SELECT * FROM ({windows}){order}") == mesh.query(f"SELECT * FROM ({raw}){order}"),
             ARRIVAL_TIMEOUT_S, "the roll-ups to equal the raw recomputation", interval=1.0)
    assert len(mesh.query(windows)) >= 4  # four serving services at least


def test_the_broker_killed_mid_stream_loses_and_duplicates_nothing(mesh: Mesh):
    agent = f"taps-e2e/{uuid.uuid4()}"
    sent = send(mesh, 30, agent)
    kafka_pid = mesh.status()["processes"]["kafka"]["pid"]
    os.killpg(kafka_pid, signal.SIGKILL)
    sent += send(mesh, 30, agent)  # the sidecars go on; the collector spools
    wait_for(lambda: mesh.stats()["producer"]["spool_records"] > 0, 30, "the collector to spool")
    time.sleep(3)
    mesh.up()  # starts the broker again (what an operator does); the spool replays
    sent += send(mesh, 30, agent)
    ok = sent.count(200)
    assert ok == 90
    wait_rows(mesh, f"SELECT count() AS n FROM tap_l7 WHERE user_agent = '{agent}' AND direction = 'ingress'", ok,
              "every ingress row, once")
    assert count(mesh, f"SELECT count(DISTINCT event_id) AS n FROM tap_l7 WHERE user_agent = '{agent}'") == \
        count(mesh, f"SELECT count() AS n FROM tap_l7 WHERE user_agent = '{agent}'")
    producer = mesh.stats()["producer"]
    assert producer["replayed_records"] > 0 and producer["spool_records"] == 0 and producer["dropped_events"] == 0


def test_the_store_down_for_30s_then_the_pipe_catches_up_with_nothing_lost(mesh: Mesh, clickhouse: ClickHouseServer):
    agent = f"taps-e2e/{uuid.uuid4()}"
    sent = send(mesh, 20, agent)
    clickhouse.kill()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            sent += send(mesh, 5, agent)
            time.sleep(1)
        sink = mesh.sink_stats()
        assert sink["insert_failures"] > 0 or sink["lag"], "the sink never noticed the store was away"
    finally:
        clickhouse.start()
    ok = sent.count(200)
    assert ok == len(sent)
    wait_rows(mesh, f"SELECT count() AS n FROM tap_l7 WHERE user_agent = '{agent}' AND direction = 'ingress'", ok,
              "the backlog after the store came back")


def test_malformed_and_oversized_als_messages_are_counted_and_skipped(mesh: Mesh):
    port = mesh.ports()["taps.grpc"]
    before = mesh.stats()["collector"]
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)])
    stream = channel.stream_unary("/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs",
                                  request_serializer=None, response_deserializer=None)
    # A sidecar's own credential (minted here with the collectors' key): the stream is let in,
    # and the bad messages in it are what the collector must survive.
    als = SidecarTokens.load(DataDir(mesh.data_dir).secret(purpose_secret("als")), "als")
    sidecar = SidecarIdentity("inventory-1", "inventory")
    identified = als_pb2.StreamAccessLogsMessage()
    identified.identifier.node.id, identified.identifier.node.cluster = sidecar.node, sidecar.service
    identified.identifier.log_name = "inbound"
    entry = identified.http_logs.log_entry.add()
    entry.request.path, entry.request.user_agent = "/after-garbage", "taps-e2e/rogue"
    entry.common_properties.start_time.GetCurrentTime()
    stream(iter([b"\xff\xfe not a protobuf", b"\x00" * (5 << 20), identified.SerializeToString()]), timeout=10,
           metadata=(als.metadata(sidecar),))
    channel.close()
    after = mesh.stats()["collector"]
    assert after["malformed"] == before["malformed"] + 1 and after["oversized"] == before["oversized"] + 1
    # The collector went on: the valid message after the garbage was stored.
    wait_for(lambda: count(mesh, "SELECT count() AS n FROM tap_l7 WHERE user_agent = 'taps-e2e/rogue' "
                                 "AND sidecar = 'inventory-1'") == 1,
             ARRIVAL_TIMEOUT_S, "the valid message after the bad ones")
    assert send(mesh, 1, "taps-e2e/after") == [200]


def test_taps_cli_query_stats_and_status(mesh: Mesh):
    out = mesh.cli("taps", "query", "SELECT service, count() AS n FROM tap_l7 GROUP BY service ORDER BY service").stdout
    assert "frontend" in out and "orders" in out
    refused = mesh.cli("taps", "query", "DROP TABLE tap_l7", check=False)
    assert refused.returncode == 1 and "not a read-only statement" in refused.stderr and "DROP" in refused.stderr
    stats = mesh.cli("taps", "stats", "--json", "--interval", "0.5").stdout
    assert '"dropped_events": 0' in stats and '"broker_up": true' in stats
    assert "taps: Kafka" in mesh.cli("status").stdout


def test_taps_tail_follows_new_events_of_one_service(mesh: Mesh):
    agent = f"taps-e2e/{uuid.uuid4()}"
    tail = subprocess.Popen(
        [sys.executable, "-m", "greymesh.cli", "taps", "tail", "--service", "frontend", "--layer", "l7", "--json",
         "--data-dir", str(mesh.data_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in tail.stdout], daemon=True).start()
    seen: list[dict] = []
    try:
        assert "following greymesh.tap.l7" in tail.stderr.readline()  # assigned, at the end of the log
        assert send(mesh, 5, agent) == [200] * 5
        deadline = time.monotonic() + ARRIVAL_TIMEOUT_S
        while len([e for e in seen if e["user_agent"] == agent]) < 5 and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                seen.append(json.loads(lines.get(timeout=1)))
    finally:
        tail.terminate()
        tail.wait(10)
    mine = [e for e in seen if e["user_agent"] == agent]
    assert len(mine) == 5 and {e["direction"] for e in mine} == {"ingress"}
    assert {e["service"] for e in seen} == {"frontend"}  # orders' events of the same requests are filtered out
