"""The `greymesh` command's answers when there is nothing (or something wrong) to act on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.mesh import DEMO_SPEC, ROOT


def greymesh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controlplane.cli", *args],
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


def test_status_of_an_empty_data_dir_is_not_a_crash(tmp_path: Path):
    proc = greymesh("status", "--json", "--data-dir", str(tmp_path))
    doc = json.loads(proc.stdout)
    assert doc["processes"] == {} and doc["entrypoint"] is None
    assert proc.returncode == 0
