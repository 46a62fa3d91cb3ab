"""Secrets of one mesh: random tokens in files only their holders read.

Every secret lives under ``<data dir>/secrets/`` (0700) in a file of its own (0600),
created once by the runtime at ``greymesh up`` and read by the component (or the CLI)
that holds it.  A secret never travels on argv, in runtime.json, in status output or
in a log: a workload is handed the *path* of its secret, never the value.

    token = issue(dd.secret("api.token"))     # at up: creates it, or reads the existing one
    token = read(dd.secret("api.token"))      # a holder: the value, or a clear error
    matches(presented, token)                 # compare in constant time
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path

from core.errors import GreymeshError

TOKEN_BYTES = 32  # 256 bits of randomness, url-safe base64 (43 characters)
SECRET_FILE_MODE = 0o600
SECRET_DIR_MODE = 0o700


class CredentialError(GreymeshError):
    """A secret file is missing, unreadable or open to other users."""


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def issue(path: Path, value: str | None = None) -> str:
    """The secret at ``path``, created (0600, in a 0700 dir) when it does not exist yet.

    Creation is exclusive: two processes issuing the same secret at once agree on one value.
    ``value`` sets what a new file holds (default: a fresh random token)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=SECRET_DIR_MODE)
    os.chmod(path.parent, SECRET_DIR_MODE)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_FILE_MODE)
    except FileExistsError:
        return read(path)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write((value if value is not None else new_token()) + "\n")
    return read(path)


def read(path: Path) -> str:
    """The secret at ``path``; CredentialError when it is missing or other users may read it."""
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise CredentialError(f"{path}: no such secret; it is created by `greymesh up` "
                              "(is the mesh of this data dir up?)") from None
    except OSError as exc:
        raise CredentialError(f"{path}: cannot read the secret ({exc.strerror})") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialError(f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets other users read a secret; "
                              f"run `chmod 600 {path}` (and rotate it if others may have read it)")
    if not text:
        raise CredentialError(f"{path}: the secret file is empty; remove it and run `greymesh up` again")
    return text


def matches(presented: str | None, expected: str) -> bool:
    """True when ``presented`` is ``expected``, compared in constant time."""
    return presented is not None and hmac.compare_digest(presented.encode(), expected.encode())
