"""Child processes for the benchmarks: start with a log each, CPU seconds used, stop in
reverse order; free loopback ports; a one-line description of the machine; the verdict
(every benchmark exits non-zero when any request or event failed)."""

from __future__ import annotations

import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"


class Procs:
    """Child processes, each with a log file; stopped (TERM, then KILL) in reverse start order."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        # If this process dies without running its finally (SIGKILL), the kernel kills the children.
        self._prefix = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with (self.logs / f"{slug(name)}.log").open("wb") as log:
            proc = subprocess.Popen([*self._prefix, *argv], stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, cwd=ROOT)
        self.running[name] = proc
        return proc

    def check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.running.items() if p.poll() is not None}
        if dead:
            raise RuntimeError(f"exited early: {dead}\n" + "\n".join(self.tail(n) for n in dead))

    def tail(self, name: str, lines: int = 15) -> str:
        path = self.logs / f"{slug(name)}.log"
        text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
        return f"--- {name} ({path}) ---\n" + "\n".join(text)

    def cpu_s(self) -> dict[str, float]:
        """User+system CPU seconds each running child has used so far."""
        return {name: cpu_s(p.pid) for name, p in self.running.items()}

    def stop(self, name: str) -> None:
        proc = self.running.pop(name)
        proc.terminate()
        _reap(name, proc)

    def stop_all(self) -> None:
        """TERM to every child first, so they shut down side by side, then reap each."""
        for proc in self.running.values():
            if proc.poll() is None:
                proc.terminate()
        for name, proc in reversed(list(self.running.items())):
            _reap(name, proc)
        self.running.clear()


def _reap(name: str, proc: subprocess.Popen[bytes]) -> None:
    """Wait for a terminated child; KILL it if it does not exit within 5 s."""
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            print(f"warning: {name} (pid {proc.pid}) did not exit after SIGKILL", file=sys.stderr)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15 of stat)


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or platform.machine())
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, timeout=5).stdout.strip()
    try:
        mem_kib = int(next(x for x in Path("/proc/meminfo").read_text().splitlines()
                           if x.startswith("MemTotal")).split()[1])
        mem = f", {mem_kib / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        mem = ""
    return (f"{nproc} cores ({model}){mem}, Linux {platform.release()}, Python {platform.python_version()}, "
            f"load average before the run {os.getloadavg()[0]:.2f}")


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP end the benchmark as Ctrl-C does: its finally blocks stop what it started."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))


def verdict(problems: list[str]) -> int:
    """The exit status of a benchmark: 0 only when nothing failed; every failure printed."""
    if problems:
        print(f"\nFAILED: {len(problems)} problem(s):", file=sys.stderr, flush=True)
        for p in problems:
            print(f"  - {p}", file=sys.stderr, flush=True)
        return 1
    print("\nOK: no request or event failed", flush=True)
    return 0
