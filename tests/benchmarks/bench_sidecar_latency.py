"""Latency added by the two sidecars on a request path, against calling the service directly.

Starts the demo mesh with no background load in a temporary data dir, then sends
open-loop traffic at fixed rates to payments v1 along two paths, in the same run and
interleaved round by round so drift on this noisy 2-core machine hits both alike:
  direct:    client -> payments app
  sidecars:  client -> orders' outbound listener (Host: payments) -> payments' inbound
             listener -> payments app   (the path orders' own calls take)

Usage: .venv/bin/python tests/benchmarks/bench_sidecar_latency.py [--rates 200,500] [--seconds 15] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
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
from tests.support.mesh import DEMO_SPEC, Mesh  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="200,500")
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "mesh.yaml"
        shutil.copy(DEMO_SPEC, spec)
        mesh = Mesh(Path(tmp) / "data", spec, "delta")
        mesh.cli("up", str(spec), "--rps", "0")
        try:
            sidecars = mesh.placement()["sidecars"]
            paths = {
                "direct": sidecars["payments-v1-1"]["app"],
                "sidecars": sidecars["orders-1"]["outbound"],
            }
            results: dict[tuple[str, float], list[dict]] = {}
            for rnd in range(args.rounds):
                for rate in rates:
                    for name in (["direct", "sidecars"] if rnd % 2 == 0 else ["sidecars", "direct"]):
                        r = asyncio.run(run("127.0.0.1", paths[name], authority="payments", path="/pay",
                                            rate=rate, seconds=args.seconds))
                        s = r.summary()
                        results.setdefault((name, rate), []).append(s)
                        print(f"round {rnd + 1} {name:<8} {rate:>5.0f} rps: p50 {s['p50']:.2f} ms  "
                              f"p99 {s['p99']:.2f} ms  max {s['max']:.1f} ms  ok {s['ok']} errors {s['errors']}",
                              flush=True)
        finally:
            mesh.cli("down", check=False)

    print(f"\n{time.strftime('%Y-%m-%d')} {platform.node()} {platform.processor() or platform.machine()}, "
          f"{subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores")
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


if __name__ == "__main__":
    main()
