"""The `greymesh` command's answers when there is nothing (or something wrong) to act on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.mesh import DEMO_SPEC, ROOT


def greymesh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "greymesh.cli", *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_doctor_reports_the_pinned_envoy_with_its_version_and_path():
    proc = greymesh("doctor", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    envoy = next(r for r in json.loads(proc.stdout) if r["name"] == "envoy")
    assert envoy["installed"] is True and envoy["version"] == "1.40.0"
    assert Path(envoy["path"]).is_file() and envoy["install"] is None


def test_apply_without_a_running_mesh_says_to_run_up(tmp_path: Path):
    proc = greymesh("apply", str(DEMO_SPEC), "--data-dir", str(tmp_path))
    assert proc.returncode == 1
    assert "greymesh up" in proc.stderr and str(tmp_path) in proc.stderr


def test_apply_of_a_missing_file_names_it(tmp_path: Path):
    missing = tmp_path / "nope.yaml"
    proc = greymesh("apply", str(missing), "--data-dir", str(tmp_path))
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "cannot read" in proc.stderr


def test_status_where_no_mesh_was_started_says_so_and_creates_nothing(tmp_path: Path):
    data_dir = tmp_path / "never-used"
    proc = greymesh("status", "--data-dir", str(data_dir))
    assert proc.returncode == 1
    assert f"no mesh has been started in {data_dir}" in proc.stdout
    proc = greymesh("status", "--json", "--data-dir", str(data_dir))
    assert proc.returncode == 1 and json.loads(proc.stdout) == {"data_dir": str(data_dir), "mesh": None}
    assert not data_dir.exists()


def test_up_refuses_a_bad_store_url_or_kafka_address_before_starting_anything(tmp_path: Path):
    bad_store = greymesh("up", "--store", "mysql://db:3306/taps", "--data-dir", str(tmp_path))
    assert bad_store.returncode == 1
    assert "mysql://db:3306/taps" in bad_store.stderr and "clickhouse://" in bad_store.stderr
    bad_kafka = greymesh("up", "--kafka", "broker-without-port", "--data-dir", str(tmp_path))
    assert bad_kafka.returncode == 1
    assert "broker-without-port" in bad_kafka.stderr and "host:port" in bad_kafka.stderr
    assert not (tmp_path / "runtime.json").exists()


def test_taps_commands_without_a_running_mesh_say_to_run_up(tmp_path: Path):
    for action in (["query", "SELECT 1"], ["stats"], ["tail"]):
        proc = greymesh("taps", *action, "--data-dir", str(tmp_path))
        assert proc.returncode == 1 and "greymesh up" in proc.stderr, (action, proc.stderr)


def test_ml_commands_without_a_running_mesh_say_to_run_up(tmp_path: Path):
    for args in (("ml", "train"), ("ml", "anomalies")):
        proc = greymesh(*args, "--data-dir", str(tmp_path))
        assert proc.returncode == 1, args
        assert "greymesh up" in proc.stderr and str(tmp_path) in proc.stderr
    proc = greymesh("ml", "models", "--data-dir", str(tmp_path))
    assert proc.returncode == 0 and "no models in" in proc.stdout and "greymesh ml train" in proc.stdout
    proc = greymesh("ml", "train", "--since", "yesterday-ish", "--data-dir", str(tmp_path))
    assert proc.returncode == 2 and "'yesterday-ish': give an ISO time" in proc.stderr


def test_doctor_lists_torch_with_the_pinned_version():
    proc = greymesh("doctor", "--component", "torch", "--version-only")
    assert proc.returncode == 0 and proc.stdout.strip() == "2.15.0"
