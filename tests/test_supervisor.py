"""The supervisor on small real processes: order, readiness, restarts, crash loops, table
changes, adoption after its own death, and a stop that leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.datadir import DataDir
from greymesh.runtime import supervisor as sup
from greymesh.runtime.workloads import Probe, Table, Workload
from tests.support.mesh import wait_for

SERVE = ("import http.server, sys; http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), "
         "http.server.SimpleHTTPRequestHandler).serve_forever()")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sleeper(name: str, after: tuple[str, ...] = (), seconds: int = 600) -> Workload:
    return Workload(name, (sys.executable, "-c", f"import time; time.sleep({seconds})  # {name}"), "mesh", after=after)


def _server(name: str, port: int) -> Workload:
    return Workload(name, (sys.executable, "-c", SERVE, str(port)), "infrastructure",
                    ready=Probe("http", f"http://127.0.0.1:{port}/"), ports=(f"{name}.http",))


class Supervised:
    def __init__(self, root: Path):
        self.dd = DataDir(root).create()
        self.proc: subprocess.Popen | None = None

    def table(self, *workloads: Workload) -> None:
        Table(list(workloads)).save(self.dd)

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "greymesh.runtime.supervisor", "--data-dir",
                                      str(self.dd.root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_for(lambda: sup.is_running(self.dd), 10, "the supervisor to take its lock")

    def status(self, name: str) -> sup.Status | None:
        state = sup.SupervisorState.load(self.dd)
        return state.workloads.get(name) if state else None

    def state_of(self, name: str) -> str | None:
        s = self.status(name)
        return s.state if s else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[Supervised]:
    s = Supervised(tmp_path / "data")
    try:
        yield s
    finally:
        s.stop()
        for pid in _pids_naming(str(tmp_path)):
            os.kill(pid, signal.SIGKILL)


def _pids_naming(text: str) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text.encode() in (proc / "cmdline").read_bytes():
                    out.append(int(proc.name))
            except OSError:
                pass
    return out


def test_dependencies_start_after_readiness_and_a_killed_workload_comes_back(supervised: Supervised):
    port = _free_port()
    supervised.table(_server("web", port), _sleeper("worker", after=("web",)))
    supervised.start()
    wait_for(lambda: supervised.state_of("worker") == "ready", 15, "both workloads ready")
    web, worker = supervised.status("web"), supervised.status("worker")
    assert web.ready_at <= worker.started_at  # the dependent started only once web answered

    os.kill(web.pid, signal.SIGKILL)
    killed = time.time()
    wait_for(lambda: (s := supervised.status("web")) and s.restarts == 1 and s.state == "ready", 10,
             "web to be restarted and ready again")
    back = supervised.status("web")
    assert back.pid != web.pid
    assert back.last_exit.signal == "SIGKILL" and back.last_exit.code is None
    assert back.ready_at - killed < 5.0
    assert supervised.status("worker").pid == worker.pid  # nothing else restarted


def test_a_workload_that_keeps_failing_backs_off_and_is_marked_a_crash_loop(supervised: Supervised):
    failing = Workload("flaky", (sys.executable, "-c", "import sys; sys.exit(3)"), "mesh")
    supervised.table(failing)
    supervised.start()
    wait_for(lambda: supervised.state_of("flaky") == "crash-loop", 20, "flaky to be marked a crash loop")
    s = supervised.status("flaky")
    assert s.restarts >= sup.CRASH_LOOP_EXITS and s.last_exit.code == 3
    # Backoff doubles: the fifth exit waits 0.5 * 2**4 = 8 s (capped at 30).
    assert 7.0 <= s.next_start_at - s.last_exit.at <= 8.5
    log = supervised.dd.log("flaky").read_text()
    assert log.count("greymesh supervisor: starting flaky") == s.restarts


def test_the_table_is_followed_as_it_changes_and_a_broken_one_is_refused(supervised: Supervised):
    one, two = _sleeper("one"), _sleeper("two")
    supervised.table(one, two)
    supervised.start()
    wait_for(lambda: supervised.state_of("two") == "ready", 10, "both running")
    pid_one, pid_two = supervised.status("one").pid, supervised.status("two").pid

    time.sleep(0.05)  # a new mtime
    changed_two = Workload("two", (*two.argv[:-1], two.argv[-1] + " "), "mesh")
    supervised.table(one, changed_two, _sleeper("three"))
    wait_for(lambda: supervised.state_of("three") == "ready" and supervised.status("two").pid not in (None, pid_two),
             10, "three started and two restarted with its new argv")
    assert supervised.status("one").pid == pid_one

    time.sleep(0.05)
    circular = [Workload("one", one.argv, "mesh", after=("three",)), Workload("three", one.argv, "mesh", after=("one",))]
    supervised.table(*circular)
    time.sleep(1.0)
    assert supervised.status("one").pid == pid_one and supervised.state_of("three") == "ready"  # refused: unchanged

    time.sleep(0.05)
    supervised.table(one)
    wait_for(lambda: supervised.status("three") is None and supervised.status("two") is None, 15,
             "two and three stopped and gone from the state")
    assert not sup.pid_alive(pid_two, list(two.argv))


def test_a_new_supervisor_adopts_the_workloads_of_a_killed_one_and_stop_leaves_nothing(supervised: Supervised,
                                                                                       tmp_path: Path):
    port = _free_port()
    supervised.table(_server("web", port), _sleeper("worker", after=("web",)))
    supervised.start()
    wait_for(lambda: supervised.state_of("worker") == "ready", 15, "both ready")
    pids = {n: supervised.status(n).pid for n in ("web", "worker")}

    supervised.proc.send_signal(signal.SIGKILL)
    supervised.proc.wait(timeout=10)
    assert all(sup.pid_alive(pid, json.loads(supervised.dd.workloads.read_text())["workloads"][i]["argv"])
               for i, pid in enumerate(pids.values()))  # the workloads outlive their supervisor

    supervised.start()
    time.sleep(1.0)
    assert {n: supervised.status(n).pid for n in pids} == pids  # adopted, not restarted
    assert all(supervised.status(n).restarts == 0 for n in pids)

    supervised.stop()
    assert not sup.is_running(supervised.dd)
    assert _pids_naming(str(tmp_path)) == []
    assert all(s.state == "stopped" for s in sup.SupervisorState.load(supervised.dd).workloads.values())
