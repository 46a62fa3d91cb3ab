"""How the runtime runs OPA: its files (config, the system bundle, the policy bundle, the
clients' tokens) and its argv.

OPA's REST API takes only authenticated requests (``--authentication=token
--authorization=basic``); what each client may do is policies/system/authz.rego, loaded
from a bundle of its own with the sha256 of each client's token beside it (never a token,
never on argv).  The mesh's policy is the bundle `greymesh policy push` writes
(controlplane/policy.py); OPA watches both (``--watch``) and swaps a changed bundle in at
once.  Decisions are reported to the tap service's decision-log receiver with the bearer
token OPA reads from a file (``credentials.bearer.token_path``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlplane.policy import POLICY_DIR, SYSTEM_DIR, TEST_SUFFIX, placeholder_bundle
from core import credentials
from core.contracts import DECISION_PATH, MESH_DATA_PATH, POLICY_BUNDLE_FILE
from core.datadir import DataDir

SERVICE_NAME = "greymesh-decision-log"
# The secrets of OPA's clients, under the data dir's secrets/ (core.credentials).
ADMIN_TOKEN = "opa-admin.token"  # the control plane, its on_ready restore and the CLI
BRIDGE_TOKEN = "opa-authz.token"  # the ext_authz bridge: asks decisions, nothing else
# The clients the system policy knows (data.system.greymesh.clients) and their tokens.
CLIENT_TOKENS = {"control_plane": ADMIN_TOKEN, "authz_bridge": BRIDGE_TOKEN}
SYSTEM_ROOTS = ["system/authz", "system/greymesh"]


@dataclass(frozen=True)
class OpaFiles:
    """Where one data dir keeps what OPA runs with."""

    config: Path  # OPA's config file
    system_bundle: Path  # directory: policies/system + the clients' token digests
    policy_bundle: Path  # the bundle of the last push (absolute: OPA names the bundle by it)
    admin_token: Path
    bridge_token: Path


def files(dd: DataDir) -> OpaFiles:
    root = dd.root.resolve()
    return OpaFiles(
        config=root / "opa" / "config.json",
        system_bundle=root / "opa" / "system",
        policy_bundle=(dd.active_policy / POLICY_BUNDLE_FILE).resolve(),
        admin_token=dd.secret(ADMIN_TOKEN),
        bridge_token=dd.secret(BRIDGE_TOKEN),
    )


def prepare(dd: DataDir, decision_log_url: str, decision_log_token: Path) -> OpaFiles:
    """At `greymesh up`: issue the clients' tokens (once; later ups keep them), write OPA's
    config (reporting to decision_log_url with the token in the file decision_log_token)
    and system bundle, and put the placeholder policy bundle in place if nothing was pushed
    yet.  Idempotent."""
    f = files(dd)
    clients = {hashlib.sha256(credentials.issue(dd.secret(name)).encode()).hexdigest(): client
               for client, name in CLIENT_TOKENS.items()}
    credentials.issue(decision_log_token)
    _replace(f.config, json.dumps(opa_config(decision_log_url, decision_log_token), indent=2))
    write_system_bundle(f.system_bundle, clients)
    placeholder_bundle(f.policy_bundle)
    return f


def write_system_bundle(dest: Path, clients: dict[str, str]) -> None:
    """The bundle of OPA's own authorization: policies/system's modules and the data they
    read, ``clients`` being {sha256 of a client's token: its name}.  Files are replaced
    only when they change (OPA reloads on every change)."""
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(dest, 0o700)
    system = POLICY_DIR / SYSTEM_DIR
    for src in sorted(system.glob("*.rego")):
        if not src.name.endswith(TEST_SUFFIX):
            _replace(dest / src.name, src.read_text(encoding="utf-8"))
    paths = {"decision": DECISION_PATH, "mesh": MESH_DATA_PATH}  # as OPA gives them: URL path segments
    data = {"clients": clients, "paths": {k: ["v1", "data", *v.split("/")] for k, v in paths.items()}}
    _replace(dest / "system" / "greymesh" / "data.json", json.dumps(data, indent=2))
    _replace(dest / ".manifest", json.dumps({"roots": SYSTEM_ROOTS}))


def _replace(path: Path, text: str) -> None:
    """Write text to path (0600) in one rename, unless it already holds it.  The temporary
    file ends in .tmp, which OPA does not load from a bundle directory it watches."""
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def opa_config(decision_log_url: str, decision_log_token: Path) -> dict[str, Any]:
    """OPA's config file content: report every decision to decision_log_url (the
    receiver's url) once a second, so records land within about two seconds, presenting
    the token in the file decision_log_token (OPA reads the file, not this config)."""
    return {
        "services": {SERVICE_NAME: {"url": decision_log_url,
                                    "credentials": {"bearer": {"token_path": str(decision_log_token)}}}},
        "decision_logs": {
            "service": SERVICE_NAME,
            "reporting": {"min_delay_seconds": 1, "max_delay_seconds": 1},  # OPA's defaults: 300 and 600
        },
    }


def opa_argv(opa_binary: Path, addr: str, f: OpaFiles) -> list[str]:
    """`opa run --server` on addr (host:port, loopback only), authenticating every request
    and authorizing it by the system bundle, running the policy bundle, reporting as the
    config says.

    Until the first push the policy bundle is the placeholder: OPA decides nothing, so
    every request is denied (closed) until `controlplane.policy` (the runtime's on_ready)
    pushes one.  After a restart OPA loads the last pushed bundle itself."""
    host = addr.rpartition(":")[0].strip("[]")
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"OPA must listen on loopback, not {addr}")
    # --log-level error: at info OPA logs two lines per decision (unbounded, and ~20% of
    # its CPU per decision); the decision log already records every decision.
    return [str(opa_binary), "run", "--server", "--addr", addr, "--config-file", str(f.config),
            "--authentication=token", "--authorization=basic", "--bundle", "--watch",
            str(f.system_bundle), str(f.policy_bundle), "--skip-version-check", "--log-level", "error"]
