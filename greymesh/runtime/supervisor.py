"""The local supervisor: runs a data dir's table of workloads and keeps it running.

One per data dir (``python -m greymesh.runtime.supervisor --data-dir D``, started by
`greymesh up`; a lock file keeps it alone).  It

- starts workloads in dependency order, each once everything in its ``after`` is ready;
- probes each started workload until it is ready (HTTP 200, TCP connect, a Kafka broker),
  then runs its ``on_ready`` command; only then does it count as ready;
- restarts a workload that exits (restart policy ``always``) after a backoff that doubles
  from 0.5 s up to 30 s, and marks it ``crash-loop`` after 5 exits in a row that each
  came within 60 s of their start (it keeps retrying at the cap);
- re-reads the table when ``workloads.json`` changes: new rows start, removed rows stop,
  a row whose argv changed is restarted;
- on SIGTERM stops everything in reverse dependency order and exits.

It writes what runs to ``supervisor.json`` (atomically, on every change): for each
workload its pid, state, restarts, last exit and since when.  `greymesh status` reads it.

A workload runs in a process group of its own, so stopping it stops what it started.
If the supervisor itself is killed, its workloads keep serving; the next supervisor
adopts the ones still alive (same pid, same argv), watching them through /proc.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from core import jsonhttp, kafka
from core.credentials import CredentialError
from core.datadir import PRIVATE_UMASK, DataDir, write_atomic
from greymesh.runtime.workloads import Probe, Table, Workload, start_order

log = logging.getLogger("greymesh.supervisor")

TICK_S = 0.2
PROBE_EVERY_S = 0.5
BACKOFF_FIRST_S = 0.5
BACKOFF_CAP_S = 30.0
STABLE_AFTER_S = 60.0  # an exit this long after the start does not count toward a crash loop
CRASH_LOOP_EXITS = 5
ON_READY_TIMEOUT_S = 120.0
SAVE_EVERY_S = 2.0  # supervisor.json is rewritten at least this often (readers see a live supervisor)
ON_READY_TRIES = 3  # then the workload is marked failed (it keeps running; a restart tries again)

State = Literal["waiting", "starting", "ready", "backoff", "crash-loop", "stopped", "failed"]


@dataclass
class Exit:
    code: int | None  # None: killed by a signal, or not ours to reap (adopted)
    signal: str | None
    at: float
    ran_s: float


@dataclass
class Status:
    """What the supervisor knows of one workload (one row of supervisor.json)."""

    state: State = "waiting"
    pid: int | None = None
    started_at: float | None = None
    ready_at: float | None = None
    restarts: int = 0
    quick_exits: int = 0  # exits in a row within STABLE_AFTER_S of the start
    last_exit: Exit | None = None
    next_start_at: float | None = None  # in backoff: when it is started again
    error: str | None = None  # why it is not ready (probe or on_ready output)

    @classmethod
    def from_json(cls, raw: dict) -> Status:
        last = raw.get("last_exit")
        return cls(**(raw | {"last_exit": Exit(**last) if last else None}))


@dataclass
class SupervisorState:
    pid: int
    started_at: float
    stopping: bool = False
    workloads: dict[str, Status] = field(default_factory=dict)

    @classmethod
    def load(cls, dd: DataDir) -> SupervisorState | None:
        try:
            raw = json.loads(dd.supervisor.read_text())
        except (OSError, ValueError):
            return None
        return cls(pid=raw["pid"], started_at=raw["started_at"], stopping=raw.get("stopping", False),
                   workloads={n: Status.from_json(s) for n, s in raw["workloads"].items()})

    def save(self, dd: DataDir) -> None:
        write_atomic(dd.supervisor, json.dumps(asdict(self), indent=2))


def running_pid(dd: DataDir) -> int | None:
    """The pid of the supervisor that holds this data dir's lock (it writes its pid there); None if none does."""
    try:
        with open(_lock_path(dd), "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                text = fh.read().strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(fh, fcntl.LOCK_UN)
            return None
    except OSError:
        return None


def is_running(dd: DataDir) -> bool:
    return running_pid(dd) is not None


def _lock_path(dd: DataDir) -> Path:
    return dd.root / ".supervisor.lock"


def pid_alive(pid: int, argv: list[str]) -> bool:
    """True if pid is a live (not zombie) process with exactly this argv."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return [c.decode(errors="replace") for c in cmdline] == argv and stat.rsplit(")", 1)[1].split()[0] != "Z"


def probe(p: Probe) -> str | None:
    """None when ready, else why not."""
    if p.kind == "none":
        return None
    if p.kind == "http":
        return None if jsonhttp.http_ok(p.target, timeout_s=1.0) else f"no 200 from {p.target} yet"
    if p.kind == "tcp":
        host, _, port = p.target.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return None
        except OSError as exc:
            return f"{p.target}: {exc.strerror or exc}"
    try:
        return kafka.broker_ready(p.target, timeout_s=2.0,
                                  auth=kafka.KafkaAuth.from_secret(Path(p.secret)) if p.secret else None)
    except CredentialError as exc:  # reported as the reason it is not ready; the supervisor goes on
        return str(exc)


class _Running:
    """One started workload: its process (ours, or adopted by pid) and its readiness work."""

    def __init__(self, workload: Workload, proc: subprocess.Popen | None, pid: int):
        self.workload = workload
        self.proc = proc  # None when adopted from an earlier supervisor
        self.pid = pid
        self.ready = False
        self.next_probe = 0.0
        self.on_ready: threading.Thread | None = None
        self.on_ready_result: str | None | Literal["ok"] = None
        self.on_ready_failures = 0

    def exited(self) -> tuple[int | None, str | None] | None:
        """(exit code, signal name) once it has exited, else None."""
        if self.proc is not None:
            code = self.proc.poll()
            if code is None:
                return None
            return (code, None) if code >= 0 else (None, signal.Signals(-code).name)
        return None if pid_alive(self.pid, list(self.workload.argv)) else (None, None)


class Supervisor:
    def __init__(self, dd: DataDir):
        self.dd = dd
        self.table = Table()
        self.table_mtime = 0.0
        self.running: dict[str, _Running] = {}
        self.state = SupervisorState(pid=os.getpid(), started_at=time.time())
        self._dirty = True
        self._saved_at = 0.0
        self._stop = threading.Event()

    # --- the loop ------------------------------------------------------------------

    def run(self) -> None:
        self._adopt()
        while not self._stop.is_set():
            self._reload()
            self._reap()
            self._start_due()
            self._probe()
            if self._dirty or time.monotonic() - self._saved_at > SAVE_EVERY_S:
                self.state.save(self.dd)
                self._dirty, self._saved_at = False, time.monotonic()
            self._stop.wait(TICK_S)
        self.stop_all()

    def request_stop(self) -> None:
        self._stop.set()

    def _reload(self) -> None:
        try:
            mtime = self.dd.workloads.stat().st_mtime
        except OSError:
            return
        if mtime == self.table_mtime:
            return
        try:
            table = Table.load(self.dd)
            problems = table.problems()
        except (ValueError, KeyError, TypeError) as exc:
            problems = [f"{self.dd.workloads}: unreadable: {exc}"]
        if problems:  # keep running the table we have
            log.error("refused the new workload table; the running one stays:\n%s", "\n".join(problems))
            self.table_mtime = mtime
            return
        self.table, self.table_mtime = table, mtime
        wanted = {w.name: w for w in table.workloads}
        doomed = [n for n, r in self.running.items() if n not in wanted or wanted[n].argv != r.workload.argv]
        by_order = [w.name for w in start_order(r.workload for r in self.running.values())]
        for name in reversed(by_order):
            if name in doomed:
                self._stop_one(name, "removed from the table" if name not in wanted else "its argv changed")
        for name in list(self.state.workloads):
            if name not in wanted:
                del self.state.workloads[name]
        for name, w in wanted.items():
            status = self.state.workloads.setdefault(name, Status())
            if name in self.running:
                self.running[name].workload = w  # same argv: probes, hooks or ports may have changed
            elif status.state == "stopped":
                status.state = "waiting"
        self._dirty = True
        log.info("workload table: %d workloads", len(wanted))

    def _adopt(self) -> None:
        """Take over the live workloads of an earlier supervisor of this data dir."""
        previous = SupervisorState.load(self.dd)
        table = Table.load(self.dd)
        if previous is None:
            return
        for w in table.workloads:
            old = previous.workloads.get(w.name)
            if old and old.pid and pid_alive(old.pid, list(w.argv)):
                self.running[w.name] = run = _Running(w, None, old.pid)
                run.ready = old.state == "ready"
                old.error = None
                self.state.workloads[w.name] = old
                log.info("adopted %s (pid %d) from the previous supervisor", w.name, old.pid)

    # --- starting --------------------------------------------------------------------

    def _ready(self, name: str) -> bool:
        run = self.running.get(name)
        return run is not None and run.ready

    def _start_due(self) -> None:
        now = time.time()
        for w in start_order(self.table.workloads):
            status = self.state.workloads[w.name]
            if w.name in self.running or status.state in ("stopped", "failed"):
                continue
            if status.next_start_at is not None and now < status.next_start_at:
                continue
            if not all(self._ready(d) for d in w.after):
                if status.state != "waiting" and status.pid is None:
                    status.state = "waiting"
                    self._dirty = True
                continue
            self._start(w, status)

    def _start(self, w: Workload, status: Status) -> None:
        self.dd.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.dd.log(w.name)
        env = {**os.environ, **dict(w.env)}
        try:
            with open(log_path, "ab") as out:
                out.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} greymesh supervisor: starting {w.name}\n"
                          .encode())
                out.flush()
                proc = subprocess.Popen(w.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)
        except OSError as exc:  # a missing binary: retrying will not help until it is installed
            status.state, status.error = "failed", f"cannot start {w.argv[0]}: {exc.strerror or exc}"
            log.error("%s: %s", w.name, status.error)
            self._dirty = True
            return
        self.running[w.name] = _Running(w, proc, proc.pid)
        status.state, status.pid = "starting", proc.pid
        status.started_at, status.ready_at, status.next_start_at, status.error = time.time(), None, None, None
        self._dirty = True
        log.info("started %s (pid %d)", w.name, proc.pid)

    # --- readiness -------------------------------------------------------------------

    def _probe(self) -> None:
        now = time.monotonic()
        for name, run in list(self.running.items()):
            status = self.state.workloads[name]
            if run.ready or status.state == "failed":
                continue
            if run.on_ready is not None:
                if run.on_ready.is_alive():
                    continue
                result, run.on_ready = run.on_ready_result, None
                if result == "ok":
                    self._mark_ready(run, status)
                else:  # the hook failed: try it again at the next probe, a few times
                    run.on_ready_failures += 1
                    status.error = f"on_ready {' '.join(run.workload.on_ready[:3])} ... failed: {result}"
                    if run.on_ready_failures >= ON_READY_TRIES:
                        status.state = "failed"
                        log.error("%s: %s; giving up on it", name, status.error)
                    self._dirty = True
                continue
            if now < run.next_probe:
                continue
            run.next_probe = now + PROBE_EVERY_S
            why_not = probe(run.workload.ready)
            if why_not is not None:
                if status.error != why_not:
                    status.error = why_not
                    self._dirty = True
                continue
            if run.workload.on_ready:
                run.on_ready = threading.Thread(target=self._on_ready, args=(run,), daemon=True)
                run.on_ready.start()
            else:
                self._mark_ready(run, status)

    def _on_ready(self, run: _Running) -> None:
        try:
            with open(self.dd.log(run.workload.name), "ab") as out:
                proc = subprocess.run(run.workload.on_ready, stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.STDOUT, timeout=ON_READY_TIMEOUT_S)
            run.on_ready_result = "ok" if proc.returncode == 0 else f"exit {proc.returncode} (see its log)"
        except (OSError, subprocess.TimeoutExpired) as exc:
            run.on_ready_result = str(exc)

    def _mark_ready(self, run: _Running, status: Status) -> None:
        run.ready = True
        status.state, status.ready_at, status.error = "ready", time.time(), None
        self._dirty = True
        log.info("%s is ready", run.workload.name)

    # --- exits and restarts -------------------------------------------------------------

    def _reap(self) -> None:
        now = time.time()
        for name, run in list(self.running.items()):
            exited = run.exited()
            if exited is None:
                continue
            del self.running[name]
            status = self.state.workloads.get(name)
            if status is None:
                continue
            code, sig = exited
            ran = now - (status.started_at or now)
            status.last_exit = Exit(code=code, signal=sig, at=now, ran_s=round(ran, 3))
            status.pid, status.ready_at = None, None
            status.quick_exits = status.quick_exits + 1 if ran < STABLE_AFTER_S else 1
            if run.workload.restart == "never":
                status.state = "stopped"
            else:
                backoff = min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2 ** (status.quick_exits - 1))
                status.restarts += 1
                status.next_start_at = now + backoff
                status.state = "crash-loop" if status.quick_exits >= CRASH_LOOP_EXITS else "backoff"
            self._dirty = True
            how = f"exit code {code}" if code is not None else (f"signal {sig}" if sig else "it is gone")
            log.warning("%s exited (%s) after %.1f s; %s", name, how, ran,
                        "not restarted (restart: never)" if status.state == "stopped"
                        else f"restarting in {status.next_start_at - now:.1f} s ({status.state})")

    # --- stopping ----------------------------------------------------------------------

    def _stop_one(self, name: str, why: str) -> None:
        run = self.running.pop(name)
        log.info("stopping %s (%s)", name, why)
        terminate(run.pid, list(run.workload.argv), run.workload.stop_grace_s, run.proc)
        status = self.state.workloads.get(name)
        if status is not None:
            status.state, status.pid, status.ready_at = "stopped", None, None
        self._dirty = True

    def stop_all(self) -> None:
        """Everything, dependents first (traffic before the control plane, the pipe last)."""
        self.state.stopping = True
        self.state.save(self.dd)
        order = [w.name for w in start_order(r.workload for r in self.running.values())]
        for name in reversed(order):
            self._stop_one(name, "the supervisor stops")
            self.state.save(self.dd)
        self.state.save(self.dd)


def terminate(pid: int, argv: list[str], grace_s: float, proc: subprocess.Popen | None = None) -> None:
    """SIGTERM the process group, SIGKILL it after grace_s; reap it if it is our child."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if (proc.poll() is not None) if proc is not None else not pid_alive(pid, argv):
            break
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m greymesh.runtime.supervisor",
                                description="Run a data dir's workload table and keep it running.")
    p.add_argument("--data-dir", type=Path, required=True)
    args = p.parse_args(argv)
    os.umask(PRIVATE_UMASK)  # every workload inherits it: logs, Kafka's data, the store, keys
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # the broker probe's client: a line per connection
    dd = DataDir(args.data_dir)
    with open(_lock_path(dd), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.error("another supervisor already runs %s", dd.root)
            return 1
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        supervisor = Supervisor(dd)
        signal.signal(signal.SIGTERM, lambda *_: supervisor.request_stop())
        signal.signal(signal.SIGINT, lambda *_: supervisor.request_stop())
        log.info("supervising %s (pid %d)", dd.root, os.getpid())
        supervisor.run()
        log.info("stopped everything; bye")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
