"""Latency added by the two sidecars on a request path, against calling the service directly.

Starts the demo mesh (`greymesh up`) with no background load in a temporary data dir,
then sends open-loop traffic at fixed rates to payments v1 along two paths, in the same
run and interleaved round by round so drift on this noisy 2-core machine hits both alike:
  direct:    client -> payments app
  sidecars:  client -> orders' outbound listener (Host: payments) -> payments' inbound
             listener -> payments app   (the path orders' own calls take)

Every request must be answered 200 by payments v1: the run exits 1 and names the failures
(status, timeout, connection error) when any request, warm-up included, is not.

Usage: .venv/bin/python tests/benchmarks/bench_sidecar_latency.py [--rates 200,500] [--seconds 15] [--rounds 2]
       .venv/bin/python tests/benchmarks/bench_sidecar_latency.py --quick   (50 rps, 2 s, 1 round: a smoke run)
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.benchmarks.openloop import run  # noqa: E402
from tests.benchmarks.procs import stop_on_signals, verdict  # noqa: E402
from tests.support.mesh import DEMO_SPEC, Mesh, wait_for  # noqa: E402

HOST = "127.0.0.1"
AUTHORITY, PATH = "payments", "/"  # greymesh/demo/service.py answers / and /anything[/...]; other paths 404
CALLEE = "payments-v1-1"


def payments_answer(port: int) -> str:
    """Empty when GET PATH (Host: payments) on port is answered 200 by payments v1, else what came back."""
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("GET", PATH, headers={"Host": AUTHORITY})
        resp = conn.getresponse()
        status, body = resp.status, resp.read()
    except (OSError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    try:
        instance = json.loads(body).get("instance")
    except (ValueError, AttributeError):
        instance = None
    return "" if status == 200 and instance == CALLEE else f"{status} {body[:300]!r}"


def check_paths(paths: dict[str, int], timeout: float = 30) -> None:
    """Each path answers 200 from payments v1 before anything is measured."""
    for name, port in paths.items():
        last = ""

        def served(port: int = port) -> bool:
            nonlocal last
            last = payments_answer(port)
            return not last

        try:
            wait_for(served, timeout, f"a 200 from {CALLEE} along {name}", 0.2)
        except AssertionError as exc:
            raise RuntimeError(f"{exc}: GET {PATH} on port {port} (Host: {AUTHORITY}) got {last}") from None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="200,500")
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke run: 50 rps, 2 s per path, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.rates, args.seconds, args.rounds = "50", 2.0, 1
    rates = [float(r) for r in args.rates.split(",")]
    stop_on_signals()

    problems: list[str] = []
    results: dict[tuple[str, float], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-sidecar-") as tmp:
        spec = Path(tmp) / "mesh.yaml"
        shutil.copy(DEMO_SPEC, spec)
        mesh = Mesh(Path(tmp) / "data", spec, "delta")
        try:
            t0 = time.monotonic()
            mesh.cli("up", str(spec), "--rps", "0")
            print(f"mesh up in {time.monotonic() - t0:.1f} s", flush=True)
            sidecars = mesh.placement()["sidecars"]
            paths = {
                "direct": sidecars[CALLEE]["app"],
                "sidecars": sidecars["orders-1"]["outbound"],
            }
            check_paths(paths)
            for rnd in range(args.rounds):
                for rate in rates:
                    for name in (["direct", "sidecars"] if rnd % 2 == 0 else ["sidecars", "direct"]):
                        r = asyncio.run(run(HOST, paths[name], authority=AUTHORITY, path=PATH,
                                            rate=rate, seconds=args.seconds))
                        s = r.summary()
                        results.setdefault((name, rate), []).append(s)
                        problems += r.problems(f"round {rnd + 1} {name} at {rate:.0f} rps")
                        print(f"round {rnd + 1} {name:<8} {rate:>5.0f} rps: p50 {s['p50']:.2f} ms  "
                              f"p99 {s['p99']:.2f} ms  max {s['max']:.1f} ms  ok {s['ok']} errors {s['errors']}"
                              + (f" {s['reasons']}" if s["errors"] else ""), flush=True)
        finally:
            down = mesh.cli("down", check=False)
            if down.returncode != 0:
                problems.append(f"greymesh down exited {down.returncode}: {down.stderr.strip()[-500:]}")

    print(f"\n{time.strftime('%Y-%m-%d')} {platform.node()} {platform.processor() or platform.machine()}, "
          f"{subprocess.run(['nproc'], capture_output=True, text=True, check=False).stdout.strip()} cores")
    print("| rate (rps) | path | p50 ms | p90 ms | p99 ms | max ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for rate in rates:
        for name in ("direct", "sidecars"):
            runs = results[(name, rate)]
            med = {k: sorted(x[k] for x in runs)[len(runs) // 2] for k in ("p50", "p90", "p99", "max")}
            errs = sum(x["errors"] for x in runs)
            print(f"| {rate:.0f} | {name} | {med['p50']:.2f} | {med['p90']:.2f} | {med['p99']:.2f} | "
                  f"{med['max']:.1f} | {errs} |")
        d, s = results[("direct", rate)], results[("sidecars", rate)]
        for q in ("p50", "p99"):
            added = [b[q] - a[q] for a, b in zip(d, s)]
            print(f"  added by two sidecars at {rate:.0f} rps, {q}: " + ", ".join(f"{x:.2f} ms" for x in added))
    print(json.dumps({f"{k[0]}@{k[1]:.0f}": v for k, v in results.items()}))
    return verdict(problems)


if __name__ == "__main__":
    sys.exit(main())
