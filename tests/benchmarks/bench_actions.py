"""Benchmark: what the actions stage costs per round, and how long a decided move takes to
reach the sidecars.

    .venv/bin/python tests/benchmarks/bench_actions.py [--services 1000] [--rounds 20] [--callers 20] [--moves 20]
    .venv/bin/python tests/benchmarks/bench_actions.py --quick   (50 services, 3 rounds, 3 callers, 3 moves)

1. The loop in process (actions/loop.py + actions/alerts.py on a WAL SQLite file, as the
   process runs them): ``--services`` services, each split v1/v2, every one anomalous at
   once, its v2 slower.  The first round is what `actions.service` does with them: each
   anomaly to the loop and the notifier, ``Loop.tick`` (one judgement per service on
   2 x 300 requests, one move each), ``Notifier.tick``, commit.  Then ``--rounds`` rounds a
   second apart inside the hold-down, where nothing moves: within a window the loop only
   looks (each service is judged once per window); the first round of a window judges every
   anomalous service again.  The overrides API and the samples are in memory here: the
   store's query and the control plane are measured apart (the store in the audit
   benchmarks, the control plane in part 2).
2. A move to the sidecars: the stage's own client (actions/controlplane.py) PUTs an
   override with ``?wait=1`` to a real control plane (its daemon's code, in process) for a
   service with ``--callers`` caller sidecars connected over ADS (simulated Envoys that
   ACK as Envoy does); from the PUT until every caller ACKed, ``--moves`` times.

It prints Markdown to paste into docs/benchmarks.md.  A round that takes no decision for
an anomalous service, a move refused or not ACKed, fails the run (exit 1, each named).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from actions.alerts import Notifier  # noqa: E402
from actions.controlplane import ControlPlaneOverrides, OverrideError  # noqa: E402
from actions.loop import Loop, LoopHealth  # noqa: E402
from actions.model import Alert  # noqa: E402
from actions.samples import SubsetSample  # noqa: E402
from actions.scaling import ScaleError  # noqa: E402
from actions.service import handle  # noqa: E402
from core.contracts import WINDOW_SECONDS, ActionDecision, AnomalyEvent, Override, ServiceRouting  # noqa: E402
from core.loopspec import ActionsSpec, AlertRoute, AlertsSpec, Receiver, SecretRef, SlackReceiver  # noqa: E402
from tests.benchmarks.procs import machine, stop_on_signals, verdict  # noqa: E402
from tests.support.controlplane import ACTIONS_TOKEN_FILE, admin_plane, prepare  # noqa: E402

T0 = 1_795_000_000.0
HEALTHY = LoopHealth(store_ok=True, scorer_ok=True, kafka_ok=True)


class MemoryOverrides:
    """Every service split v1/v2 50/50, overrides kept in a dict."""

    def __init__(self, services: list[str]):
        self.services = services
        self.overrides: dict[str, Override] = {}

    def routing(self) -> list[ServiceRouting]:
        out = []
        for s in self.services:
            o = self.overrides.get(s)
            effective = tuple(o.weights) if o else (("v1", 50), ("v2", 50))
            out.append(ServiceRouting(service=s, subsets=("v1", "v2"), instances=(("v1", 1), ("v2", 1)),
                                      callers=("orders",), declared=(("v1", 50), ("v2", 50)), effective=effective,
                                      override=o))
        return out

    def put(self, override: Override) -> None:
        self.overrides[override.service] = override

    def clear(self, service: str) -> None:
        self.overrides.pop(service, None)


class SlowV2:
    """300 requests per subset per judged range; v2's median three times v1's."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.v1 = rng.lognormal(np.log(20.0), 0.3, 300)
        self.v2 = rng.lognormal(np.log(60.0), 0.3, 300)

    def samples(self, service: str, subsets: list[str], start_s: int, end_s: int) -> list[SubsetSample]:
        return [SubsetSample(s, self.v2 if s == "v2" else self.v1, 300, 0) for s in subsets]


class NoScaler:
    def instances(self, service: str) -> int:
        return 1

    def scale(self, service: str, count: int) -> None:
        raise ScaleError("this benchmark does not scale")


def anomaly(service: str, window: int) -> AnomalyEvent:
    return AnomalyEvent(v=1, event_id=f"{service}-open", time_us=window * 1_000_000, service=service,
                        anomaly_id=f"a-{service}", state="open", window=window, score=5.0, threshold=1.5,
                        peak_score=5.0, windows=2, explanation=f"{service} p95 latency 3x its normal",
                        causes=json.dumps([{"feature": "latency_p95_ms", "share": 0.9, "value": 60, "normal": 20}]),
                        detector="pca", model_version="v1")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def bench_loop(n: int, rounds: int, problems: list[str]) -> dict[str, float]:
    services = [f"svc-{i:04d}" for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(Path(tmp) / "state.db")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        decisions: list[ActionDecision] = []
        alerts_spec = AlertsSpec(receivers=(Receiver("chat", slack=SlackReceiver(SecretRef(env="UNUSED"))),),
                                 routes=(AlertRoute(receivers=("chat",)),), group_wait_s=0.0)
        notifier = Notifier(db, alerts_spec)
        overrides = MemoryOverrides(services)

        def alert(a: Alert) -> None:
            notifier.fire(a, a.at)

        # A hold-down longer than the rounds: after the first round's moves, every round looks at
        # every service and moves none (a bench of the steady state, not of a second step).
        loop = Loop(db, ActionsSpec(mode="on", budget_per_mesh_hour=100_000, budget_per_service_hour=100,
                                    hold_down_s=3600.0),
                    SlowV2(), overrides, NoScaler(), decisions.append, alert, notifier.inhibit)
        db.commit()
        window = int(T0) // WINDOW_SECONDS * WINDOW_SECONDS
        now = window + 1.0
        started = time.perf_counter()
        for s in services:
            handle(anomaly(s, window), loop, notifier, now)
        db.commit()
        loop.tick(now, HEALTHY)
        notifier.tick(now)
        db.commit()
        first = time.perf_counter() - started
        first_decisions = len(decisions)
        moved = [d for d in decisions if d.action == "shift_weight" and d.outcome == "acted"]
        if len(moved) != n:
            problems.append(f"the first round moved {len(moved)} of {n} anomalous services")
        within: list[float] = []  # rounds inside a window: each service was judged in it already
        turning: list[float] = []  # the first round of a window: every anomalous service judged again
        for _ in range(rounds):
            turns = int(now + 1.0) // WINDOW_SECONDS != int(now) // WINDOW_SECONDS
            now += 1.0  # in the hold-down: nothing moves
            t = time.perf_counter()
            loop.tick(now, HEALTHY)
            notifier.tick(now)
            db.commit()
            (turning if turns else within).append(time.perf_counter() - t)
        extra = [d for d in decisions[first_decisions:] if d.outcome == "acted"]
        if extra:
            problems.append(f"{len(extra)} moves inside the hold-down")
        db.close()
    return {"first_s": first, "decisions_per_s": first_decisions / first if first else 0.0,
            "decisions": first_decisions, "within_p50": percentile(within, 50), "within_p99": percentile(within, 99),
            "turning_max": max(turning, default=float("nan"))}


async def bench_moves(callers: int, moves: int, problems: list[str]) -> list[float]:
    names = [f"orders-{i}" for i in range(1, callers + 1)]
    instances = "\n".join(f"      - name: {n}" for n in names)
    spec = f"""\
version: 1
mesh: bench
entrypoint: orders
services:
  orders:
    calls: [payments]
    instances:
{instances}
  payments:
    instances:
      - {{name: payments-v1-1, subset: v1}}
      - {{name: payments-v2-1, subset: v2}}
    routes:
      - {{name: default, match: {{prefix: /}}, split: {{v1: 50, v2: 50}}}}
"""
    took: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        dd = prepare(Path(tmp) / "dd", spec)
        async with admin_plane(dd) as plane:
            envoys = [plane.envoy(n, "orders") for n in names]
            for e in envoys:
                await e.__aenter__()
            try:
                client = ControlPlaneOverrides(plane.url, dd.secret(ACTIONS_TOKEN_FILE))
                for i in range(moves):
                    v2 = 25 if i % 2 == 0 else 0
                    override = Override(service="payments", id=f"bench-{i}", reason="benchmark",
                                        weights=(("v1", 100 - v2), ("v2", v2)))
                    t = time.perf_counter()
                    try:
                        await asyncio.to_thread(client.put, override)
                    except OverrideError as exc:
                        problems.append(f"move {i}: {exc}")
                        continue
                    took.append(time.perf_counter() - t)
            finally:
                for e in envoys:
                    await e.__aexit__(None, None, None)
    return took


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--services", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--callers", type=int, default=20)
    p.add_argument("--moves", type=int, default=20)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.services, args.rounds, args.callers, args.moves = 50, 3, 3, 3
    stop_on_signals()
    problems: list[str] = []
    print(f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Machine: {machine()}.\n", flush=True)

    print(f"## The loop: {args.services} services anomalous at once\n", flush=True)
    r = bench_loop(args.services, args.rounds, problems)
    print("| first round (s) | its decisions | decisions/s | round within a window p50 / p99 (ms) "
          "| first round of a window, max (s) |\n|---:|---:|---:|---:|---:|")
    print(f"| {r['first_s']:.2f} | {r['decisions']} | {r['decisions_per_s']:.0f} | {r['within_p50'] * 1e3:.1f} / "
          f"{r['within_p99'] * 1e3:.1f} | {r['turning_max']:.2f} |", flush=True)

    print(f"\n## A move to the sidecars: PUT /overrides?wait=1 until {args.callers} caller sidecars ACKed\n",
          flush=True)
    took = asyncio.run(bench_moves(args.callers, args.moves, problems))
    if took:
        print("| moves | p50 (ms) | p99 (ms) | max (ms) |\n|---:|---:|---:|---:|")
        print(f"| {len(took)} | {percentile(took, 50) * 1e3:.1f} | {percentile(took, 99) * 1e3:.1f} | "
              f"{max(took) * 1e3:.1f} |", flush=True)
    return verdict(problems)


if __name__ == "__main__":
    sys.exit(main())
