"""Every benchmark still runs: `python tests/benchmarks/bench_X.py --quick` exits 0.

A benchmark's quick mode measures what its full run measures on a small scale, in
seconds, against real components, and exits non-zero when any request or event failed
(non-2xx, timeout, lost or duplicated events, an exception).  Full runs are `make bench`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "tests" / "benchmarks"
VERDICT_OK = "OK: no request or event failed"  # printed by tests/benchmarks/procs.py:verdict

# Every benchmark, with the seconds its quick run may take.  A few seconds to half a minute
# on an idle 2-core machine; the bound leaves room for a machine busy with other work.
QUICK_TIMEOUT_S = {
    "bench_actions.py": 300,
    "bench_ml.py": 300,
    "bench_sidecar_latency.py": 300,
    "bench_taps_pipeline.py": 300,
    "bench_xds_convergence.py": 300,
    "bench_zero_trust_latency.py": 300,
}


def run_quick(name: str, timeout_s: float) -> tuple[int, str]:
    """Run one benchmark's quick mode; its exit status and its output (stdout and stderr)."""
    proc = subprocess.Popen(
        [sys.executable, str(Path("tests") / "benchmarks" / name), "--quick"], cwd=ROOT,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the benchmark's finally blocks stop what it started
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"{name} --quick still ran after {timeout_s} s; its output:\n{_tail(out)}")
    return proc.returncode, out


def _tail(out: str, chars: int = 12_000) -> str:
    return out if len(out) <= chars else f"[... {len(out) - chars} characters before ...]\n{out[-chars:]}"


@pytest.mark.parametrize("name", sorted(QUICK_TIMEOUT_S))
def test_benchmark_quick_mode_passes(name: str) -> None:
    code, out = run_quick(name, QUICK_TIMEOUT_S[name])
    assert code == 0, f"{name} --quick exited {code}; its output:\n{_tail(out)}"
    assert VERDICT_OK in out, f"{name} --quick exited 0 without its verdict; its output:\n{_tail(out)}"


def test_every_benchmark_has_a_quick_test() -> None:
    """A new tests/benchmarks/bench_*.py must join QUICK_TIMEOUT_S (and so get a --quick mode)."""
    found = {p.name for p in BENCHMARKS.glob("bench_*.py")}
    untested = sorted(found - QUICK_TIMEOUT_S.keys())
    gone = sorted(QUICK_TIMEOUT_S.keys() - found)
    assert not untested, f"benchmarks without a test: {untested}; add each to QUICK_TIMEOUT_S in {__file__}"
    assert not gone, f"QUICK_TIMEOUT_S names benchmarks that no longer exist: {gone}"
