"""core/credentials.py: secrets are created once, 0600 in a 0700 dir, and refused when open to others."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from core import credentials
from core.credentials import CredentialError


def test_issue_creates_a_private_secret_once(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "api.token"
    token = credentials.issue(path)
    assert len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert credentials.issue(path) == token  # a second `up` keeps the token the CLI already read
    assert credentials.read(path) == token


def test_concurrent_issuers_agree_on_one_value(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "shared.token"
    seen: list[str] = []
    threads = [threading.Thread(target=lambda: seen.append(credentials.issue(path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 1


def test_a_secret_others_can_read_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "api.token"
    credentials.issue(path)
    os.chmod(path, 0o640)
    with pytest.raises(CredentialError, match=r"mode 0640 .*`chmod 600 "):
        credentials.read(path)


def test_a_missing_secret_names_the_file_and_the_command(tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match=r"api\.token: no such secret.*greymesh up"):
        credentials.read(tmp_path / "api.token")


def test_matches_needs_the_exact_token() -> None:
    assert credentials.matches("abc", "abc")
    assert not credentials.matches("abd", "abc")
    assert not credentials.matches(None, "abc")
    assert not credentials.matches("", "abc")
