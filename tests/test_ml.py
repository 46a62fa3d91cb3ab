"""The anomaly detector's parts on generated windows: detectors, registry, scorer, eval.

The recorded fault scenarios of the real mesh are tested in test_ml_scenarios.py; the
scorer inside a running mesh in test_ml_e2e.py.
"""

from __future__ import annotations

import csv
import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ml import eval as ml_eval
from ml.detectors import DETECTORS, make
from ml.explain import Cause
from ml.features import FEATURES, NAMES, Normaliser, raw_features, series_by_service
from ml.model import train
from ml.registry import ModelError, Registry
from ml.scorer import Hysteresis, Scorer, Tracker
from core.contracts import ROLLUP_FIELDS, WINDOW_SECONDS, AnomalyEvent
from ml.windows import Window

T0 = 1_795_000_000  # a multiple of 10
FAST = {"gru_ae": {"epochs": 15}, "iforest": {"n_estimators": 50}, "pca": {}}
# Training the GRU autoencoder keeps both cores busy for seconds: those cases are not in the
# fast unit tier (`make test-unit`) but in the integration tier, with the real components.
DETECTOR_CASES = [pytest.param(n, marks=pytest.mark.integration) if n == "gru_ae" else n for n in DETECTORS]


def normal_windows(service: str, n: int, seed: int, start: int = T0, latency_ms: float = 5.0) -> list[Window]:
    """Roll-up rows of a healthy service: ~100 requests a window, a few ms of latency."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        req = float(rng.poisson(100))
        p50 = latency_ms * rng.lognormal(0, 0.05)
        out.append(Window(service, start + i * WINDOW_SECONDS, {
            "requests": req, "errors_4xx": 0.0, "errors_5xx": 0.0, "resets": 0.0,
            "latency_p50_ms": p50, "latency_p95_ms": p50 * 1.8, "latency_p99_ms": p50 * rng.uniform(2.2, 3.0),
            "bytes_in": req * 120, "bytes_out": req * rng.normal(800, 20), "distinct_callers": 1.0,
            "authz_denials": 0.0}))
    return out


def with_latency(windows: list[Window], factor: float) -> list[Window]:
    return [Window(w.service, w.window, {**w.values, **{k: w.values[k] * factor for k in
                                                      ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms")}})
            for w in windows]


def fitted(name: str, n: int = 240, seed: int = 1):
    series = series_by_service(normal_windows("payments", n, seed))["payments"]
    norm = Normaliser.fit(series.raw)
    return norm, make(name, **FAST[name]).fit(norm.transform(series.raw))


# --- detectors ----------------------------------------------------------------------


@pytest.mark.parametrize("name", DETECTOR_CASES)
def test_a_detector_flags_a_latency_shift_and_not_fresh_normal_windows(name: str) -> None:
    norm, det = fitted(name)
    fresh = normal_windows("payments", 120, seed=99, start=T0 + 240 * WINDOW_SECONDS)
    slow = with_latency(fresh, 8.0)
    normal_X = norm.transform(series_by_service(fresh)["payments"].raw)
    slow_X = norm.transform(series_by_service(slow)["payments"].raw)
    normal_pred, slow_pred = det.predict(normal_X), det.predict(slow_X)
    assert set(np.unique(normal_pred)) <= {0, 1}
    assert normal_pred.mean() < 0.05, f"{name} flags {normal_pred.mean():.1%} of normal windows"
    assert np.median(det.score_samples(slow_X)) > np.median(det.score_samples(normal_X))
    if name == "iforest":
        # IsolationForest's scores saturate: a window 19 spreads out isolates no faster than the
        # most extreme normal window (the tree follows the edge sample down), so its scores
        # only rank; docs/benchmarks-ml.md shows what that costs on the scenarios.
        return
    assert slow_pred[10:].mean() > 0.95, f"{name} misses {1 - slow_pred[10:].mean():.1%} of 8x-latency windows"


@pytest.mark.parametrize("name", DETECTOR_CASES)
def test_the_explanation_of_a_latency_shift_names_latency(name: str) -> None:
    norm, det = fitted(name)
    slow = series_by_service(with_latency(normal_windows("payments", 30, seed=5), 8.0))["payments"].raw
    parts = det.contributions(norm.transform(slow))
    assert np.allclose(parts.sum(axis=1), 1.0)
    top = {NAMES[i] for i in np.argsort(-parts[-1])[:3]}
    assert top & {"latency_p50_ms", "latency_p95_ms", "latency_p99_ms"}, top


@pytest.mark.parametrize("name", DETECTOR_CASES)
def test_fitting_twice_with_one_seed_gives_the_same_scores(name: str) -> None:
    (_, a), (_, b) = fitted(name), fitted(name)
    X = np.random.default_rng(3).normal(size=(50, len(FEATURES)))
    assert np.array_equal(a.score_samples(X), b.score_samples(X))
    assert a.threshold_ == b.threshold_


def test_the_false_alarm_rate_sets_the_operating_point() -> None:
    rng = np.random.default_rng(7)
    X, fresh = rng.normal(size=(400, 5)), rng.normal(size=(4000, 5))
    paging, loose = make("pca").fit(X), make("pca", false_alarm_rate=0.05).fit(X)
    assert paging.validation_["windows"] == 400  # every row scored by a model that did not learn it
    assert paging.threshold_ >= paging.validation_["score_max"]  # 1 in 5,000: above all 400
    assert loose.threshold_ < loose.validation_["score_max"]
    share = float((loose.score_samples(fresh) > loose.threshold_).mean())
    assert 0.01 < share < 0.12, share
    assert float((paging.score_samples(fresh) > paging.threshold_).mean()) < 0.005


def test_too_little_training_data_is_refused_with_the_numbers() -> None:
    with pytest.raises(ValueError, match=r"gru_ae: need at least \d+ windows .* got 10"):
        make("gru_ae").fit(np.zeros((10, len(FEATURES))))
    with pytest.raises(ValueError, match="finite 2-d array"):
        make("pca").fit(np.full((50, len(FEATURES)), np.nan))
    with pytest.raises(ValueError, match="folds=1: cross-validation needs at least 2 folds"):
        make("pca", folds=1)


def test_features_are_ratios_and_rates_of_the_rollup() -> None:
    values = dict.fromkeys(ROLLUP_FIELDS, 0.0) | {"requests": 200.0, "errors_5xx": 50.0, "bytes_out": 2e6,
                                                  "latency_p99_ms": 40.0}
    vec = dict(zip(NAMES, raw_features(values)))
    assert vec["request_rate"] == 20.0 and vec["error_5xx_ratio"] == 0.25
    assert vec["response_bytes"] == 1e4 and vec["latency_p99_ms"] == 40.0
    # A window with no row in the store is a window without requests: all zeros, not a gap.
    rows = normal_windows("a", 3, seed=0)
    s = series_by_service([rows[0], rows[2]])["a"]
    assert len(s.raw) == 3 and not s.raw[1].any()


def test_explanations_read_as_multiples_and_ratios() -> None:
    assert Cause("latency_p99_ms", 0.7, 251.0, 31.8).words() == "p99 latency 7.9x its normal (251 ms vs 31.8 ms)"
    assert Cause("error_5xx_ratio", 0.2, 0.31, 0.0).words() == "5xx ratio 0.31 vs 0.00"
    assert Cause("response_bytes", 0.5, 2.1e5, 800).words() == "response size 262.5x its normal (210 kB vs 800 B)"


# --- registry ---------------------------------------------------------------------


def mesh_model(detector: str, seed: int = 1):
    rows = normal_windows("payments", 200, seed) + normal_windows("orders", 200, seed + 1, latency_ms=20)
    return train(series_by_service(rows), detector, FAST[detector], since=T0, until=T0 + 2000,
                 progress=lambda _: None)


@pytest.mark.parametrize("name", DETECTOR_CASES)
def test_train_save_load_score_gives_identical_scores(tmp_path: Path, name: str) -> None:
    model = mesh_model(name)
    reg = Registry(tmp_path / "models")
    version = reg.save(model)
    assert reg.current() == version == "v0001"
    loaded_version, loaded = reg.load()
    assert loaded_version == version and set(loaded.services) == {"payments", "orders"}
    raw = series_by_service(with_latency(normal_windows("payments", 40, seed=7), 3.0))["payments"].raw
    before, after = model.services["payments"], loaded.services["payments"]
    assert np.array_equal(before.score(raw)[0], after.score(raw)[0])
    assert np.array_equal(before.score(raw)[1], after.score(raw)[1])
    assert after.detector.threshold_ == before.detector.threshold_
    assert oct((tmp_path / "models" / version / "payments.pkl").stat().st_mode & 0o777) == "0o600"


def test_a_corrupt_or_incompatible_version_is_refused_and_the_previous_one_keeps_scoring(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "models")
    good = mesh_model("pca")
    reg.save(good)
    rows = normal_windows("payments", 400, seed=11) + normal_windows("orders", 400, seed=12, latency_ms=20)
    source = FakeSource(rows)
    scorer = Scorer(source, reg, lambda events: None, lateness_s=0)
    scorer.step(now=T0 + 100 * WINDOW_SECONDS)
    assert scorer.stats.model_version == "v0001" and scorer.stats.windows_scored > 0

    # v0002: a payload whose bytes changed after it was written.
    reg.save(mesh_model("pca", seed=2))
    payload = tmp_path / "models" / "v0002" / "payments.pkl"
    payload.write_bytes(payload.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ModelError, match=r"v0002/payments\.pkl: checksum does not match .* rollback"):
        reg.load()
    scored = scorer.stats.windows_scored
    scorer.step(now=T0 + 103 * WINDOW_SECONDS)
    assert scorer.stats.model_version == "v0001"
    assert "checksum does not match" in (scorer.stats.model_error or "")
    assert scorer.stats.windows_scored == scored + 2 * 3  # the previous version scored 3 new windows of 2 services

    # v0003: trained on other features than this greymesh computes.
    reg.save(mesh_model("pca", seed=3))
    manifest = tmp_path / "models" / "v0003" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"request_rate"', '"requests_per_minute"'))
    with pytest.raises(ModelError, match=r"v0003/manifest\.json: trained on features .*requests_per_minute"):
        reg.load()
    scorer.step(now=T0 + 104 * WINDOW_SECONDS)
    assert scorer.stats.model_version == "v0001"

    # A manifest that lacks what it needs, then one that is not JSON at all.
    manifest.write_text(json.dumps({"format": 1, "features": list(NAMES), "detector": "pca"}))
    with pytest.raises(ModelError, match=r"v0003/manifest\.json: incomplete manifest \(KeyError: 'params'\)"):
        reg.load()
    manifest.write_text("{not json")
    with pytest.raises(ModelError, match=r"v0003/manifest\.json: not a readable manifest"):
        reg.load()
    with pytest.raises(ModelError, match=r"'\.\./v0001' is not a model version"):
        reg.use("../v0001")
    with pytest.raises(ModelError, match="v0002/payments.pkl: checksum"):
        reg.rollback()  # v0002 would not load either: refused, CURRENT stays
    assert reg.current() == "v0003"
    reg.use("v0001")
    assert reg.current() == "v0001"


def test_a_model_file_cannot_run_code_when_loaded(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "models")
    reg.save(mesh_model("pca"))
    _plant(tmp_path / "models" / "v0001", "orders", pickle.dumps(subprocess.Popen))  # a global outside numpy/sklearn
    with pytest.raises(ModelError, match=r"orders\.pkl: not a usable pca model .*refusing to load subprocess\.Popen"):
        reg.load()


def test_a_dotted_name_under_an_admitted_module_cannot_reach_os_system(tmp_path: Path) -> None:
    # `sklearn` imports os: with pickle protocol 4, the global ("sklearn", "os.system") is
    # os.system itself.  An unpickler admitting "anything under sklearn" runs the command.
    canary = tmp_path / "ran"
    evil = _pickle_call("sklearn", "os.system", f"touch {canary}")
    reg = Registry(tmp_path / "models")
    reg.save(mesh_model("iforest"))
    _plant(tmp_path / "models" / "v0001", "orders", evil)
    with pytest.raises(ModelError, match=r"refusing to load sklearn\.os\.system"):
        reg.load()
    assert not canary.exists()


def _plant(version: Path, service: str, payload: bytes) -> None:
    """Replace a service's model file with ``payload`` and fix its checksum in the manifest:
    what someone who can write the registry could do."""
    (version / f"{service}.pkl").write_bytes(payload)
    manifest = version / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["services"][service]["sha256"] = hashlib.sha256(payload).hexdigest()
    manifest.write_text(json.dumps(doc))


def _pickle_call(module: str, name: str, arg: str) -> bytes:
    """A protocol-4 pickle that calls module.name(arg) when loaded (STACK_GLOBAL, REDUCE)."""
    def text(s: str) -> bytes:
        return b"\x8c" + bytes([len(s.encode())]) + s.encode()
    return b"\x80\x04" + text(module) + text(name) + b"\x93" + text(arg) + b"\x85R."


# --- scorer ---------------------------------------------------------------------


class FakeSource:
    """service_windows as a list, answering fetch() the way the sink's /query does."""

    def __init__(self, rows: list[Window]):
        self.rows = rows

    def fetch(self, since: int, until: int, services: list[str] | None = None) -> list[Window]:
        return [w for w in self.rows if since <= w.window < until and (not services or w.service in services)]


def test_hysteresis_raises_one_anomaly_for_a_flapping_signal_and_none_for_one_spike() -> None:
    rules = Hysteresis(raise_hits=2, raise_span=3, clear_after=6)
    spike = Tracker("a", rules)
    assert [spike.step(i, s, 1.0) for i, s in enumerate([0, 5, 0, 0, 5, 0, 0])] == [None] * 7
    flapping = Tracker("b", rules)
    states = [c and c[0] for c in (flapping.step(i, s, 1.0)
                                   for i, s in enumerate([0, 5, 0, 5, 0, 5, 0, 5, 0, 0, 0, 0, 0, 0, 0]))]
    assert states.count("open") == 1 and states.count("resolved") == 1
    assert states.index("open") == 3 and states.index("resolved") == 13  # 6 quiet windows after the last crossing


def test_the_scorer_emits_open_then_resolved_with_an_explanation(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "models")
    reg.save(mesh_model("pca"))
    start = T0 + 1000 * WINDOW_SECONDS
    normal = normal_windows("payments", 60, seed=21, start=start)
    rows = normal[:20] + with_latency(normal[20:30], 8.0) + normal[30:] + normal_windows(
        "orders", 60, seed=22, start=start, latency_ms=20)
    emitted: list[AnomalyEvent] = []
    scorer = Scorer(FakeSource(rows), reg, emitted.extend, lateness_s=0)
    for i in range(1, 61):
        scorer.step(now=start + i * WINDOW_SECONDS)
    states = [(e.state, (e.window - start) // WINDOW_SECONDS) for e in emitted]
    assert states[0] == ("open", 21) and states[1][0] == "resolved" and len(states) == 2, states
    first = emitted[0]
    assert first.service == "payments" and first.model_version == "v0001" and first.score > first.threshold
    assert "latency" in first.explanation and "x its normal" in first.explanation
    assert emitted[1].anomaly_id == first.anomaly_id


# --- eval ---------------------------------------------------------------------


def test_metrics_count_points_segments_false_alarms_and_delay() -> None:
    y = np.array([0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    p = np.array([0, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0])
    m = ml_eval.metrics([(y, p, ())], seconds_per_row=360)  # 15 normal rows = 1.5 h
    tp, fp, fn = 1, 4, 4  # predicted at 1, 4, 5, 12, 13; only 4 is labeled
    assert m.precision == pytest.approx(tp / (tp + fp)) and m.recall == pytest.approx(tp / (tp + fn))
    assert m.event_recall == 0.5 and m.events == 2
    assert m.median_delay == 2  # segment 1 starts at 2, first hit at 4
    assert m.false_alarms_per_hour == pytest.approx(2 / 1.5)  # runs [1,2) and [12,14) touch no segment
    pa_p, pa_r = 3 / (3 + 4), 3 / 5  # segment 1 counts whole (3 points), segment 2 not at all
    assert m.pa_f1 == pytest.approx(2 * pa_p * pa_r / (pa_p + pa_r))


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def test_a_labeled_csv_pair_is_evaluated(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train_rows = [[i, *rng.normal(size=3)] for i in range(200)]
    test_rows = [[i, *(rng.normal(size=3) + (8 if 50 <= i < 60 else 0)), int(50 <= i < 60)] for i in range(100)]
    tr = write_csv(tmp_path / "train.csv", ["timestamp", "a", "b", "c"], train_rows)
    te = write_csv(tmp_path / "test.csv", ["timestamp", "a", "b", "c", "label"], test_rows)
    data = [ml_eval.load_csv_pair(tr, te)]
    assert data[0].train.shape == (200, 3) and int(data[0].labels.sum()) == 10
    m = ml_eval.evaluate("pca", data, progress=lambda _: None)
    assert m.event_recall == 1.0 and m.recall > 0.9


@pytest.mark.parametrize("case, message", [
    ("no_label", r"test\.csv: no 'label' column \(columns: a, b\)"),
    ("text", r"test\.csv:4: column 'b' is 'fast', not a number"),
    ("few", r"train\.csv: 5 rows of normal data; at least 32 are needed"),
    ("label_2", r"test\.csv:3: 'label' is 2; labels must be 0 or 1"),
    ("columns", r"train\.csv: lacks column\(s\) b that .*test\.csv has"),
    ("ragged", r"test\.csv:5: 2 fields, but the header has 3"),
    ("headless", r"test\.csv:1: the first line is data, not a header"),
])
def test_a_bad_eval_csv_is_refused_with_the_file_line_and_column(tmp_path: Path, case: str, message: str) -> None:
    train_header = ["a"] if case == "columns" else ["a", "b"]
    n_train = 5 if case == "few" else 40
    tr = write_csv(tmp_path / "train.csv", train_header, [[i] * len(train_header) for i in range(n_train)])
    test_header = ["a", "b"] if case == "no_label" else ["a", "b", "label"]
    rows: list[list[object]] = [[1, 2, 0] if case != "no_label" else [1, 2] for _ in range(6)]
    if case == "text":
        rows[2][1] = "fast"
    if case == "label_2":
        rows[1][2] = 2
    if case == "ragged":
        rows[3] = [1, 2]
    if case == "headless":
        test_header = ["1", "2", "0"]
    te = write_csv(tmp_path / "test.csv", test_header, rows)
    with pytest.raises(ml_eval.EvalInputError, match=message):
        ml_eval.load_csv_pair(tr, te)


def write_skab_like(path: Path, rows: int, fault: range, seed: int) -> Path:
    """A public benchmark's shape (SKAB): ';'-separated, a datetime column, two label columns."""
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        f.write("datetime;Current;Pressure;Volume Flow RateRMS;anomaly;changepoint\n")
        for i in range(rows):
            x = rng.normal(size=3) + (8 if i in fault else 0)
            f.write(f"2020-03-09 10:{i // 60:02d}:{i % 60:02d};{x[0]:.4f};{x[1]:.4f};{x[2]:.4f};"
                    f"{float(i in fault)};{float(i == fault.start)}\n")
    return path


def test_public_benchmark_files_are_evaluated_as_they_are(tmp_path: Path) -> None:
    tests = [write_skab_like(tmp_path / f"{n}.csv", 300, range(200 + 10 * n, 230 + 10 * n), seed=n) for n in (0, 1)]
    data = [ml_eval.load_csv_split(t, 150, "anomaly", ignore=["changepoint"]) for t in tests]
    assert [d.train.shape for d in data] == [(150, 3), (150, 3)]  # datetime and changepoint are not features
    assert [int(d.labels.sum()) for d in data] == [30, 30]
    m = ml_eval.evaluate("pca", data, seconds_per_row=1, progress=lambda _: None)
    assert m.events == 2 and m.event_recall == 1.0 and m.recall > 0.9
    overlapping = ml_eval.load_csv_split(tests[0], 220, "anomaly", ignore=["changepoint"])
    assert overlapping.train.shape == (200, 3)  # rows 200..219 are labeled: not fitted


@pytest.mark.parametrize("train_rows, fault, ignore, message", [
    (100, range(20, 290), ["changepoint"], r"0\.csv: 20 of the first 100 rows \(--train-rows\) are labeled 0; at "
                                            r"least 32 rows of normal data"),
    (300, range(200, 230), ["changepoint"], r"0\.csv: 300 rows, none left to evaluate after the first 300"),
    (10, range(200, 230), ["changepoint"], r"--train-rows 10: at least 32 rows of normal data"),
    (150, range(200, 230), ["changepoints"], r"0\.csv: --ignore-columns names changepoints, which it does not have"),
])
def test_a_bad_train_rows_split_is_refused_with_the_file_and_the_fix(tmp_path: Path, train_rows: int, fault: range,
                                                                      ignore: list[str], message: str) -> None:
    test = write_skab_like(tmp_path / "0.csv", 300, fault, seed=0)
    with pytest.raises(ml_eval.EvalInputError, match=message):
        ml_eval.load_csv_split(test, train_rows, "anomaly", ignore)


def test_greymesh_ml_eval_refuses_a_bad_csv_with_exit_2(tmp_path: Path) -> None:
    tr = write_csv(tmp_path / "train.csv", ["a"], [[i] for i in range(40)])
    te = write_csv(tmp_path / "test.csv", ["a"], [[1]])
    done = subprocess.run([sys.executable, "-m", "greymesh.cli", "ml", "eval", "--train", str(tr), "--test",
                           str(te)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "refused:" in done.stderr and "no 'label' column" in done.stderr and not done.stdout
    done = subprocess.run([sys.executable, "-m", "greymesh.cli", "ml", "eval", "--test", str(te)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--test needs --train (a CSV of normal data) or --train-rows N" in done.stderr
    done = subprocess.run([sys.executable, "-m", "greymesh.cli", "ml", "eval", "--train", str(tr), "--test",
                           str(te), "--false-alarm-rate", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--false-alarm-rate 2: give a share of normal windows between 0 and 0.5" \
        in done.stderr


def test_a_scorer_with_an_empty_registry_trains_the_first_model_after_enough_traffic(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "models")
    rows = normal_windows("payments", 200, seed=31) + normal_windows("orders", 200, seed=32, latency_ms=20)
    scorer = Scorer(FakeSource(rows), reg, lambda events: None, lateness_s=0, auto_train_s=600, detector="pca")
    for i in range(1, 60):  # 59 windows of traffic have closed: too early
        scorer.step(now=T0 + i * WINDOW_SECONDS)
    assert reg.versions() == [] and scorer.stats.auto_train_at == T0 + 600
    scorer.step(now=T0 + 60 * WINDOW_SECONDS)  # the 60th: 10 minutes
    assert reg.versions() == ["v0001"] and scorer.stats.model_version == "v0001"
    manifest = reg.manifest("v0001")
    assert manifest["detector"] == "pca" and set(manifest["services"]) == {"payments", "orders"}
    assert (manifest["since"], manifest["until"]) == (T0, T0 + 600) and manifest["metrics"]["trained_by"]
    scorer.step(now=T0 + 62 * WINDOW_SECONDS)
    assert scorer.stats.windows_scored > 0
    # Once a version exists, the scorer never trains again by itself.
    reg.save(mesh_model("pca"))
    scorer.step(now=T0 + 63 * WINDOW_SECONDS)
    assert reg.versions() == ["v0001", "v0002"]


def test_events_kafka_did_not_take_are_sent_with_the_next_round(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "models")
    reg.save(mesh_model("pca"))
    start = T0 + 1000 * WINDOW_SECONDS
    normal = normal_windows("payments", 30, seed=41, start=start)
    rows = normal[:10] + with_latency(normal[10:], 8.0) + normal_windows("orders", 30, seed=42, start=start,
                                                                         latency_ms=20)
    sent: list[AnomalyEvent] = []
    broker_up = False

    def emit(events: list[dict]) -> None:
        if not broker_up:
            raise TimeoutError("Kafka is away")
        sent.extend(events)

    scorer = Scorer(FakeSource(rows), reg, emit, lateness_s=0)
    for i in range(1, 15):
        scorer.step(now=start + i * WINDOW_SECONDS)
    assert sent == [] and scorer.stats.unsent == 1 and scorer.stats.anomalies_opened == 1
    broker_up = True
    scorer.step(now=start + 15 * WINDOW_SECONDS)
    assert [e.state for e in sent] == ["open"] and scorer.stats.unsent == 0


def test_a_service_that_stops_answering_altogether_is_scored_as_no_traffic(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "models")
    reg.save(mesh_model("pca"))
    start = T0 + 1000 * WINDOW_SECONDS
    rows = normal_windows("payments", 10, seed=51, start=start) + normal_windows("orders", 30, seed=52, start=start,
                                                                                   latency_ms=20)
    emitted: list[AnomalyEvent] = []
    scorer = Scorer(FakeSource(rows), reg, emitted.extend, lateness_s=0)
    for i in range(1, 31):
        scorer.step(now=start + i * WINDOW_SECONDS)
    opened = [e for e in emitted if e.state == "open"]
    assert [e.service for e in opened] == ["payments"], emitted
    assert opened[0].window <= start + 12 * WINDOW_SECONDS
    assert "request rate" in opened[0].explanation


def test_the_window_where_traffic_began_does_not_set_the_threshold() -> None:
    """A mesh's first window is partial and carries the 5xx of sidecars not yet ready.
    Cross-validated, it used to be scored as held out and become the threshold (700x the
    median score), so a 250 ms fault on a 5 ms service raised nothing."""
    rows = normal_windows("payments", 18, seed=4)
    rows[0] = Window("payments", rows[0].window, {**rows[0].values, "requests": 72.0, "errors_5xx": 2.0})
    model = train(series_by_service(rows), "gru_ae", since=T0, until=T0 + 180, progress=lambda _: None)
    sm = model.services["payments"]
    assert sm.detector.validation_["windows"] == 17  # the first window is not learnt from
    slow = series_by_service(rows[1:] + with_latency(normal_windows("payments", 3, seed=5, start=T0 + 180), 50.0))
    scores, _ = sm.score(slow["payments"].raw)
    assert (scores[-3:] > sm.detector.threshold_).all(), (scores[-3:], sm.detector.threshold_)


@pytest.mark.parametrize("shard", ["2/2", "x/4", "1"])
def test_a_bad_shard_is_refused_before_the_scorer_starts(tmp_path: Path, shard: str) -> None:
    done = subprocess.run([sys.executable, "-m", "ml.scorer", "--sink-url", "http://127.0.0.1:9", "--kafka",
                           "127.0.0.1:9", "--registry", str(tmp_path), "--shard", shard],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"--shard: {shard!r}: expected i/n with 0 <= i < n" in done.stderr


def test_shards_split_the_services_between_scorers(tmp_path: Path) -> None:
    names = [f"svc-{i}" for i in range(40)]
    owned = [{n for n in names if Scorer(FakeSource([]), Registry(tmp_path), lambda e: None, shard=(i, 3))._mine(n)}
             for i in range(3)]
    assert set().union(*owned) == set(names) and sum(map(len, owned)) == len(names)
    assert all(owned)
