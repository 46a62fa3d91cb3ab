"""Honest evaluation of detectors on labeled windows.

Two kinds of input:

* a scenario recording (greymesh/scenarios.py): per service, its ``train`` windows fit the
  detector, its ``test`` windows (faults, recoveries and an hour of normal traffic) are
  scored and compared with the ``label`` column;
* any labeled multivariate series as CSV files with a 0/1 label column, so public
  benchmarks can be used as they are: a training file of normal data for one or more
  test files, or (``train_rows``, SKAB's protocol) the first rows of each test file as
  its own training data (in either case only the rows labeled 0 are fitted).  The
  delimiter (``,``, ``;`` or tab) is read from the header line; every column but the
  label, ``timestamp``/``time``/``datetime`` and the ones asked to be ignored must be
  numeric.

Metrics, per detector, on the raw per-window predictions (``predict``; the scorer's
hysteresis is not applied):

    precision, recall, F1   point-wise, **without** point adjustment
    event recall            share of anomalous segments (runs of label 1) with at least one
                            window predicted anomalous
    false alarms/h          runs of predicted-anomalous windows that touch no anomalous
                            segment, per hour of normal (label 0) windows, pooled over
                            series: per hour of one service's normal traffic
    median delay            windows from a detected segment's start to its first detection
    PA-F1                   point-adjusted F1 (a detected segment counts as wholly found):
                            printed for comparison with papers that report it, never alone
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ml.detectors import DETECTORS, make
from ml.features import Normaliser, series_by_service
from core.contracts import ROLLUP_FIELDS, WINDOW_SECONDS
from ml.windows import Window


class EvalInputError(ValueError):
    """A CSV that cannot be evaluated; the message names the file, line or column."""


@dataclass(frozen=True)
class Labeled:
    """One series to evaluate: training rows (normal) and test rows with labels."""

    name: str
    train: np.ndarray  # (n, f) normalised
    test: np.ndarray  # (m, f) normalised
    labels: np.ndarray  # (m,) 0/1
    scenarios: tuple[str, ...] = ()  # (m,) the scenario a test row belongs to ('' for none)


@dataclass
class Metrics:
    precision: float
    recall: float
    f1: float
    event_recall: float
    events: int
    false_alarms_per_hour: float
    median_delay: float  # windows; nan when nothing was detected
    pa_f1: float
    per_scenario: dict[str, tuple[int, int, float]] = field(default_factory=dict)  # name -> (found, events, delay)


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of 1 as [start, end) index pairs."""
    padded = np.concatenate([[0], flags.astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _f1(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def metrics(series: Iterable[tuple[np.ndarray, np.ndarray, Sequence[str]]],
            seconds_per_row: float = WINDOW_SECONDS) -> Metrics:
    """Metrics over several (labels, predictions, scenario per row) series, pooled."""
    tp = fp = fn = pa_tp = pa_fn = 0
    events = found = false_alarms = 0
    normal_rows = 0
    delays: list[int] = []
    per: dict[str, list[Any]] = {}
    for y, p, scen in series:
        y, p = np.asarray(y, dtype=bool), np.asarray(p, dtype=bool)
        tp += int((y & p).sum())
        fp += int((~y & p).sum())
        fn += int((y & ~p).sum())
        normal_rows += int((~y).sum())
        for start, end in _runs(y):
            hits = np.flatnonzero(p[start:end])
            name = scen[start] if len(scen) else ""
            entry = per.setdefault(name, [0, 0, []])
            events += 1
            entry[1] += 1
            if len(hits):
                found += 1
                entry[0] += 1
                delays.append(int(hits[0]))
                entry[2].append(int(hits[0]))
                pa_tp += end - start
            else:
                pa_fn += end - start
        for start, end in _runs(p):
            if not y[start:end].any():
                false_alarms += 1
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    pa_precision = pa_tp / (pa_tp + fp) if pa_tp + fp else 0.0
    pa_recall = pa_tp / (pa_tp + pa_fn) if pa_tp + pa_fn else 0.0
    hours = normal_rows * seconds_per_row / 3600
    return Metrics(
        precision=precision, recall=recall, f1=_f1(precision, recall),
        event_recall=found / events if events else math.nan, events=events,
        false_alarms_per_hour=false_alarms / hours if hours else math.nan,
        median_delay=float(np.median(delays)) if delays else math.nan,
        pa_f1=_f1(pa_precision, pa_recall),
        per_scenario={k: (v[0], v[1], float(np.median(v[2])) if v[2] else math.nan) for k, v in per.items() if k},
    )


def evaluate(detector: str, data: Sequence[Labeled], params: dict[str, Any] | None = None,
             seconds_per_row: float = WINDOW_SECONDS, progress: Callable[[str], None] = print) -> Metrics:
    """Fit ``detector`` on each series' training rows, predict its test rows (scored after
    the training rows, so a sequence model has its context), and pool the metrics."""
    results = []
    for s in data:
        det = make(detector, **(params or {})).fit(s.train)
        scores = det.score_samples(np.concatenate([s.train, s.test]))[len(s.train):]
        results.append((s.labels, scores > det.threshold_, s.scenarios))
        progress(f"  {detector}: {s.name} scored ({len(s.test)} windows, {int(s.labels.sum())} labeled anomalous)")
    return metrics(results, seconds_per_row)


# --- inputs -----------------------------------------------------------------------

_DELIMITERS = ",;\t"


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        with path.open(newline="") as f:
            first = f.readline()
            f.seek(0)
            # The header line's most frequent candidate: public data sets use all three.
            delimiter = max(_DELIMITERS, key=first.count)
            rows = list(csv.reader(f, delimiter=delimiter))
    except OSError as exc:
        raise EvalInputError(f"{path}: cannot read ({exc.strerror})") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise EvalInputError(f"{path}: not a CSV file ({exc})") from None
    if not rows:
        raise EvalInputError(f"{path}: empty; expected a header line and rows")
    header = [h.strip() for h in rows[0]]
    if all(_is_number(h) for h in header):
        raise EvalInputError(f"{path}:1: the first line is data, not a header; add a line naming the columns "
                             "(and, in the test file, the 0/1 label column)")
    return header, rows[1:]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _numbers(path: Path, header: list[str], rows: list[list[str]], columns: list[str]) -> np.ndarray:
    idx = [header.index(c) for c in columns]
    out = np.empty((len(rows), len(columns)))
    for line, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise EvalInputError(f"{path}:{line}: {len(row)} fields, but the header has {len(header)}")
        for j, i in enumerate(idx):
            try:
                out[line - 2, j] = float(row[i])
            except ValueError:
                raise EvalInputError(f"{path}:{line}: column {columns[j]!r} is {row[i]!r}, not a number") from None
            if not math.isfinite(out[line - 2, j]):
                raise EvalInputError(f"{path}:{line}: column {columns[j]!r} is {row[i]!r}; give a finite number")
    return out


_TIME_COLUMNS = {"timestamp", "time", "datetime"}


def _feature_columns(path: Path, header: list[str], label: str, ignore: Sequence[str]) -> list[str]:
    if label not in header:
        raise EvalInputError(f"{path}: no {label!r} column (columns: {', '.join(header)}); the test file "
                             f"needs a 0/1 label column, or name it with --label-column")
    unknown = [c for c in ignore if c not in header]
    if unknown:
        raise EvalInputError(f"{path}: --ignore-columns names {', '.join(unknown)}, which it does not have "
                             f"(columns: {', '.join(header)})")
    features = [c for c in header if c != label and c not in ignore and c.lower() not in _TIME_COLUMNS]
    if not features:
        raise EvalInputError(f"{path}: no feature columns besides {label!r}")
    return features


def _labels(path: Path, header: list[str], rows: list[list[str]], label: str) -> np.ndarray:
    labels = _numbers(path, header, rows, [label])[:, 0]
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if len(bad):
        raise EvalInputError(f"{path}:{bad[0] + 2}: {label!r} is {labels[bad[0]]:g}; labels must be 0 or 1")
    return labels.astype(np.int8)


def _labeled(name: str, train: np.ndarray, test: np.ndarray, labels: np.ndarray) -> Labeled:
    # Columns of any unit: no log scale, and a floor on the spread relative to the column's
    # own size, so that a column that never moved in training (common in public data sets)
    # does not turn its first tiny change into a 20-sigma outlier.
    floor = np.maximum(0.1 * train.std(axis=0), 1e-3 * (1 + np.abs(np.median(train, axis=0))))
    norm = Normaliser.fit(train, log=np.zeros(train.shape[1], dtype=bool), floor=floor)
    return Labeled(name, norm.transform(train), norm.transform(test), labels)


def load_csv_pair(train_path: Path, test_path: Path, label: str = "label", ignore: Sequence[str] = (),
                  min_train_rows: int = 32) -> Labeled:
    """A training CSV (normal rows) and a test CSV with a 0/1 ``label`` column, checked."""
    train_header, train_rows = _read_csv(train_path)
    test_header, test_rows = _read_csv(test_path)
    features = _feature_columns(test_path, test_header, label, ignore)
    missing = [c for c in features if c not in train_header]
    if missing:
        raise EvalInputError(f"{train_path}: lacks column(s) {', '.join(missing)} that {test_path} has")
    if not test_rows:
        raise EvalInputError(f"{test_path}: no rows to evaluate")
    train = _numbers(train_path, train_header, train_rows, features)
    if label in train_header:  # a training file with labels: only its normal rows are used
        train = train[_labels(train_path, train_header, train_rows, label) == 0]
    if len(train) < min_train_rows:
        raise EvalInputError(f"{train_path}: {len(train)} rows of normal data; at least {min_train_rows} are needed "
                             "to fit and validate a detector")
    test = _numbers(test_path, test_header, test_rows, features)
    return _labeled(test_path.name, train, test, _labels(test_path, test_header, test_rows, label))


def load_csv_split(test_path: Path, train_rows: int, label: str = "label", ignore: Sequence[str] = (),
                   min_train_rows: int = 32) -> Labeled:
    """One labeled CSV whose first ``train_rows`` rows train (those labeled 0) and the rest test."""
    if train_rows < min_train_rows:
        raise EvalInputError(f"--train-rows {train_rows}: at least {min_train_rows} rows of normal data are needed "
                             "to fit and validate a detector")
    header, rows = _read_csv(test_path)
    features = _feature_columns(test_path, header, label, ignore)
    if len(rows) <= train_rows:
        raise EvalInputError(f"{test_path}: {len(rows)} rows, none left to evaluate after the first {train_rows} "
                             f"(--train-rows)")
    labels = _labels(test_path, header, rows, label)
    normal = labels[:train_rows] == 0  # as with a labeled training file, only normal rows are fitted
    if normal.sum() < min_train_rows:
        raise EvalInputError(f"{test_path}: {int(normal.sum())} of the first {train_rows} rows (--train-rows) are "
                             f"labeled 0; at least {min_train_rows} rows of normal data are needed to fit and validate "
                             "a detector")
    X = _numbers(test_path, header, rows, features)
    return _labeled(test_path.name, X[:train_rows][normal], X[train_rows:], labels[train_rows:])


RECORDING_COLUMNS = ("service", "window", *ROLLUP_FIELDS, "label", "scenario", "split")


RecordingMeta = dict[tuple[str, int], tuple[int, str, str]]  # (service, window) -> (label, scenario, split)


def read_recording(path: Path) -> tuple[list[Window], RecordingMeta]:
    """A scenario recording's rows, checked: the roll-up windows and each one's labels."""
    header, rows = _read_csv(path)
    missing = [c for c in RECORDING_COLUMNS if c not in header]
    if missing:
        raise EvalInputError(f"{path}: not a scenario recording, it lacks {', '.join(missing)} (expected the columns "
                             f"{', '.join(RECORDING_COLUMNS)})")
    numeric = _numbers(path, header, rows, ["window", *ROLLUP_FIELDS, "label"])
    col = {c: header.index(c) for c in ("service", "scenario", "split")}
    windows: list[Window] = []
    meta: RecordingMeta = {}
    for r, row in zip(numeric, rows):
        w = Window(row[col["service"]], int(r[0]), dict(zip(ROLLUP_FIELDS, r[1:-1].tolist())))
        windows.append(w)
        meta[(w.service, w.window)] = (int(r[-1]), row[col["scenario"]], row[col["split"]])
    return windows, meta


def load_recording(path: Path) -> list[Labeled]:
    """A scenario recording (greymesh/scenarios.py) as one Labeled series per service."""
    windows, meta = read_recording(path)
    train_end = max((k[1] for k, v in meta.items() if v[2] == "train"), default=None)
    if train_end is None:
        raise EvalInputError(f"{path}: no row has split 'train'; a recording needs normal windows to train on")
    out = []
    for service, s in sorted(series_by_service(windows).items()):
        info = [meta.get((service, int(w)), (0, "", "")) for w in s.windows]  # a gap: no requests, unlabeled
        is_train = s.windows <= train_end
        if is_train.sum() < 16:
            raise EvalInputError(f"{path}: {service} has {int(is_train.sum())} train windows; at least 16 are needed")
        norm = Normaliser.fit(s.raw[is_train])
        X = norm.transform(s.raw)
        labels = np.array([i[0] for i in info], dtype=np.int8)
        out.append(Labeled(service, X[is_train], X[~is_train], labels[~is_train],
                           tuple(i[1] for i, t in zip(info, is_train) if not t)))
    return out


# --- the table ----------------------------------------------------------------------

def table(results: dict[str, Metrics], seconds_per_row: float = WINDOW_SECONDS) -> str:
    head = ("detector", "precision", "recall", "F1", "event recall", "false alarms/h", "median delay",
            "(PA-F1)")
    lines = [head]
    for name, m in results.items():
        delay = "-" if math.isnan(m.median_delay) else f"{m.median_delay:.0f} w ({m.median_delay * seconds_per_row:.0f} s)"
        lines.append((name, f"{m.precision:.3f}", f"{m.recall:.3f}", f"{m.f1:.3f}",
                      f"{m.event_recall:.2f} ({round(m.event_recall * m.events)}/{m.events})"
                      if m.events else "-", f"{m.false_alarms_per_hour:.2f}", delay, f"{m.pa_f1:.3f}"))
    scenarios = sorted({k for m in results.values() for k in m.per_scenario})
    out = _format(lines)
    if scenarios:
        rows = [("detector", *scenarios)]
        for name, m in results.items():
            rows.append((name, *(f"{m.per_scenario[k][0]}/{m.per_scenario[k][1]}"
                                  + ("" if math.isnan(m.per_scenario[k][2]) else f", {m.per_scenario[k][2]:.0f} w")
                                  if k in m.per_scenario else "-" for k in scenarios)))
        out += "\nsegments found per scenario (found/segments, median delay in windows):\n" + _format(rows)
    return out


def _format(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows) + "\n"


def detectors(names: str) -> list[str]:
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in DETECTORS]
    if unknown:
        raise EvalInputError(f"--detectors: no detector {', '.join(unknown)}; choose from {', '.join(DETECTORS)}")
    return chosen

