"""Benchmark: the anomaly detector's training cost, scoring cost and accuracy.

    .venv/bin/python tests/benchmarks/bench_ml.py [--services 20] [--hours 24] [--score-services 1000]
    .venv/bin/python tests/benchmarks/bench_ml.py --quick   (2 services x 1 h, 20 scored services,
        small training budgets, PyTorch on one thread: a smoke run whose numbers say nothing
        about the detectors)

1. Training: a day of 10 s windows (8,640) for 20 services, per detector, each in a
   child process so that its peak memory (ru_maxrss) is its own.  The windows are the
   recording's normal windows (tests/data/scenarios/) resampled per service with a
   diurnal swing, so their shape is the real demo mesh's.
2. Scoring: one round of the scorer (``Scorer.step``) over 1,000 services, each with its
   model, for the newest window plus its context, from memory (the store's read is
   measured apart in the audit benchmarks); p50/p99 over ``--rounds`` rounds.
3. Accuracy: the evaluation table (ml/eval.py) of every detector on the recording.

It prints Markdown to paste into docs/benchmarks-ml.md.  A service left without a model,
a model the scorer refuses, a scorer round that does not score every service, or a failed
evaluation fails the run (exit 1, each named).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from core.contracts import ROLLUP_FIELDS, WINDOW_SECONDS  # noqa: E402
from ml import eval as ml_eval  # noqa: E402
from ml.detectors import DETECTORS  # noqa: E402
from ml.features import ServiceSeries, series_by_service  # noqa: E402
from ml.model import MeshModel, ServiceModel, train  # noqa: E402
from ml.registry import Registry  # noqa: E402
from ml.scorer import Scorer  # noqa: E402
from ml.windows import Window  # noqa: E402
from tests.benchmarks.procs import machine, stop_on_signals, verdict  # noqa: E402

RECORDING = Path(__file__).resolve().parents[1] / "data" / "scenarios" / "recording.csv"
T0 = 1_795_000_000
# --quick: the same steps on a small budget (a handful of GRU updates, a small forest).
QUICK_PARAMS: dict[str, dict[str, Any]] = {"gru_ae": {"epochs": 1, "max_steps": 8}, "iforest": {"n_estimators": 20}}


def normal_rows(recording: Path) -> dict[str, np.ndarray]:
    """The recording's training windows, per service, as roll-up value arrays."""
    windows, meta = ml_eval.read_recording(recording)
    out: dict[str, list[list[float]]] = {}
    for w in windows:
        if meta[(w.service, w.window)][2] == "train":
            out.setdefault(w.service, []).append([w.values[k] for k in ROLLUP_FIELDS])
    return {k: np.array(v) for k, v in out.items()}


def synthetic_day(recording: Path, services: int, hours: float, seed: int = 0) -> dict[str, ServiceSeries]:
    base = list(normal_rows(recording).values())
    rng = np.random.default_rng(seed)
    n = int(hours * 3600 / WINDOW_SECONDS)
    counts = [ROLLUP_FIELDS.index(k) for k in ("requests", "errors_4xx", "errors_5xx", "resets", "bytes_in",
                                               "bytes_out", "authz_denials")]
    rows: list[Window] = []
    for s in range(services):
        pool = base[s % len(base)]
        picks = pool[rng.integers(0, len(pool), n)]
        swing = 1 + 0.5 * np.sin(2 * np.pi * np.arange(n) / (86400 / WINDOW_SECONDS) + s)
        picks[:, counts] *= swing[:, None]
        rows += [Window(f"svc-{s:04d}", T0 + i * WINDOW_SECONDS, dict(zip(ROLLUP_FIELDS, v))) for i, v in
                 enumerate(picks.tolist())]
    return series_by_service(rows)


def train_child(recording: Path, detector: str, services: int, hours: float, params: dict[str, Any]) -> None:
    """Runs in a child: train, print one JSON line with the time, the peak memory and the
    services left without a model (and why)."""
    series = synthetic_day(recording, services, hours)
    started = time.perf_counter()
    model = train(series, detector, params, since=T0, until=T0 + int(hours * 3600), progress=lambda _: None)
    took = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"detector": detector, "seconds": took, "peak_mib": peak_kib / 1024,
                      "services": len(model.services), "skipped": model.skipped,
                      "windows": int(sum(len(s.raw) for s in series.values()))}))


class MemorySource:
    """service_windows from memory, indexed by window, so the round measures scoring only."""

    def __init__(self, rows: list[Window]):
        self.by_window: dict[int, list[Window]] = {}
        for w in rows:
            self.by_window.setdefault(w.window, []).append(w)

    def fetch(self, since: int, until: int, services: list[str] | None = None) -> list[Window]:
        return [w for t in range(since, until, WINDOW_SECONDS) for w in self.by_window.get(t, [])]


def scoring(recording: Path, detector: str, services: int, rounds: int, work: Path,
            params: dict[str, Any] | None = None) -> dict[str, float]:
    """Median and p99 seconds of one scorer round over ``services`` services (one model
    trained, then stored under every service's name: the cost of scoring is the same).
    Raises RuntimeError when the scorer refuses the model or a round misses a service."""
    day = synthetic_day(recording, 1, 2)
    trained = train(day, detector, params, since=T0, until=T0 + 7200, progress=lambda _: None)
    if "svc-0000" not in trained.services:
        raise RuntimeError(f"no model to score with: {trained.skipped}")
    one = trained.services["svc-0000"]
    names = [f"svc-{i:04d}" for i in range(services)]
    Registry(work / detector).save(MeshModel(detector, {}, T0, T0 + 7200,
                                             {n: ServiceModel(n, one.normaliser, one.detector) for n in names}))
    rollups = next(iter(normal_rows(recording).values()))  # normal windows: a round opens no anomaly
    start = T0 + 7200
    source = MemorySource([Window(n, start + r * WINDOW_SECONDS, dict(zip(ROLLUP_FIELDS, rollups[r % len(rollups)])))
                           for r in range(rounds + 9) for n in names])
    scorer = Scorer(source, Registry(work / detector), lambda events: None, lateness_s=0)
    scorer.step(now=start + 8 * WINDOW_SECONDS)  # loads the model, scores the first windows
    if scorer.stats.model_version is None or scorer.stats.model_error:
        raise RuntimeError(f"the scorer did not load the model: {scorer.stats.model_error}")
    times, events = [], 0
    for r in range(rounds):
        scored = scorer.stats.windows_scored
        t = time.perf_counter()
        events += len(scorer.step(now=start + (9 + r) * WINDOW_SECONDS))
        times.append(time.perf_counter() - t)
        if scorer.stats.source_error or scorer.stats.windows_scored - scored != services:
            raise RuntimeError(f"round {r + 1} scored {scorer.stats.windows_scored - scored} windows of {services} "
                               f"services{'; ' + scorer.stats.source_error if scorer.stats.source_error else ''}")
    return {"p50": float(np.median(times)), "p99": float(np.quantile(times, 0.99)),
            "per_service_ms": float(np.median(times)) / services * 1000, "events": events}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--services", type=int, default=20)
    p.add_argument("--hours", type=float, default=24)
    p.add_argument("--score-services", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--detectors", default=",".join(DETECTORS))
    p.add_argument("--recording", type=Path, default=RECORDING)
    p.add_argument("--params", type=json.loads, default={},
                   help='detector parameters by detector, JSON: {"gru_ae": {"max_steps": 100}}')
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 services x 1 h, 20 scored services, 3 rounds, small training budgets")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.services, args.hours, args.score_services, args.rounds = 2, 1.0, 20, 3
        args.params = {**QUICK_PARAMS, **args.params}
        # PyTorch on one thread unless told otherwise (read when torch is first imported, here
        # and in the children): on 2 busy cores its default threads spin, twice the time of one.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.child:
        train_child(args.recording, args.child, args.services, args.hours, args.params.get(args.child, {}))
        return 0
    detectors = ml_eval.detectors(args.detectors)
    stop_on_signals()
    problems: list[str] = []
    print(f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Machine: {machine()}."
          + (f" Detector parameters: {json.dumps(args.params)}." if args.params else "") + "\n", flush=True)

    started = time.monotonic()
    print(f"## Training: {args.hours:g} h of 10 s windows for {args.services} services\n")
    print("| detector | windows | seconds | s per service | peak memory (MiB) |\n|---|---:|---:|---:|---:|", flush=True)
    for d in detectors:
        out = subprocess.run([sys.executable, __file__, "--child", d, "--services", str(args.services),
                              "--hours", str(args.hours), "--recording", str(args.recording),
                              "--params", json.dumps(args.params)],
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            problems.append(f"training {d} exited {out.returncode}:\n{out.stderr.strip()[-2000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        if r["skipped"] or r["services"] != args.services:
            problems.append(f"training {d}: {r['services']} of {args.services} services got a model; "
                            f"skipped: {r['skipped']}")
        print(f"| {d} | {r['windows']:,} | {r['seconds']:.1f} | {r['seconds'] / max(1, r['services']):.2f} | "
              f"{r['peak_mib']:.0f} |", flush=True)

    print(f"\n## Scoring: one round (the newest window of each service) over {args.score_services} services\n")
    print("| detector | p50 (s) | p99 (s) | per service (ms) |\n|---|---:|---:|---:|", flush=True)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for d in detectors:
            try:
                r = scoring(args.recording, d, args.score_services, args.rounds, Path(tmp), args.params.get(d))
            except Exception as exc:  # noqa: BLE001 (reported, and the run fails)
                problems.append(f"scoring {d}: {type(exc).__name__}: {exc}")
                continue
            print(f"| {d} | {r['p50']:.3f} | {r['p99']:.3f} | {r['per_service_ms']:.3f} |", flush=True)

    print(f"\n({time.monotonic() - started:.0f} s so far)", flush=True)
    print("\n## Accuracy on the scenario recording\n")
    data = ml_eval.load_recording(args.recording)
    results = {}
    for d in detectors:
        try:
            results[d] = ml_eval.evaluate(d, data, args.params.get(d), progress=lambda _: None)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"evaluating {d}: {type(exc).__name__}: {exc}")
    if results:
        print("```\n" + ml_eval.table(results) + "```", flush=True)
    print(f"\n({time.monotonic() - started:.0f} s in all)", flush=True)
    return verdict(problems)


if __name__ == "__main__":
    sys.exit(main())
