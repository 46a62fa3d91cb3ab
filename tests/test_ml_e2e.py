"""The anomaly detector inside a running demo mesh: `greymesh ml train` reads the real
store, the scorer that `greymesh up` started picks the model up, and a latency fault
injected on payments (its knobs) becomes an anomaly that travels Kafka
(greymesh.anomalies) -> sink -> store, where `greymesh ml anomalies` lists it."""

from __future__ import annotations

import json
import stat
import time
from collections.abc import Iterator

import pytest
import yaml

from controlplane.identity import BUNDLE_FILE, CERT_FILE
from core.contracts import WINDOW_SECONDS
from core.datadir import write_atomic
from greymesh.demo.service import knobs_path
from tests.support.mesh import DEMO_SPEC, Mesh, running_mesh, wait_for


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    doc = yaml.safe_load(DEMO_SPEC.read_text())
    with running_mesh(tmp_path_factory.mktemp("ml"), doc, "delta", up_args=("--rps", "10")) as m:
        yield m


def closed_windows(mesh: Mesh, service: str) -> int:
    rows = mesh.query(f"SELECT count() AS n FROM service_windows WHERE service = '{service}' "
                      f"AND window < toDateTime({int(time.time()) - 5 - WINDOW_SECONDS})")
    return int(rows[0]["n"])


def test_a_latency_fault_on_payments_becomes_a_stored_anomaly_within_3_windows(mesh: Mesh) -> None:
    wait_for(lambda: "ml" in mesh.status(), 30, "the scorer's first round")
    assert mesh.status()["ml"]["model_version"] is None  # the scorer runs, idle until a model exists
    # 16 closed windows: 12 to train the autoencoder on, 4 to fit its threshold.
    wait_for(lambda: closed_windows(mesh, "payments") >= 17, 300, "17 windows of payments traffic")
    trained = mesh.cli("ml", "train", "--since", "15m", timeout=300)
    assert "saved model v0001" in trained.stdout, trained.stdout
    assert "payments:" in trained.stdout and "threshold" in trained.stdout
    wait_for(lambda: mesh.status()["ml"]["model_version"] == "v0001", 30, "the scorer to load v0001")
    listed = mesh.cli("ml", "models").stdout
    assert listed.startswith("* v0001  gru_ae") and "4 services" in listed

    knobs = knobs_path(mesh.data_dir, "payments")
    injected = time.time()
    write_atomic(knobs, json.dumps({"latency_ms": 250}))  # as `greymesh` writes it: private
    fault_window = int(injected) // WINDOW_SECONDS * WINDOW_SECONDS

    def opened() -> list[dict]:
        return mesh.query("SELECT service, window, state, score, threshold, explanation, detector, model_version "
                          f"FROM anomalies WHERE service = 'payments' AND state = 'open' AND window >= {fault_window}")

    wait_for(lambda: bool(opened()), 90, "a payments anomaly in the store")
    knobs.unlink()
    (row,) = opened()
    assert (row["window"] - fault_window) // WINDOW_SECONDS <= 3, (row, fault_window)
    assert row["score"] > row["threshold"] and (row["detector"], row["model_version"]) == ("gru_ae", "v0001")
    assert "payments" in row["explanation"] and "latency" in row["explanation"], row["explanation"]

    listing = mesh.cli("ml", "anomalies", "--service", "payments").stdout
    assert "open" in listing and "latency" in listing and "model v0001" in listing
    status = mesh.status()["ml"]
    assert status["windows_scored"] > 0 and status["anomalies_opened"] >= 1


def test_rollback_without_an_earlier_version_is_refused(mesh: Mesh) -> None:
    proc = mesh.cli("ml", "rollback", check=False)
    assert proc.returncode == 1 and "no version before" in proc.stderr


def test_nothing_of_a_running_mesh_is_open_to_other_users(mesh: Mesh) -> None:
    # This mesh runs every component with its defaults: Kafka's data, the embedded store,
    # the model registry, keys, tokens and logs all live in its data dir.
    assert (mesh.data_dir / "store").is_dir() and (mesh.data_dir / "kafka").is_dir()
    assert stat.S_IMODE(mesh.data_dir.stat().st_mode) == 0o700
    public = {CERT_FILE, BUNDLE_FILE}  # CA certificates: public by nature
    open_to_others = [f"{p} {stat.S_IMODE(p.lstat().st_mode):04o}" for p in mesh.data_dir.rglob("*")
                      if not p.is_symlink() and p.name not in public and p.lstat().st_mode & 0o077]
    assert open_to_others == [], "\n".join(open_to_others[:20])
