"""Where heavy installs live and which versions are pinned; the same rules as deploy/install.sh."""

from __future__ import annotations

import os
from pathlib import Path

# NAME=value pins of the components install.sh builds; install.sh sources the same file.
VERSIONS_FILE = Path(__file__).resolve().parents[1] / "deploy" / "versions.env"
INSTALL = "deploy/install.sh"


def pinned_versions() -> dict[str, str]:
    """The pins in deploy/versions.env, read here so Python and the installer cannot disagree."""
    pins = {}
    for line in VERSIONS_FILE.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not name.lstrip().startswith("#"):
            pins[name.strip()] = value.strip()
    return pins


def greymesh_home() -> Path:
    """The per-user home of heavy installs; the same default as deploy/install.sh."""
    if home := os.environ.get("GREYMESH_HOME"):
        return Path(home)
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "greymesh"


def opa_binary() -> Path:
    """The OPA executable greymesh runs: $GREYMESH_OPA if set (e.g. a system-wide OPA),
    else the pinned build deploy/install.sh puts under greymesh_home()."""
    if override := os.environ.get("GREYMESH_OPA"):
        return Path(override)
    return greymesh_home() / "opa" / pinned_versions()["OPA_VERSION"] / "bin" / "opa"
