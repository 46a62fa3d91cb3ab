"""How the runtime runs OPA: its config (report every decision to the tap service) and argv."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

SERVICE_NAME = "greymesh-decision-log"


def opa_config(decision_log_url: str) -> dict[str, Any]:
    """OPA's config file content: report every decision to decision_log_url (the
    receiver's url) once a second, so records land within about two seconds."""
    return {
        "services": {SERVICE_NAME: {"url": decision_log_url}},
        "decision_logs": {
            "service": SERVICE_NAME,
            "reporting": {"min_delay_seconds": 1, "max_delay_seconds": 1},  # OPA's defaults: 300 and 600
        },
    }


def opa_argv(opa_binary: Path, addr: str, config_path: Path) -> list[str]:
    """`opa run --server` on addr (host:port, loopback only: OPA's REST API has no
    authentication here), reporting as config_path says.

    It starts with no policy, so every decision fails (closed) until the first
    `controlplane.policy.push`, which the runtime makes as soon as OPA answers (and again
    after OPA restarts, from the copy of the last push in the data dir).
    Loading the files at start instead would give the modules path-derived IDs that
    a push from another checkout could not replace."""
    host = addr.rpartition(":")[0].strip("[]")
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"OPA must listen on loopback, not {addr}")
    # --log-level error: at info OPA logs two lines per decision (unbounded, and ~20% of
    # its CPU per decision); the decision log already records every decision.
    return [str(opa_binary), "run", "--server", "--addr", addr, "--config-file", str(config_path),
            "--skip-version-check", "--log-level", "error"]
