"""`greymesh ml train|score|anomalies|models|rollback|eval|record`: the anomaly detector (ml/).

``train`` reads the running mesh's roll-ups (through the sink's ``/query``) and stores a
new model version; ``score`` runs the scorer in the foreground (``greymesh up`` already
runs one); ``anomalies`` lists what the scorer raised; ``models`` and ``rollback`` manage
the registry; ``eval`` prints the evaluation table for a scenario recording or a pair of
labeled CSV files; ``record`` runs the fault scenarios on a mesh of its own.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.datadir import DataDir
from core.endpoints import Endpoints
from core.errors import GreymeshError, InputError
from core.kafka import SCORER, mesh_auth
from greymesh import scenarios
from ml import eval as ml_eval
from ml import scorer
from ml.detectors import DEFAULT_DETECTOR, DETECTORS
from ml.model import TrainingError, train_from
from ml.registry import ModelError, Registry
from core.contracts import WINDOW_SECONDS
from core.storeclient import StoreClient, sql_string
from ml.windows import SinkWindows, closed_until


def registry_of(data_dir: Path) -> Registry:
    return Registry(DataDir(data_dir).models)


def _sink_windows(data_dir: Path) -> SinkWindows:
    return SinkWindows(StoreClient.of_mesh(DataDir(data_dir)))


def _when(text: str) -> int:
    """A time as Unix seconds: an ISO date-time (UTC unless it says), or an age: 2h, 30m, 1d, 0s."""
    text = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units:
        try:
            return int(time.time() - float(text.lstrip("-")[:-1]) * units[text[-1]])
        except ValueError:
            pass
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give an ISO time (2026-11-29T10:00) or an age (2h, 30m, 1d)") \
            from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return int(parsed.timestamp())


def register(sub: Any, data_dir: Callable[[argparse.ArgumentParser], None]) -> None:
    ml = sub.add_parser("ml", help="anomaly detection: train, score, list anomalies, evaluate",
                        description="The anomaly detector (see docs/ARCHITECTURE.md, 'Anomaly detection').")
    msub = ml.add_subparsers(required=True, metavar="ACTION")

    sp = msub.add_parser("train", help="train per-service models from the store's roll-ups; becomes current")
    sp.add_argument("--since", type=_when, default="24h",
                    help="start of the training range: an ISO time or an age (default: 24h ago)")
    sp.add_argument("--until", type=_when, default="0s", help="end of the training range (default: now)")
    sp.add_argument("--detector", choices=list(DETECTORS), default=DEFAULT_DETECTOR)
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(func=_train)
    data_dir(sp)

    sp = msub.add_parser("score", help="score new windows as they land (what `greymesh up` runs); Ctrl-C stops")
    sp.set_defaults(func=_score)
    data_dir(sp)

    sp = msub.add_parser("anomalies", help="list anomalies, newest first")
    sp.add_argument("--since", type=_when, default="24h", help="an ISO time or an age (default: 24h ago)")
    sp.add_argument("--service")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_anomalies)
    data_dir(sp)

    sp = msub.add_parser("models", help="list model versions; the current one is marked *")
    sp.add_argument("--use", metavar="VERSION", help="make this version current")
    sp.set_defaults(func=_models)
    data_dir(sp)

    sp = msub.add_parser("rollback", help="make the version before the current one current")
    sp.set_defaults(func=_rollback)
    data_dir(sp)

    sp = msub.add_parser("eval", help="precision/recall/F1, event recall, false alarms/h, delay per detector")
    src = sp.add_mutually_exclusive_group(required=True)
    src.add_argument("--recording", type=Path, help="a scenario recording (greymesh ml record)")
    src.add_argument("--test", type=Path, nargs="+", metavar="CSV",
                     help="labeled CSV file(s), each a series of its own (with --train or --train-rows)")
    fit_on = sp.add_mutually_exclusive_group()
    fit_on.add_argument("--train", type=Path, metavar="CSV", help="a CSV of normal data, fitted for every test file")
    fit_on.add_argument("--train-rows", type=int, metavar="N",
                        help="fit on the first N rows of each test file instead (those labeled 0)")
    sp.add_argument("--label-column", default="label")
    sp.add_argument("--ignore-columns", default="", metavar="A,B",
                    help="columns that are neither features nor the label (e.g. a second label)")
    sp.add_argument("--seconds-per-row", type=float, default=WINDOW_SECONDS,
                    help="a CSV row's time span, for false alarms per hour (default: %(default)s)")
    sp.add_argument("--detectors", default=",".join(DETECTORS), help="comma-separated (default: all)")
    sp.add_argument("--false-alarm-rate", type=float, default=2e-4, metavar="RATE",
                    help="the share of normal windows each threshold lets through (default: %(default)s, what the "
                         "scorer uses; public leaderboards often work at 0.01)")
    sp.set_defaults(func=_eval)

    sp = msub.add_parser("record", help="run the fault scenarios on a mesh of its own and record labeled windows")
    sp.add_argument("--out", type=Path, required=True, help="folder for mesh/, phases.jsonl and recording.csv")
    sp.add_argument("--train-minutes", type=float, default=20)
    sp.add_argument("--holdout-minutes", type=float, default=60)
    sp.add_argument("--fault-minutes", type=float, default=2)
    sp.add_argument("--recovery-minutes", type=float, default=1.5)
    sp.add_argument("--warmup-minutes", type=float, default=1)
    sp.add_argument("--rps", type=float, default=10.0, help="mean normal request rate at the front door")
    sp.add_argument("--export-only", action="store_true",
                    help="write recording.csv again from a recording whose mesh still runs (--keep)")
    sp.add_argument("--keep", action="store_true", help="leave the recording's mesh running at the end")
    sp.set_defaults(func=_record)


def _train(args: argparse.Namespace) -> int:
    if args.until <= args.since:
        raise InputError(f"--until ({args.until}) must be after --since ({args.since})")
    since = args.since // WINDOW_SECONDS * WINDOW_SECONDS
    until = min(args.until // WINDOW_SECONDS * WINDOW_SECONDS, closed_until(time.time()))
    print(f"reading windows {_iso(since)} .. {_iso(until)} from the store", flush=True)
    try:
        model = train_from(_sink_windows(args.data_dir), args.detector, {"seed": args.seed}, since=since, until=until,
                           progress=lambda m: print(m, flush=True))
    except TrainingError as exc:
        raise GreymeshError(str(exc)) from None
    version = registry_of(args.data_dir).save(model)
    print(f"saved model {version} ({len(model.services)} services) and made it current; the scorer picks it up")
    return 0


def _score(args: argparse.Namespace) -> int:
    endpoints = Endpoints.load(DataDir(args.data_dir))
    worker = scorer.Scorer(_sink_windows(args.data_dir), registry_of(args.data_dir),
                           scorer.kafka_emitter(endpoints.kafka_bootstrap(),
                                                mesh_auth(DataDir(args.data_dir), endpoints, SCORER)))
    stop = threading.Event()
    print("scoring each new window (Ctrl-C stops)", flush=True)
    try:
        scorer.run(worker, None, stop)
    except KeyboardInterrupt:
        stop.set()
    return 0


def _anomalies(args: argparse.Namespace) -> int:
    where = f"window >= {int(args.since)}"
    if args.service:
        where += f" AND service = {sql_string(args.service)}"
    columns, rows = StoreClient.of_mesh(DataDir(args.data_dir)).query(
        "SELECT service, anomaly_id, state, window, score, threshold, peak_score, windows, explanation, "
        f"model_version FROM anomalies WHERE {where} ORDER BY window DESC, state LIMIT 1000")
    if args.json:
        for r in rows:
            print(json.dumps(dict(zip(columns, r))))
        return 0
    if not rows:
        print(f"no anomalies since {_iso(args.since)}")
        return 0
    for service, anomaly_id, state, window, score, threshold, _, windows, text, version in rows:
        print(f"{_iso(window)}  {state:<8} {service:<12} {score / threshold:5.1f}x threshold  {text}  "
              f"[{anomaly_id[:8]}, model {version}]")
    return 0


def _models(args: argparse.Namespace) -> int:
    reg = registry_of(args.data_dir)
    try:
        if args.use:
            reg.use(args.use)
            print(f"{args.use} is now current")
    except ModelError as exc:
        raise GreymeshError(str(exc)) from None
    current = reg.current()
    versions = reg.versions()
    if not versions:
        print(f"no models in {reg.root}: train one with `greymesh ml train`")
    for v in versions:
        try:
            m = reg.manifest(v)
            about = (f"{m['detector']:<8} {len(m['services'])} services, trained on {_iso(m['since'])} .. "
                     f"{_iso(m['until'])}, created {_iso(int(m['created']))}")
        except ModelError as exc:
            about = f"unreadable: {exc}"
        print(f"{'*' if v == current else ' '} {v}  {about}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    try:
        version = registry_of(args.data_dir).rollback()
    except ModelError as exc:
        raise GreymeshError(str(exc)) from None
    print(f"{version} is now current; the scorer picks it up within seconds")
    return 0


def _eval(args: argparse.Namespace) -> int:
    try:
        chosen = ml_eval.detectors(args.detectors)
        if not 0 < args.false_alarm_rate < 0.5:
            raise ml_eval.EvalInputError(f"--false-alarm-rate {args.false_alarm_rate:g}: give a share of normal "
                                         "windows between 0 and 0.5, e.g. 0.01")
        ignore = [c.strip() for c in args.ignore_columns.split(",") if c.strip()]
        if args.recording:
            if args.train is not None or args.train_rows is not None:
                raise ml_eval.EvalInputError("--recording carries its own training windows; --train and "
                                             "--train-rows go with --test")
            data = ml_eval.load_recording(args.recording)
        elif args.train is not None:
            data = [ml_eval.load_csv_pair(args.train, test, args.label_column, ignore) for test in args.test]
        elif args.train_rows is not None:
            data = [ml_eval.load_csv_split(test, args.train_rows, args.label_column, ignore) for test in args.test]
        else:
            raise ml_eval.EvalInputError("--test needs --train (a CSV of normal data) or --train-rows N (fit on "
                                         "the first N rows of each test file)")
    except ml_eval.EvalInputError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    results = {}
    for name in chosen:
        started = time.monotonic()
        print(f"{name}: fitting and scoring {len(data)} series", flush=True)
        results[name] = ml_eval.evaluate(name, data, {"false_alarm_rate": args.false_alarm_rate},
                                         seconds_per_row=args.seconds_per_row,
                                         progress=lambda m: print(m, flush=True))
        print(f"{name}: done in {time.monotonic() - started:.1f} s", flush=True)
    print()
    print(ml_eval.table(results, args.seconds_per_row))
    return 0


def _record(args: argparse.Namespace) -> int:
    progress = lambda m: print(m, flush=True)  # noqa: E731
    if args.export_only:
        out = scenarios.export(DataDir(args.out / "mesh"), args.out / "phases.jsonl",
                               args.out / "recording.csv", progress)
    else:
        out = scenarios.record(args.out, train_s=args.train_minutes * 60, holdout_s=args.holdout_minutes * 60,
                               fault_s=args.fault_minutes * 60, recovery_s=args.recovery_minutes * 60,
                               warmup_s=args.warmup_minutes * 60, base_rps=args.rps, keep=args.keep,
                               progress=progress)
    print(f"recording: {out}")
    return 0


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(int(ts), dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
