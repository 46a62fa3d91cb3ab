"""Faults, measured: kill -9 each component of a running demo mesh under steady traffic.

One mesh (real processes, the local runtime's supervisor) carries every test.  Each test
sends 20 requests a second, open loop, to the entrypoint, every request on a path of its
own (``/anything/faults/<component>/<uuid>``, also its ``x-request-id``); after a few
seconds it kills the component's process group with SIGKILL, and measures:

- **back after**: seconds from the kill until the supervisor reports the component ready
  again (``supervisor.json``: a new pid, state ``ready``) *and* it serves (a check of its
  own: a request through the mesh, its API, its streams, ...);
- **requests failed**: replies other than 200 (or none) among the requests sent;
- **tap events lost / doubled**: once the pipe has drained, the l7 ``ingress`` events of
  the entrypoint's sidecar are counted per request path in the store (through the sink's
  ``/query``): a request with no stored event is lost, a path stored with more rows than
  distinct event ids is doubled.

Every row is printed (run with ``-s`` to see the table as it is measured; the table is
printed again at the end) and docs/faults.md holds a measured copy.  Bounds that are not
zero are what a kill -9 of that component costs by design, measured on a 2-core machine
shared with other work, with margin; each test says why.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
import yaml

from tests.support.mesh import DEMO_SPEC, Mesh, running_mesh, tls_context, wait_for

pytestmark = pytest.mark.e2e  # a whole mesh

RPS = 20.0
BEFORE_KILL_S = 3.0  # steady traffic before the kill
AFTER_BACK_S = 3.0  # and after the component is back
BACK_WITHIN_S = 10.0  # what every component must meet
GIVE_UP_S = 180.0  # how long a measurement waits at most for a component that is not back
DRAIN_S = 120.0  # how long the pipe may take to store the last events
QUIET_S = 5.0  # caught up and no new rows for this long: the pipe has drained what it will store


@dataclass
class Row:
    component: str
    ready_s: float  # kill -> ready per supervisor.json
    back_s: float  # kill -> ready and serving
    sent: int
    failed: int
    failed_window_s: float  # first to last failed request's send time (0: none failed)
    lost: int
    doubled: int
    stored: int

    def line(self) -> str:
        return (f"| {self.component:<22} | {self.ready_s:6.2f} | {self.back_s:6.2f} | {self.sent:4d} | "
                f"{self.failed:4d} | {self.failed_window_s:5.2f} | {self.lost:4d} | {self.doubled:4d} |")


HEADER = ("| component              | ready s | back s | sent | failed | failed window s | taps lost | "
          "taps doubled |")
ROWS: list[Row] = []


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    doc = yaml.safe_load(DEMO_SPEC.read_text())
    work = tmp_path_factory.mktemp("faults")
    # No load generator: every request counted here is one the test sent.
    with running_mesh(work, doc, "delta", up_args=("--rps", "0")) as m:
        yield m
    print("\n\nFaults, measured (kill -9 under 20 rps):\n" + HEADER + "\n" + "\n".join(r.line() for r in ROWS))


# --- traffic -----------------------------------------------------------------------------


@dataclass
class Load:
    """Open loop at RPS: a request every 1/RPS s whether or not earlier ones answered."""

    entrypoint: str
    tag: str
    sent: list[tuple[str, float, int]] = field(default_factory=list)  # (path, send time, status; 0: no reply)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="load")
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def prefix(self) -> str:
        return f"/anything/faults/{self.tag}/"

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._pool.shutdown(wait=True)

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self._pool.submit(self._one, time.time())
            next_at += 1 / RPS
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _one(self, at: float) -> None:
        rid = str(uuid.uuid4())
        path = self.prefix + rid
        req = urllib.request.Request(self.entrypoint.rstrip("/") + path, headers={"x-request-id": rid})
        try:
            with urllib.request.urlopen(req, timeout=20, context=tls_context(self.entrypoint)) as resp:
                resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except OSError:
            status = 0
        with self._lock:
            self.sent.append((path, at, status))


# --- what a measurement reads -------------------------------------------------------------


def supervisor(mesh: Mesh) -> dict:
    return json.loads((mesh.data_dir / "supervisor.json").read_text())["workloads"]


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            resp.read()
            return resp.status == 200
    except OSError:
        return False


def tcp_ok(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def stored(mesh: Mesh, prefix: str) -> dict[str, tuple[int, int]]:
    """path -> (rows, distinct event ids) of the entrypoint sidecar's ingress l7 events."""
    rows = mesh.query(
        "SELECT path, count() AS n, uniqExact(event_id) AS ids FROM tap_l7 WHERE sidecar = 'frontend-1' "
        f"AND direction = 'ingress' AND startsWith(path, '{prefix}') GROUP BY path")
    return {r["path"]: (int(r["n"]), int(r["ids"])) for r in rows}


def caught_up(mesh: Mesh) -> bool:
    """Nothing waits in the pipe: no tap service spools, the sink has its partitions and no l7 lag."""
    ports = mesh.ports()
    try:
        spools = [_json(mesh, f"http://127.0.0.1:{ports[k]}/stats")["producer"]["spool_records"]
                  for k in ("taps.http", "taps-2.http") if k in ports]
        lag = mesh.sink_stats()["lag"]
    except (OSError, ValueError, KeyError):
        return False
    return not any(spools) and lag.get("greymesh.tap.l7") == 0


def _json(mesh: Mesh, url: str) -> dict:
    return mesh.api(url, timeout=5)


def stores_again(mesh: Mesh, prefix: str, since: float) -> bool:
    """The store has a tap event of a request sent after ``since``: the whole pipe works."""
    try:
        rows = mesh.query("SELECT count() AS n FROM tap_l7 WHERE sidecar = 'frontend-1' AND direction = 'ingress' "
                          f"AND startsWith(path, '{prefix}') AND time_us > {int(since * 1e6)}")
    except OSError:
        return False
    return int(rows[0]["n"]) > 0


def drained(mesh: Mesh, load: Load) -> dict[str, tuple[int, int]]:
    """The stored events once every sent request has one, or once the pipe has caught up and
    nothing new came for QUIET_S (what is missing then is lost)."""
    deadline = time.monotonic() + DRAIN_S
    last, changed = -1, time.monotonic()
    while True:
        try:
            got = stored(mesh, load.prefix)
        except OSError:  # the sink is not answering yet
            got = {}
        total = sum(n for n, _ in got.values())
        if total != last or not caught_up(mesh):
            last, changed = total, time.monotonic()
        if len(got) >= len(load.sent) or time.monotonic() - changed > QUIET_S or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    time.sleep(2.0)  # a duplicate, if any, would arrive by now
    return stored(mesh, load.prefix)


def measure(mesh: Mesh, name: str, serving: Callable[[float], bool] | None,
            back_within_s: float = BACK_WITHIN_S) -> Row:
    """Kill -9 workload ``name`` under load; serving(t_kill) says whether it serves again.

    Without ``serving`` (a component on every request's path), the load itself tells: it
    serves again from the first request after the last failed one."""
    with Load(mesh.entrypoint, f"{name.replace(':', '-')}-{uuid.uuid4().hex[:8]}") as load:
        time.sleep(BEFORE_KILL_S)
        before = supervisor(mesh)[name]
        assert before["state"] == "ready", f"{name} is not ready before the kill: {before}"
        killed_at = time.time()
        os.killpg(before["pid"], signal.SIGKILL)  # its process group: a launcher and what it started

        def ready() -> bool:
            now = supervisor(mesh)[name]
            return now["state"] == "ready" and now["pid"] != before["pid"] and (now["ready_at"] or 0) > killed_at

        wait_for(ready, GIVE_UP_S, f"{name} ready again", interval=0.05)
        ready_s = supervisor(mesh)[name]["ready_at"] - killed_at
        if serving is not None:
            wait_for(lambda: serving(killed_at), GIVE_UP_S, f"{name} serving again", interval=0.05)
            back_s = time.time() - killed_at
        time.sleep(AFTER_BACK_S)
    got = drained(mesh, load)
    sent = {path for path, _, _ in load.sent}
    failed_at = sorted(at for _, at, status in load.sent if status != 200)
    if serving is None:
        after = [at for _, at, status in load.sent if status == 200 and at > max(failed_at, default=killed_at)]
        back_s = max(ready_s, (min(after) if after else time.time()) - killed_at)
    row = Row(component=name, ready_s=ready_s, back_s=back_s, sent=len(load.sent), failed=len(failed_at),
              failed_window_s=(failed_at[-1] - failed_at[0]) if failed_at else 0.0,
              lost=len(sent - set(got)), doubled=sum(n - ids for n, ids in got.values()),
              stored=sum(n for n, _ in got.values()))
    ROWS.append(row)
    print(f"\n{HEADER}\n{row.line()}  (stored {row.stored} rows; statuses "
          f"{sorted({s for _, _, s in load.sent})})")
    assert row.back_s <= back_within_s, f"{name} back only after {row.back_s:.1f}s"
    assert row.sent >= RPS * (BEFORE_KILL_S + AFTER_BACK_S) * 0.9, "the load did not run at its rate"
    assert row.doubled == 0, f"{row.doubled} tap events stored twice"
    return row


# --- the components ---------------------------------------------------------------------------
# Ordered so that the slowest to come back (the broker) goes last.


def test_controlplane(mesh: Mesh):
    """Sidecars keep their config while the control plane is away and resync on reconnect
    (identical resource versions; only the SVIDs, held in memory, are re-issued)."""
    admin = mesh.ports()["controlplane.admin"]

    def serving(_: float) -> bool:
        try:
            nodes = mesh.api(f"http://127.0.0.1:{admin}/status", timeout=2).get("nodes", {})
        except (OSError, ValueError):
            return False
        return len(nodes) == 5 and all(n.get("connected") and n.get("in_sync") for n in nodes.values())

    # 7 s measured with the test alone on the machine; its start is CPU-bound Python
    # (importing envoy-data-plane's typed messages, translating every snapshot), 10-16 s
    # when other work shares the 2 cores, hence the margin.  Nothing waits for it: the
    # sidecars serve with the config they have.
    row = measure(mesh, "controlplane", serving, back_within_s=20.0)
    assert row.failed == 0 and row.lost == 0


def test_sink(mesh: Mesh):
    """The sink commits offsets only after an insert and deduplicates by event id (its window
    seeded from the store): a kill re-reads what it had not committed, nothing twice.

    Serving means storing again: a tap of a request sent after the kill is in the store.
    The restarted sink gets the killed one's partitions once the group has dropped the
    killed member, when its session expires: 6 s, the least a broker allows by default
    (kafka-python's 45 s made it ~48 s).  The events wait in Kafka meanwhile; none is lost."""
    port = mesh.ports()["sink.http"]

    def serving(killed_at: float) -> bool:
        return http_ok(f"http://127.0.0.1:{port}/healthz") and stores_again(mesh, "/anything/faults/sink-", killed_at)

    row = measure(mesh, "sink", serving)
    assert row.failed == 0 and row.lost == 0


def test_scorer(mesh: Mesh):
    """The scorer keeps no state but its open anomalies; traffic and taps never pass through it."""

    def serving(killed_at: float) -> bool:
        try:
            stats = json.loads((mesh.data_dir / "scorer.json").read_text())
        except (OSError, ValueError):
            return False
        return stats.get("at", 0) > killed_at and stats.get("source_error") is None

    row = measure(mesh, "scorer", serving)
    assert row.failed == 0 and row.lost == 0


def test_tap_collector(mesh: Mesh):
    """Traffic never waits for taps.  The sidecars' access-log cluster lists two tap services
    with an active TCP health check: the killed one's connections close, the check marks it
    unhealthy at once, and the next flush of every logger opens its stream on the other."""
    ports = mesh.ports()
    other_before = _json(mesh, f"http://127.0.0.1:{ports['taps-2.http']}/stats")["collector"]

    def serving(_: float) -> bool:
        return http_ok(f"http://127.0.0.1:{ports['taps.http']}/healthz") and tcp_ok(ports["taps.grpc"])

    row = measure(mesh, "taps", serving)
    other = _json(mesh, f"http://127.0.0.1:{ports['taps-2.http']}/stats")["collector"]
    assert other["streams"] > other_before["streams"], "no stream moved to the other collector"
    assert row.failed == 0
    # What a kill -9 can still lose: batches the dead collector had read but not yet handed
    # to Kafka (ALS has no acks).  At most one 1 s batch of the entrypoint's ingress logger.
    assert row.lost <= RPS * 1.5, f"{row.lost} taps lost"


def test_authz_bridge(mesh: Mesh):
    """Fail closed: until the bridge is back, every inbound check fails and the sidecars deny
    (services may opt into fail_open; the demo's do not).  The failures are bounded by the
    bridge's restart: supervisor backoff 0.5 s + a Python start."""
    row = measure(mesh, "authz", None)
    assert row.lost == 0
    assert row.failed <= RPS * 4, f"{row.failed} requests failed"  # measured ~1.5-2 s of traffic


def test_opa(mesh: Mesh):
    """Fail closed, as for the bridge, until OPA is back with its policy: OPA keeps no policy
    across a restart, the supervisor's on_ready hook pushes the last one before it counts as ready."""
    row = measure(mesh, "opa", None)
    assert row.lost == 0
    assert row.failed <= RPS * 10, f"{row.failed} requests failed"  # measured 99-125 (5-6.2 s of traffic)


def test_app(mesh: Mesh):
    """payments has one v1 instance and takes all traffic on v1: orders' retries (2, on reset and
    connect-failure) go to the same dead port, so requests fail until the app listens again."""
    row = measure(mesh, "app:payments-v1-1", None)
    assert row.lost == 0
    assert row.failed <= RPS * 4, f"{row.failed} requests failed"


def test_envoy(mesh: Mesh):
    """orders' sidecar is on every request's path: frontend's calls to it are refused until the
    new Envoy has its listeners from the control plane."""
    row = measure(mesh, "envoy:orders-1", None)
    assert row.lost == 0  # counted at frontend-1, which stays up; orders-1's own unflushed taps are gone
    assert row.failed <= RPS * 4, f"{row.failed} requests failed"


def test_kafka(mesh: Mesh):
    """While the broker is away the tap service spools to disk and replays in order; the
    idempotent producer and the sink's dedup keep every event once."""
    ports = mesh.ports()

    def serving(killed_at: float) -> bool:
        try:
            producers = [_json(mesh, f"http://127.0.0.1:{ports[k]}/stats")["producer"] for k in ("taps.http", "taps-2.http")]
        except (OSError, ValueError, KeyError):
            return False
        return all(p["broker_up"] and p["spool_records"] == 0 for p in producers) and \
            stores_again(mesh, "/anything/faults/kafka-", killed_at)  # the sink consumes again too

    # Misses the 10 s target (docs/faults.md): ~12 s to ready, ~15 s until the sink stores
    # again, with the test alone on the machine: the JVM and its controller take ~6 s, the
    # broker's registration and log recovery ~4 s, the credentials/ACL check ~1 s (a bare
    # broker restarts in 4-7 s).  45-80 s were measured while other meshes ran.  Nothing
    # is lost meanwhile: the tap services spool and replay.
    row = measure(mesh, "kafka", serving, back_within_s=60.0)
    assert row.failed == 0 and row.lost == 0
