"""The control-plane process: accepted spec -> snapshots -> ADS, plus a loopback admin API.

One asyncio loop owns all state.  A spec reaches it three ways, all through
:meth:`ControlPlane.apply`: the accepted copy in the data dir at start-up, `POST /apply`
(what `greymesh apply` calls), and the file watch that `greymesh up` asks for.  A spec
is validated and fully translated before anything is swapped in, so a refused spec
leaves every sidecar on the config it has.

Admin API (HTTP/JSON, loopback by default; every call but ``GET /healthz`` needs the
data dir's api token, see core/jsonhttp.py): ``GET /status``, ``POST /apply`` (body:
``{"spec": <mesh.yaml text>, "file": <its absolute path, optional>}``; 200 with the nodes
that changed, 400 with the problems), ``POST /placement`` (read placement.json again:
instances added, removed, serving or draining), ``POST /ca/rotate`` (rotate the mesh
root; 409 if a sidecar did not follow).  The applies journal records *who* offered each
spec from the credential that authenticated it ("cli"), or "startup"/"watch" for the
control plane's own reads, never from anything the request says about itself.

Overrides (controlplane/overrides.py: what they change, and the rule that keeps or clears
them on apply): ``GET /overrides`` -> ``{"services": [ServiceRouting]}``;
``PUT /overrides/<service>`` (body: an Override; ``by`` and ``created_at`` are set here from
the credential and the clock) -> 200 ``{"changed", "override", "acked_s"}`` or 400 with the
problems (nothing changed); ``DELETE /overrides/<service>`` (404 if there is none).  With
``?wait=1`` a PUT or DELETE answers once every changed sidecar has ACKed (504 naming the
laggards after OVERRIDE_ACK_TIMEOUT_S).  The API has two holders: the CLI and the actions
stage ("actions"), which may read status and set overrides but not apply, place or rotate.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import threading
import time
import urllib.parse
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from http.server import ThreadingHTTPServer
from pathlib import Path

from controlplane import policy
from controlplane.identity import CertificateAuthority, Svid, needs_renewal
from controlplane.meshspec import MeshSpec, parse_spec
from controlplane.overrides import Cleared, OverrideSet, merge, reconcile, routing
from controlplane.placement import Placement, placed_spec
from controlplane.translate import Identities, build_snapshots, service_identity
from controlplane.xds.ads import start_ads_server
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.snapshot import Snapshot
from controlplane.xds.status import NodeStatus
from core import jsonhttp
from core.contracts import Override
from core.credentials import CredentialError
from core.datadir import DataDir, write_atomic
from core.sidecar_auth import SidecarKey
from core.specread import Problem, SpecError

log = logging.getLogger("greymesh.controlplane")

WATCH_INTERVAL_S = 0.5
RENEW_CHECK_S = 1.0
POLICY_SYNC_S = 1.0
LIFETIME_SLACK = timedelta(seconds=1)  # certificates hold whole seconds
MAX_SPEC_BYTES = 16 * 1024 * 1024
MAX_APPLY_BODY_BYTES = MAX_SPEC_BYTES + 64 * 1024  # the spec as a JSON string, and its file name
STARTUP, WATCH = "startup", "watch"  # who applied a spec the control plane read itself
OVERRIDE_ACK_TIMEOUT_S = 10.0  # `?wait=1`: how long every changed sidecar has to ACK an override
OVERRIDES_PATH = "/overrides"
CLI_ONLY = ("/apply", "/placement", "/ca/rotate")  # the actions stage changes the mesh through overrides only


class RotationError(Exception):
    """A root rotation stopped; the message says where and what to do."""


class NotAcked(Exception):
    """Some sidecars did not ACK their new config in time; ``laggards`` names them."""

    def __init__(self, laggards: list[str], timeout_s: float):
        super().__init__(f"sidecar(s) {', '.join(laggards)} did not ACK the new config within {timeout_s:g} s; "
                         "the change is in force and they get it when they reconnect")
        self.laggards = laggards


@dataclass(frozen=True)
class OverrideChange:
    """An override set or cleared: the override (as kept, or as it was), the nodes whose config
    changed, and when the new snapshots were swapped in (wall clock)."""

    override: Override
    changed: tuple[str, ...]
    at: float


@dataclass(frozen=True)
class Applied:
    source: str  # where the spec came from: its file, or "<POST /apply>"
    sha256: str
    at: float
    mesh: str
    by: str  # who applied it: the authenticated principal, or STARTUP / WATCH


class ControlPlane:
    def __init__(self, dd: DataDir):
        self.dd = dd
        # Mints every sidecar's credentials (core/sidecar_auth.py); the runtime issues the same file.
        self.sidecar_key = SidecarKey.issue(dd)
        self.cache = SnapshotCache()
        self.nodes = NodeStatus()
        self.applied: Applied | None = None
        self.declared: MeshSpec | None = None  # the applied spec as written
        self.spec: MeshSpec | None = None  # ... with the instances the placement has
        self.placement: Placement | None = None
        self.last_rejected: dict | None = None
        self.overrides = self._load_overrides()
        self.svids: dict[str, Svid] = {}  # by node id
        self._cas: dict[str, CertificateAuthority] = {}  # by trust domain
        self._rotating = False  # a root rotation is under way: no routine renewals
        self._lock = asyncio.Lock()
        self._watching = False  # watch() runs

    async def apply(self, text: str, source: str, by: str) -> list[str]:
        """Validate, translate and swap in a spec; return the node ids whose config changed.

        ``source`` names where the text came from (errors cite it; an absolute path becomes
        the watched file); ``by`` is who offered it, as the journal records it.
        Raises SpecError (nothing changed) when the spec, or its placement, is refused.
        """
        async with self._lock:
            try:
                declared = parse_spec(text, source=source)
                spec, placement = self._placed(declared, source)
                overrides, cleared = reconcile(self.overrides, self.declared, declared, spec)
                snapshots = self._snapshots(spec, placement, overrides)
            except SpecError as exc:
                self.last_rejected = {"source": source, "by": by, "at": time.time(),
                                      "errors": str(exc).splitlines()}
                self._journal("rejected", source, by, text, errors=self.last_rejected["errors"])
                log.error("refused %s; the running config stays:\n%s", source, exc)
                raise
            # Overrides first: a crash before the spec is written loses a cleared override, never revives it.
            self._keep_overrides(overrides, cleared, by)
            changed = self._swap(snapshots)
            if source != str(self.dd.spec):
                write_atomic(self.dd.spec, text)
                if Path(source).is_absolute():  # `up FILE` / `apply FILE`: FILE is the one watched now
                    write_atomic(self.dd.spec_source, source)
            self.applied = Applied(source, _sha256(text), time.time(), spec.name, by)
            self.declared, self.spec, self.placement = declared, spec, placement
            self._journal("applied", source, by, text, changed=sorted(changed))
            log.info("applied %s (%s): %d sidecar(s) changed %s", source, self.applied.sha256[:12],
                     len(changed), sorted(changed))
            return sorted(changed)

    def _snapshots(self, spec: MeshSpec, placement: Placement, overrides: OverrideSet,
                   now: datetime | None = None) -> dict[str, Snapshot]:
        """Every sidecar's snapshot: the placed spec with the overrides merged (SpecError if they do not fit)."""
        return build_snapshots(merge(spec, overrides), placement, self._identities(spec, now), self.sidecar_key)

    def _load_overrides(self) -> OverrideSet:
        """The saved overrides; an unreadable file is set aside (and logged), never fatal."""
        try:
            return OverrideSet.load(self.dd.overrides)
        except ValueError as exc:
            aside = self.dd.overrides.with_name(f"{self.dd.overrides.name}.refused-{int(time.time())}")
            self.dd.overrides.replace(aside)
            log.error("%s; starting without overrides (the file is kept as %s)", exc, aside)
            return OverrideSet(self.dd.overrides)

    def _keep_overrides(self, overrides: OverrideSet, cleared: list[Cleared], by: str) -> None:
        """Make ``overrides`` the set in force (saved), journaling each of ``cleared``."""
        if overrides == self.overrides:
            return
        overrides.save()
        self.overrides = overrides
        for c in cleared:
            log.warning("cleared the override of %s (%s): %s", c.override.service, c.override.id, c.reason)
            self._journal("override-cleared", OVERRIDES_PATH, by, json.dumps(c.override.to_json(), sort_keys=True),
                          service=c.override.service, override=c.override.to_json(), reason=c.reason)

    async def put_override(self, override: Override, by: str) -> OverrideChange:
        """Merge ``override`` (in place of its service's) and swap the snapshots in; the change
        holds it as kept (``by``, ``created_at`` set here).  SpecError (nothing changed) if it
        does not fit the spec."""
        override = replace(override, by=by, created_at=time.time())
        async with self._lock:
            if self.spec is None or self.placement is None:
                raise SpecError(OVERRIDES_PATH, [Problem("overrides", "no spec applied yet: nothing to override")])
            overrides = self.overrides.put(override)
            snapshots = self._snapshots(self.spec, self.placement, overrides)
            self._keep_overrides(overrides, [], by)
            changed = sorted(self._swap(snapshots))
            at = time.time()
            self._journal("override", f"{OVERRIDES_PATH}/{override.service}", by,
                          json.dumps(override.to_json(), sort_keys=True), service=override.service,
                          override=override.to_json(), changed=changed)
        log.info("override of %s (%s) by %s: %d sidecar(s) changed %s", override.service, override.id, by,
                 len(changed), changed)
        return OverrideChange(override, tuple(changed), at)

    async def clear_override(self, service: str, by: str) -> OverrideChange:
        """Drop ``service``'s override (the change holds it as it was).  KeyError if it has none."""
        async with self._lock:
            override = self.overrides.get(service)
            if override is None or self.spec is None or self.placement is None:
                raise KeyError(service)
            overrides = self.overrides.without(service)
            snapshots = self._snapshots(self.spec, self.placement, overrides)
            self._keep_overrides(overrides, [], by)
            changed = sorted(self._swap(snapshots))
            at = time.time()
            self._journal("override-cleared", f"{OVERRIDES_PATH}/{service}", by,
                          json.dumps(override.to_json(), sort_keys=True), service=service,
                          override=override.to_json(), changed=changed)
        log.info("override of %s (%s) cleared by %s: %d sidecar(s) changed %s", service, override.id, by,
                 len(changed), changed)
        return OverrideChange(override, tuple(changed), at)

    async def wait_acked(self, nodes: tuple[str, ...], since: float, timeout_s: float) -> float:
        """Seconds from ``since`` (wall clock) until every one of ``nodes`` still in the mesh
        ACKed its current snapshot; NotAcked naming those that did not within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            snapshots = {n: s for n, s in self.cache.snapshots().items() if n in nodes}
            if not (lagging := self.nodes.lagging(snapshots)):
                synced = [self.nodes.synced_at(n, s) or since for n, s in snapshots.items()]
                return max([0.0, *(t - since for t in synced)])
            if time.monotonic() > deadline:
                raise NotAcked(sorted(lagging), timeout_s)
            await asyncio.sleep(0.02)

    def service_routing(self) -> dict:
        """``GET /overrides``: every service with subsets or a split, and its override."""
        if self.spec is None or self.placement is None:
            return {"services": []}
        return {"services": [r.to_json() for r in routing(self.spec, self.placement, self.overrides)]}

    def _swap(self, snapshots: dict[str, Snapshot]) -> list[str]:
        """Install a complete set of snapshots; return the nodes whose config changed."""
        changed = [node for node, snap in snapshots.items() if self.cache.set_snapshot(node, snap)]
        for gone in set(self.cache.node_ids()) - snapshots.keys():
            self.cache.clear(gone)
            self.nodes.forget(gone)
            self.svids.pop(gone, None)
            changed.append(gone)
        return changed

    def _identities(self, spec: MeshSpec, now: datetime | None = None) -> Identities:
        """An SVID for every node, issuing those that are missing, due for renewal or stale.

        While the root rotates, only missing SVIDs are issued: a renewal would be signed
        by a root some peers may not trust yet.  The CA of each trust domain lives in
        its own 0700 directory under the data dir.
        """
        now = now or datetime.now(UTC)
        td = spec.identity.trust_domain
        ca = self._cas.get(td)
        if ca is None:
            ca = self._cas[td] = CertificateAuthority.load_or_create(self.dd.root / "ca" / td, td)
        lifetime = timedelta(seconds=spec.identity.svid_lifetime_s)
        for svc in spec.services:
            wanted = service_identity(spec, svc)
            # The entrypoint's SVID also serves its ingress, unless the spec gives a certificate.
            hosts = spec.ingress.hosts if svc.name == spec.entrypoint and spec.ingress.tls is None else ()
            for inst in svc.instances:
                svid = self.svids.get(inst.name)
                lifetime_changed = abs(svid.not_after - svid.issued_at - lifetime) > LIFETIME_SLACK if svid else False
                due = not self._rotating and (needs_renewal(svid, now) or lifetime_changed) if svid else False
                if svid is None or svid.spiffe_id != wanted or svid.hosts != hosts or due:
                    self.svids[inst.name] = ca.issue(wanted, lifetime, now, hosts)
        return Identities(svids=dict(self.svids), bundle_pem=ca.trust_bundle_pem())

    async def renew(self) -> None:
        """Re-issue SVIDs at half-life, forever; only the renewed sidecars get a push (SDS)."""
        while True:
            spec = self.spec
            interval = RENEW_CHECK_S if spec is None else min(RENEW_CHECK_S, spec.identity.svid_lifetime_s / 10)
            await asyncio.sleep(interval)
            now = datetime.now(UTC)
            if spec is None or self._rotating or not any(needs_renewal(s, now) for s in self.svids.values()):
                continue
            async with self._lock:
                try:
                    changed = self._swap(self._snapshots(self.spec, self.placement, self.overrides, now))
                except Exception:  # keep serving the current SVIDs; try again next round
                    log.exception("SVID renewal failed")
                    continue
            log.info("renewed SVIDs of %d sidecar(s)", len(changed))

    async def rotate_root(self, timeout_s: float = 60.0) -> dict:
        """Replace the trust domain's root without breaking a handshake (docs/identity.md).

        Three pushes, each waiting until every sidecar has ACKed: the new root joins
        every trust bundle; every SVID is re-issued from it; the old root leaves the
        bundles.  If a sidecar does not ACK in time this stops with an error, in a state
        where both roots are trusted (safe), and can simply be run again.
        """
        if self.spec is None:
            raise RotationError("no mesh spec applied yet: nothing to rotate")
        ca = self._cas[self.spec.identity.trust_domain]
        self._rotating = True
        try:
            async with self._lock:
                root = ca.rotate_root()
                self._rebuild()
            await self._all_acked(timeout_s, "the bundle with the new root")
            async with self._lock:
                self.svids.clear()  # every SVID again, now signed by the new root
                self._rebuild()
            await self._all_acked(timeout_s, "SVIDs signed by the new root")
            async with self._lock:
                retired = ca.retire_roots(self.svids.values())
                self._rebuild()
            await self._all_acked(timeout_s, "the bundle without the old root")
        finally:
            self._rotating = False
        log.info("rotated the root of %s: new root serial %x, %d old root(s) retired",
                 ca.trust_domain, root.serial_number, len(retired))
        return {"trust_domain": ca.trust_domain, "new_root_serial": f"{root.serial_number:x}",
                "retired_roots": [f"{r.serial_number:x}" for r in retired], "sidecars": len(self.svids)}

    def _rebuild(self) -> list[str]:
        return self._swap(self._snapshots(self.spec, self.placement, self.overrides))

    async def _all_acked(self, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while lagging := self.nodes.lagging(self.cache.snapshots()):
            if time.monotonic() > deadline:
                raise RotationError(
                    f"sidecar(s) {', '.join(sorted(lagging))} did not ACK {what} within {timeout_s:.0f}s. Both roots "
                    "are still trusted, so nothing is broken: bring those sidecars back, then rotate again")
            await asyncio.sleep(0.05)

    def _placed(self, declared: MeshSpec, source: str) -> tuple[MeshSpec, Placement]:
        """The spec with the instances the placement has (placed_spec); SpecError if they disagree."""
        placement = Placement.load(self.dd.placement)
        spec, problems = placed_spec(declared, placement)
        if problems:
            raise SpecError(source, [Problem("services", p) for p in problems])
        return spec, placement

    async def replace_placement(self, by: str) -> list[str]:
        """Read placement.json again (instances added, removed, serving or not); return the
        nodes whose config changed.  SpecError (nothing changed) if it does not fit the spec.
        ``by`` (who asked) is journaled with any override the new placement clears."""
        if self.declared is None:
            raise SpecError(str(self.dd.placement), [Problem("services", "no spec applied yet")])
        async with self._lock:
            spec, placement = self._placed(self.declared, str(self.dd.placement))
            overrides, cleared = reconcile(self.overrides, self.declared, self.declared, spec)
            snapshots = self._snapshots(spec, placement, overrides)
            self._keep_overrides(overrides, cleared, by)
            changed = self._swap(snapshots)
            self.spec, self.placement = spec, placement
        log.info("placement changed: %d sidecar(s) get new config %s", len(changed), sorted(changed))
        return sorted(changed)

    def _journal(self, outcome: str, file: str, by: str, text: str, **extra: object) -> None:
        """Append-only record of every spec offered to the control plane: ``source`` is who
        offered it (an authenticated principal, or STARTUP / WATCH), ``file`` where it came from."""
        entry = {"at": time.time(), "outcome": outcome, "source": by, "file": file, "sha256": _sha256(text),
                 **extra}
        with open(self.dd.applies_journal, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")

    def status(self) -> dict:
        snapshots = self.cache.snapshots()
        nodes = self.nodes.status(snapshots)
        for node, snap in snapshots.items():
            entry = nodes.setdefault(node, {"connected": 0, "in_sync": False, "types": {}})
            entry["snapshot_version"] = snap.version_key
        for svc in self.spec.services if self.spec else ():
            for inst in svc.instances:
                if inst.name in nodes:
                    nodes[inst.name].update(service=svc.name, fail_open=svc.fail_open)
        watched = self.watched()
        return {
            "spec": vars(self.applied) if self.applied else None,
            "watching": str(watched) if watched and self._watching else None,
            "last_rejected": self.last_rejected,
            "overrides": [o.to_json() for o in self.overrides],
            "nodes": nodes,
        }

    def watched(self) -> Path | None:
        """The spec file `up FILE` or `apply FILE` named last (the data dir's spec-source)."""
        try:
            return Path(self.dd.spec_source.read_text(encoding="utf-8").strip())
        except OSError:
            return None

    async def watch(self) -> None:
        """Apply the watched file whenever its content changes; a bad edit is logged and skipped.

        The rule (docs/ARCHITECTURE.md, "One spec"): the spec that runs is the data dir's
        mesh.yaml, the last one accepted; the file watched is the one `up FILE` or
        `apply FILE` named last, so an apply moves the watch with it."""
        self._watching = True
        last_seen: str | None = None
        watching: Path | None = None
        while True:
            path = self.watched()
            if path != watching:
                watching, last_seen = path, None
            if path is None:
                await asyncio.sleep(WATCH_INTERVAL_S)
                continue
            try:
                sha = _sha256(text := path.read_text(encoding="utf-8"))
            except OSError as exc:
                if last_seen != "unreadable":
                    log.warning("cannot read watched spec %s (%s); keeping the running config", path, exc.strerror)
                last_seen = "unreadable"
            else:
                if sha != last_seen and (self.applied is None or sha != self.applied.sha256):
                    try:
                        await self.apply(text, str(path), WATCH)
                    except SpecError:
                        pass  # logged and shown in status by apply()
                    except Exception:  # a bug must not stop the watch, nor the daemon
                        log.exception("could not apply %s; the running config stays", path)
                last_seen = sha
            await asyncio.sleep(WATCH_INTERVAL_S)


def admin_access(api_token: Path, actions_token: Path | None = None) -> jsonhttp.Access:
    """Who may call the admin API: the CLI everywhere; the actions stage (its token file, when
    given) everywhere but CLI_ONLY.  credentials.CredentialError if a file is missing or open."""
    holders = [jsonhttp.Credential.load(jsonhttp.CLI, api_token)]
    if actions_token is not None:
        holders.append(jsonhttp.Credential.load(jsonhttp.ACTIONS, actions_token))
    return jsonhttp.Access(tuple(holders), MAX_APPLY_BODY_BYTES,
                           only={path: frozenset({jsonhttp.CLI}) for path in CLI_ONLY})


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def admin_server(cp: ControlPlane, loop: asyncio.AbstractEventLoop, host: str, port: int,
                  access: jsonhttp.Access) -> ThreadingHTTPServer:
    """A tiny HTTP server on its own thread; every request is handled on the control loop."""

    class Handler(jsonhttp.ApiHandler):
        log = log

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/status":
                self.send_json(200, asyncio.run_coroutine_threadsafe(_call(cp.status), loop).result(10))
            elif self.path == OVERRIDES_PATH:
                self.send_json(200, asyncio.run_coroutine_threadsafe(_call(cp.service_routing), loop).result(10))
            else:
                self.send_json(404, {"errors": [f"no such endpoint {self.path}; try /status or {OVERRIDES_PATH}"]})

        def do_PUT(self) -> None:  # noqa: N802
            body = self.read_body()
            if (target := _override_target(self.path)) is None:
                self.send_json(404, {"errors": [f"no such endpoint {self.path}; try PUT {OVERRIDES_PATH}/<service>"]})
                return
            service, wait = target
            try:
                override = _override_request(body, service)
            except ValueError as exc:
                self.send_json(400, {"errors": [str(exc)]})
                return
            try:
                change = asyncio.run_coroutine_threadsafe(cp.put_override(override, self.principal), loop).result(60)
            except SpecError as exc:
                self.send_json(400, {"errors": str(exc).splitlines()})
                return
            except Exception as exc:
                log.exception("could not set the override of %s", service)
                self.send_json(500, {"errors": [f"internal error, the running config stays: {exc!r}"]})
                return
            self._answer(change, wait)

        def do_DELETE(self) -> None:  # noqa: N802
            self.read_body()
            if (target := _override_target(self.path)) is None:
                self.send_json(404, {"errors": [f"no such endpoint {self.path}; "
                                                f"try DELETE {OVERRIDES_PATH}/<service>"]})
                return
            service, wait = target
            try:
                change = asyncio.run_coroutine_threadsafe(cp.clear_override(service, self.principal), loop).result(60)
            except KeyError:
                self.send_json(404, {"errors": [f"{service} has no override"]})
                return
            self._answer(change, wait)

        def _answer(self, change: OverrideChange, wait: bool) -> None:
            """200 with the change; with ``wait``, once every changed sidecar ACKed it (504 if one did not)."""
            answer = {"changed": list(change.changed), "override": change.override.to_json(), "acked_s": None}
            if wait:
                try:
                    answer["acked_s"] = asyncio.run_coroutine_threadsafe(
                        cp.wait_acked(change.changed, change.at, OVERRIDE_ACK_TIMEOUT_S),
                        loop).result(OVERRIDE_ACK_TIMEOUT_S + 10)
                except NotAcked as exc:
                    self.send_json(504, {"errors": [str(exc)], "laggards": exc.laggards, **answer})
                    return
            self.send_json(200, answer)

        def do_POST(self) -> None:  # noqa: N802
            body = self.read_body()  # every POST's, so a keep-alive stream stays in step
            if self.path == "/ca/rotate":
                try:
                    self.send_json(200, asyncio.run_coroutine_threadsafe(cp.rotate_root(), loop).result(300))
                except RotationError as exc:
                    self.send_json(409, {"errors": [str(exc)]})
                return
            if self.path == "/placement":
                try:
                    changed = asyncio.run_coroutine_threadsafe(cp.replace_placement(self.principal), loop).result(60)
                except SpecError as exc:
                    self.send_json(400, {"errors": str(exc).splitlines()})
                else:
                    self.send_json(200, {"changed": changed})
                return
            if self.path != "/apply":
                self.send_json(404, {"errors": [f"no such endpoint {self.path}; try POST /apply, /placement or "
                                                "/ca/rotate"]})
                return
            try:
                text, source = _apply_request(body)
            except ValueError as exc:
                self.send_json(400, {"errors": [str(exc)]})
                return
            try:
                changed = asyncio.run_coroutine_threadsafe(cp.apply(text, source, self.principal), loop).result(60)
            except SpecError as exc:
                self.send_json(400, {"errors": str(exc).splitlines()})
            except Exception as exc:
                log.exception("could not apply %s", source)
                self.send_json(500, {"errors": [f"internal error, the running config stays: {exc!r}"]})
            else:
                self.send_json(200, {"changed": changed})

    server = jsonhttp.serve(Handler, host, port, access)
    threading.Thread(target=server.serve_forever, name="admin-http", daemon=True).start()
    return server


def _apply_request(body: bytes) -> tuple[str, str]:
    """(spec text, its source) of a POST /apply body; ValueError saying what to send."""
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise ValueError(f'send {{"spec": "<mesh.yaml text>", "file": "/abs/path.yaml"}}: {exc}') from None
    spec, file = (doc.get("spec"), doc.get("file")) if isinstance(doc, dict) else (None, None)
    if not isinstance(spec, str):
        raise ValueError('send {"spec": "<mesh.yaml text>"}: "spec" must be the spec as a string')
    if file is not None and not (isinstance(file, str) and Path(file).is_absolute()):
        raise ValueError(f'"file": {file!r} must be the absolute path the spec was read from')
    if len(spec.encode()) > MAX_SPEC_BYTES:
        raise ValueError(f"the spec is {len(spec.encode())} bytes; the limit is {MAX_SPEC_BYTES}")
    return spec, file or "<POST /apply>"


def _override_target(path: str) -> tuple[str, bool] | None:
    """(service, wait) of ``/overrides/<service>[?wait=1]``; None for any other path."""
    url = urllib.parse.urlsplit(path)
    prefix = OVERRIDES_PATH + "/"
    service = url.path[len(prefix):] if url.path.startswith(prefix) else ""
    if not service or "/" in service:
        return None
    return urllib.parse.unquote(service), urllib.parse.parse_qs(url.query).get("wait") == ["1"]


def _override_request(body: bytes, service: str) -> Override:
    """The Override a PUT body asks for; ValueError naming what is wrong.  ``by`` and
    ``created_at`` are the control plane's to set, so whatever the body says of them is dropped."""
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise ValueError(f'send an override as JSON, e.g. {{"id": "...", "reason": "...", "weights": '
                         f'{{"v1": 90, "v2": 10}}}}: {exc}') from None
    if not isinstance(doc, dict):
        raise ValueError('an override is a JSON object: {"id": ..., "reason": ..., "weights": {...}}')
    if doc.setdefault("service", service) != service:
        raise ValueError(f"service: the body names {doc['service']!r} but the path {service!r}")
    doc.pop("by", None)
    doc.pop("created_at", None)
    return Override.from_json(doc)


async def _call(fn):  # run a sync method on the loop thread
    return fn()


async def sync_policy_data(cp: ControlPlane, opa: policy.OpaApi) -> None:
    """Keep OPA's copy of the mesh (identities, tags, who calls whom) equal to the spec's.

    Checked every second rather than pushed once, because OPA keeps data in memory:
    after OPA restarts, its data comes back from here (and its policy from the runtime).
    """
    pushed_for: MeshSpec | None = None
    while True:
        spec = cp.spec
        if spec is not None:
            desired = policy.mesh_data(spec)
            try:
                if spec is not pushed_for or await asyncio.to_thread(policy.running_mesh_data, opa) != desired:
                    await asyncio.to_thread(policy.push_mesh_data, opa, desired)
                    log.info("pushed mesh data for %d services to OPA", len(desired["services"]))
                    pushed_for = spec
            except (policy.OpaUnavailable, policy.PolicyError) as exc:
                if pushed_for is not None:
                    log.warning("cannot sync mesh data to OPA at %s: %s", opa.url, exc)
                pushed_for = None
        await asyncio.sleep(POLICY_SYNC_S)


async def run(
    dd: DataDir, *, host: str, xds_port: int, admin_port: int, watch: bool, opa_port: int | None = None,
    opa_token: Path | None = None, api_token: Path, actions_token: Path | None = None,
) -> None:
    """Serve until cancelled; the admin API accepts the CLI's token (file ``api_token``) and,
    given ``actions_token``, the actions stage's, which may not apply, place or rotate."""
    access = admin_access(api_token, actions_token)
    cp = ControlPlane(dd)
    if dd.spec.exists():
        await cp.apply(dd.spec.read_text(encoding="utf-8"), str(dd.spec), STARTUP)
    background = [asyncio.create_task(cp.renew())]
    if opa_port is not None:
        if opa_token is None:
            raise CredentialError("--opa-port needs --opa-token-file: OPA refuses requests without a token")
        opa = policy.OpaApi.with_token_file(f"http://{host}:{opa_port}", opa_token)
        background.append(asyncio.create_task(sync_policy_data(cp, opa)))
    ads = await start_ads_server(cp.cache, cp.nodes, host, xds_port, cp.sidecar_key.tokens("xds"))
    admin = admin_server(cp, asyncio.get_running_loop(), host, admin_port, access)
    log.info("control plane up: xDS %s:%d, admin http://%s:%d", host, xds_port, host, admin_port)
    try:
        if watch:
            await cp.watch()
        else:
            await asyncio.Event().wait()
    finally:
        for task in background:
            task.cancel()
        admin.shutdown()
        await ads.stop(grace=1)


def main(argv: list[str] | None = None) -> int:
    """`python -m controlplane.daemon`: the control-plane process (a workload of the runtime)."""
    p = argparse.ArgumentParser(prog="python -m controlplane.daemon", description="Run the greymesh control plane.")
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1", help="address for xDS and admin (default: loopback)")
    p.add_argument("--xds-port", type=int, required=True)
    p.add_argument("--admin-port", type=int, required=True)
    p.add_argument("--watch", action="store_true",
                   help="apply the spec file named in the data dir's spec-source whenever it changes")
    p.add_argument("--opa-port", type=int, help="keep this OPA's mesh data in sync with the spec")
    p.add_argument("--opa-token-file", type=Path, help="the secret file (0600) of the control plane's token for OPA")
    p.add_argument("--api-token-file", type=Path, required=True,
                   help="the secret file (0600) of the CLI's token for the admin API")
    p.add_argument("--actions-token-file", type=Path,
                   help="the secret file (0600) of the actions stage's token: it may read status and set overrides")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(run(DataDir(args.data_dir), host=args.host, xds_port=args.xds_port, admin_port=args.admin_port,
                        watch=args.watch, opa_port=args.opa_port, opa_token=args.opa_token_file,
                        api_token=args.api_token_file, actions_token=args.actions_token_file))
    except KeyboardInterrupt:
        pass
    except CredentialError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
