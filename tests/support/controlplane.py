"""An in-process control plane as its daemon runs it: a ControlPlane over a data dir (spec,
placement, the CLI's and the actions stage's tokens), its ADS server and its admin API on
loopback.  Used by tests/test_overrides.py and the attacks of tests/test_security_api.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from controlplane.daemon import STARTUP, ControlPlane, admin_access, admin_server
from controlplane.meshspec import MeshSpec, parse_spec
from controlplane.placement import Placement, SidecarPorts
from controlplane.xds.ads import start_ads_server
from core import credentials
from core.datadir import DataDir, write_atomic
from core.jsonhttp import ACTIONS, CLI
from core.sidecar_auth import SidecarIdentity
from tests.support.adsclient import SimulatedEnvoy

HOST = "127.0.0.1"
ACTIONS_TOKEN_FILE = "test-actions.token"  # the test issues it; the daemon is given its path, as from the runtime


def placement_of(spec: MeshSpec, not_serving: tuple[str, ...] = ()) -> Placement:
    """Every instance of ``spec`` placed (ports made up: nothing listens on them), serving
    but those named in ``not_serving``."""
    names = [(s.name, i) for s in spec.services for i in s.instances]
    return Placement(HOST, {i.name: SidecarPorts(app=22000 + 5 * k, inbound=22001 + 5 * k, outbound=22002 + 5 * k,
                                                 ingress=22003 + 5 * k, admin=22004 + 5 * k, service=svc,
                                                 subset=i.subset, serving=i.name not in not_serving)
                            for k, (svc, i) in enumerate(names)})


def prepare(root: Path, spec_text: str) -> DataDir:
    """A data dir holding ``spec_text`` as the accepted spec and a placement of its instances,
    as `greymesh up` leaves it."""
    dd = DataDir(root).create()
    write_atomic(dd.placement, placement_of(parse_spec(spec_text)).to_json())
    write_atomic(dd.spec, spec_text)
    return dd


@dataclass
class AdminPlane:
    cp: ControlPlane
    dd: DataDir
    url: str  # the admin API, e.g. http://127.0.0.1:PORT
    ads: str  # the ADS target
    tokens: dict[str, str]  # principal -> its bearer token

    def envoy(self, node: str, service: str) -> SimulatedEnvoy:
        """A simulated sidecar of ``node`` holding its own xDS credential (use it with ``async with``)."""
        token = self.cp.sidecar_key.tokens("xds").mint(SidecarIdentity(node, service))
        return SimulatedEnvoy(node, self.ads, "delta", token=token)

    async def call(self, method: str, path: str, doc: object = None, principal: str | None = CLI,
                   headers: dict[str, str] | None = None) -> tuple[int, dict]:
        """(status, JSON answer) of one request to the admin API, sent from a thread (the
        API answers on this loop)."""
        body = None if doc is None else (doc if isinstance(doc, bytes) else json.dumps(doc).encode())
        hdrs = {"Content-Type": "application/json"} if body is not None else {}
        if principal is not None:
            hdrs["Authorization"] = f"Bearer {self.tokens[principal]}"
        return await asyncio.to_thread(request, self.url + path, body, hdrs | (headers or {}), method)


def request(url: str, body: bytes | None, headers: dict[str, str], method: str) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@contextlib.asynccontextmanager
async def admin_plane(dd: DataDir) -> AsyncIterator[AdminPlane]:
    """The control plane of ``dd`` started as the daemon starts it (the accepted spec applied
    by STARTUP), with ADS and the admin API (both holders) on loopback ports of their own."""
    tokens = {CLI: credentials.issue(dd.api_token), ACTIONS: credentials.issue(dd.secret(ACTIONS_TOKEN_FILE))}
    cp = ControlPlane(dd)
    await cp.apply(dd.spec.read_text(encoding="utf-8"), str(dd.spec), STARTUP)
    ads = await start_ads_server(cp.cache, cp.nodes, HOST, 0, cp.sidecar_key.tokens("xds"))
    access = admin_access(dd.api_token, dd.secret(ACTIONS_TOKEN_FILE))
    admin = admin_server(cp, asyncio.get_running_loop(), HOST, 0, access)
    try:
        yield AdminPlane(cp, dd, f"http://{HOST}:{admin.server_address[1]}", f"{HOST}:{ads.port}", tokens)
    finally:
        await asyncio.to_thread(admin.shutdown)
        admin.server_close()
        await ads.stop(None)
