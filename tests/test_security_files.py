"""Files on the host: the data dir is private, and every greymesh process creates private files.

The mesh-wide check (no file of a running mesh readable by others) is in
tests/test_taps_e2e.py, on the mesh that runs every component.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from core.datadir import DataDir, write_atomic
from core.errors import InputError


def test_an_existing_data_dir_is_made_private(tmp_path: Path) -> None:
    root = tmp_path / "mesh"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    DataDir(root).create()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


def test_a_shared_directory_is_refused_not_taken_over(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp
    with pytest.raises(InputError, match=r"shared directory \(mode 1777.*--data-dir"):
        DataDir(shared).create()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777


def test_state_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_atomic(tmp_path / "runtime.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "runtime.json").stat().st_mode) == 0o600
