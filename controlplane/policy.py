"""The authorization policy's lifecycle against a running OPA: test, push, diff, evaluate.

OPA compiles whatever module it is handed, so a broken or untested policy would go
live the moment it reached OPA.  :func:`push` is the gate.  It runs ``opa check`` and
``opa test`` on the local files and only then gives OPA the modules, as one *bundle*
(a tar.gz OPA loads from the data dir and reloads when it changes, ``opa run --bundle
--watch``): OPA swaps all modules at once or, if it cannot activate the bundle, keeps
the old ones, and push puts the previous file back.  Every attempt, refused ones too, is
appended to a JSONL journal.  The bundle's ``.manifest`` revision is the policy's sha256
(:func:`policy_hash`); OPA reports the revision of what it loaded with every decision
(decision logs: ``bundles``; the data API: ``provenance``), so the hash a decision carries
is OPA's account of what ran, which no rule of the policy can change.  The bundle file is
also the copy a restarted OPA loads at start.

OPA's REST API refuses every request without a token (policies/system/authz.rego): the
control plane's token reads what runs, syncs the mesh data and asks decisions; nobody
writes a policy through the API.

The mesh itself (who may call whom, SPIFFE IDs, tags) reaches the policy as data at
``data.greymesh.mesh``: see :func:`mesh_data` and policies/README.md for its shape.

The REST API is spoken through core.jsonhttp; ``check`` and ``test`` exist only in the
``opa`` binary.
"""

from __future__ import annotations

import argparse
import difflib
import getpass
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from controlplane.identity import spiffe_id
from controlplane.meshspec import MeshSpec
from core import credentials, jsonhttp
from core.contracts import DECISION_PATH, MESH_DATA_PATH, policy_hash_of
from core.errors import GreymeshError, InputError
from core.installs import opa_binary

POLICY_DIR = Path(__file__).resolve().parents[1] / "policies"
# Under a policy dir: OPA's own authorization policy, which the runtime loads when it starts
# OPA (greymesh/runtime/opa.py); it is tested with the rest but never pushed.
SYSTEM_DIR = "system"
JOURNAL_VERSION = 1
TEST_SUFFIX = "_test.rego"
OPA_TIMEOUT_S = 10.0
OPA_CLI_TIMEOUT_S = 120.0
BUNDLE_LOAD_TIMEOUT_S = 5.0  # OPA reloads a changed bundle in ~20 ms
# Data paths no pushed module may own: the system bundle's (OPA's authorization and the
# clients' token digests), OPA's own bundle records, and the mesh data the control plane writes.
RESERVED_ROOTS = ("system/authz", "system/greymesh", "system/bundles", MESH_DATA_PATH)
# The roots of the bundle the runtime puts in place before anything was pushed: it holds no
# module, so OPA starts deciding nothing (every request denied) until the first push.
PLACEHOLDER_ROOTS = (DECISION_PATH.rsplit("/", 1)[0],)
_PACKAGE = re.compile(r"^package\s+([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\s*(?:#.*)?$", re.MULTILINE)


class PolicyError(InputError):
    """A policy or mesh document was refused; the message says why, with file and line when known."""


class OpaUnavailable(GreymeshError):
    """OPA could not be asked (not running, not reachable, or it failed)."""


@dataclass(frozen=True)
class OpaApi:
    """OPA's REST API at ``url`` (http://host:port) and the bearer token this client presents."""

    url: str
    token: str = field(repr=False)

    @classmethod
    def with_token_file(cls, url: str, path: Path) -> OpaApi:
        """The API at url with the token in the secret file at path (CredentialError if unreadable)."""
        return cls(url, credentials.read(path))


@dataclass(frozen=True)
class Module:
    """One policy file: `name` is its path under the policy dir (and in the bundle)."""

    name: str
    text: str


@dataclass(frozen=True)
class PushResult:
    policy_hash: str
    modules: tuple[str, ...]  # module names, as under the policy dir
    pushed_by: str
    pushed_at: str  # RFC 3339, UTC


# --- local files ------------------------------------------------------------------


def load_policy(policy_dir: Path) -> tuple[Module, ...]:
    """The policy modules under policy_dir: tests (run, not deployed) and the system dir
    (OPA's own authorization, loaded by the runtime) excluded."""
    files = sorted(p for p in policy_dir.rglob("*.rego")
                   if not p.name.endswith(TEST_SUFFIX) and p.relative_to(policy_dir).parts[0] != SYSTEM_DIR)
    if not files:
        raise PolicyError(f"{policy_dir}: no policy modules (*.rego other than *{TEST_SUFFIX} and {SYSTEM_DIR}/)")
    return tuple(Module(p.relative_to(policy_dir).as_posix(), p.read_text(encoding="utf-8")) for p in files)


def policy_hash(modules: tuple[Module, ...]) -> str:
    """sha256 over each module's name and text: the same files give the same hash in any checkout."""
    h = hashlib.sha256()
    for m in sorted(modules, key=lambda m: m.name):
        h.update(m.name.encode() + b"\0" + m.text.encode() + b"\0")
    return h.hexdigest()


def bundle_roots(modules: tuple[Module, ...], policy_dir: Path) -> list[str]:
    """The data paths the bundle owns: its modules' packages (OPA refuses a module outside
    its bundle's roots).  PolicyError for a package that would own a reserved path."""
    packages: set[str] = set()
    for m in modules:
        found = _PACKAGE.search(m.text)
        if found is None:
            raise PolicyError(f"{policy_dir}/{m.name}: no `package a.b.c` line (a dotted package name is needed)")
        packages.add(found[1].replace(".", "/"))
    for root in sorted(packages):
        for reserved in RESERVED_ROOTS:
            if root == reserved or reserved.startswith(root + "/") or root.startswith(reserved + "/"):
                name = next(m.name for m in modules if (f := _PACKAGE.search(m.text)) and f[1] == root.replace("/", "."))
                raise PolicyError(f"{policy_dir}/{name}: package {root.replace('/', '.')} would own "
                                  f"data.{reserved.replace('/', '.')}, which is not the policy's; "
                                  "use another package (e.g. greymesh.authz)")
    # OPA refuses overlapping roots within a manifest: a package inside another is covered by it.
    return sorted(r for r in packages if not any(r.startswith(o + "/") for o in packages))


def bundle_bytes(modules: tuple[Module, ...], manifest: Mapping[str, Any]) -> bytes:
    """The bundle (tar.gz) of the modules, each at its name, with manifest as its .manifest."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in ((".manifest", json.dumps(manifest).encode()), *((m.name, m.text.encode()) for m in modules)):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o600, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def placeholder_bundle(bundle: Path) -> None:
    """Put an empty bundle (revision "", no module) at ``bundle`` unless one is there, so
    OPA can start with it; the first push (the runtime's, :func:`restore`) replaces it."""
    if not bundle.exists():
        _write_bundle(bundle, bundle_bytes((), {"revision": "", "roots": list(PLACEHOLDER_ROOTS)}))


def _write_bundle(bundle: Path, data: bytes) -> None:
    """Replace the bundle in one rename (OPA reloads the old file or the new one, never half)."""
    bundle.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=bundle.parent, prefix=".bundle-")  # 0600; OPA loads only `bundle`
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, bundle)


# --- the opa binary ---------------------------------------------------------------


def _opa_cli(*args: str) -> subprocess.CompletedProcess[str]:
    binary = opa_binary()
    try:
        return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=OPA_CLI_TIMEOUT_S)
    except FileNotFoundError:
        raise OpaUnavailable(f"no OPA binary at {binary}: run deploy/install.sh (or set GREYMESH_OPA)") from None


def run_tests(policy_dir: Path, *, verbose: bool = True) -> tuple[bool, str]:
    """Run the policy's unit tests (`opa test -v`); (all passed, OPA's report).
    verbose=False reports only failures, without traces: short enough for an error message."""
    proc = _opa_cli("test", *(["-v"] if verbose else []), str(policy_dir))
    return proc.returncode == 0, proc.stdout + proc.stderr


def check(policy_dir: Path) -> None:
    """Compile every module, tests included, as `opa check` does; raise PolicyError
    with OPA's messages (file:line: code: message) if anything does not compile."""
    proc = _opa_cli("check", str(policy_dir))
    if proc.returncode != 0:
        raise PolicyError(f"{policy_dir} does not compile:\n{(proc.stderr or proc.stdout).strip()}")


# --- OPA's REST API ---------------------------------------------------------------


def _rest(api: OpaApi, path: str, body: dict | None = None, *, method: str | None = None) -> dict:
    """One request to OPA's REST API with the client's token; failures become OpaUnavailable."""
    try:
        return jsonhttp.call(f"{api.url}{path}", body, token=api.token, method=method, timeout_s=OPA_TIMEOUT_S)
    except jsonhttp.ApiError as exc:
        if exc.status == 401:
            raise OpaUnavailable(f"OPA at {api.url} refused {method or 'GET'} {path.split('?')[0]}: this client's "
                                 "token is not one OPA's authorization policy allows there") from None
        raise OpaUnavailable(f"OPA at {api.url} failed {method or 'GET'} {path.split('?')[0]}: {exc}") from None
    except jsonhttp.Unreachable as exc:
        raise OpaUnavailable(f"OPA at {api.url} unreachable or failing: {exc}") from None


def running_manifest(api: OpaApi, bundle: Path) -> dict[str, Any]:
    """The manifest of the bundle at ``bundle`` as OPA activated it; OpaUnavailable when OPA
    was not started with that bundle (it would never see a push there)."""
    bundles = _rest(api, "/v1/data/system/bundles").get("result") or {}
    for name, info in bundles.items():
        if Path(name).resolve() == bundle.resolve():
            return dict(info.get("manifest") or {})
    raise OpaUnavailable(f"OPA at {api.url} does not load the policy bundle {bundle} (it loads "
                         f"{', '.join(sorted(bundles)) or 'none'}); is this the data dir of the mesh that runs it?")


def _running_modules(api: OpaApi, bundle: Path) -> dict[str, str]:
    """The modules OPA runs from the bundle: {name: text}.  A bundle's module ID is its path
    in the bundle after the bundle's name, which is the path OPA was given."""
    prefixes = (f"{bundle}/", f"{bundle.resolve()}/")
    running = {}
    for policy in _rest(api, "/v1/policies").get("result") or []:
        pid = policy.get("id", "")
        if prefix := next((p for p in prefixes if pid.startswith(p)), None):
            running[pid.removeprefix(prefix)] = policy.get("raw", "")
    return running


def _journal(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"version": JOURNAL_VERSION, **record}) + "\n")


def push(api: OpaApi, bundle: Path, policy_dir: Path, *, actor: str, journal_path: Path) -> PushResult:
    """Test the local policy and make it the one OPA runs, from the bundle file ``bundle``.

    Refuses (PolicyError; nothing in OPA changes) a policy that does not compile, whose
    tests fail, whose package would own a reserved path, or that OPA does not activate
    (the previous bundle file is put back).  Returns once OPA runs the pushed revision.
    Every attempt is journalled: who, when, the policy's sha256 and the outcome."""
    policy_dir = Path(policy_dir)
    pushed_at = datetime.now(UTC).isoformat(timespec="seconds")
    record: dict[str, Any] = {"at": pushed_at, "actor": actor, "opa": api.url,
                              "policy_dir": str(policy_dir.resolve())}
    try:
        modules = load_policy(policy_dir)
        record |= {"sha256": policy_hash(modules), "modules": [m.name for m in modules]}
        roots = bundle_roots(modules, policy_dir)
        check(policy_dir)
        ok, report = run_tests(policy_dir, verbose=False)
        if not ok:
            raise PolicyError(f"{policy_dir}: the policy's tests fail:\n{report.strip()}")
        manifest = {"revision": record["sha256"], "roots": roots,
                    "metadata": {"pushed_by": actor, "pushed_at": pushed_at}}
        _activate(api, bundle, bundle_bytes(modules, manifest), manifest)
    except (PolicyError, OpaUnavailable) as exc:
        outcome = "refused" if isinstance(exc, PolicyError) else "failed"
        _journal(journal_path, record | {"outcome": outcome, "error": str(exc)})
        raise
    _journal(journal_path, record | {"outcome": "pushed"})
    return PushResult(record["sha256"], tuple(record["modules"]), actor, pushed_at)


def _activate(api: OpaApi, bundle: Path, data: bytes, manifest: Mapping[str, Any]) -> None:
    """Write the bundle and wait until OPA runs it; put the previous file back if OPA does not."""
    running_manifest(api, bundle)  # OPA answers, with this bundle: only then is the file replaced
    previous = bundle.read_bytes() if bundle.exists() else None
    _write_bundle(bundle, data)
    deadline = time.monotonic() + BUNDLE_LOAD_TIMEOUT_S
    while not _runs(running_manifest(api, bundle), manifest):
        if time.monotonic() > deadline:
            if previous is not None:
                _write_bundle(bundle, previous)
            raise PolicyError(f"OPA at {api.url} did not activate the pushed bundle within {BUNDLE_LOAD_TIMEOUT_S:.0f} s "
                              "(its log says why); the previous policy was put back and keeps deciding")
        time.sleep(0.02)


def _runs(running: Mapping[str, Any], manifest: Mapping[str, Any]) -> bool:
    return running.get("revision") == manifest["revision"] and running.get("metadata") == manifest["metadata"]


def restore(api: OpaApi, bundle: Path, *, default: Path, actor: str, journal_path: Path) -> PushResult:
    """What the runtime runs whenever OPA (re)starts: OPA loads the bundle of the last push
    from ``bundle`` itself; this journals that (outcome ``restored``), or, when nothing was
    ever pushed (the placeholder bundle), pushes ``default`` through the gate like any push."""
    manifest = running_manifest(api, bundle)
    if not manifest.get("revision"):
        return push(api, bundle, default, actor=actor, journal_path=journal_path)
    meta = manifest.get("metadata") or {}
    modules = sorted(_running_modules(api, bundle))
    _journal(journal_path, {"at": datetime.now(UTC).isoformat(timespec="seconds"), "actor": actor, "opa": api.url,
                            "policy_dir": str(bundle.resolve()), "sha256": manifest["revision"], "modules": modules,
                            "outcome": "restored", "pushed_by": meta.get("pushed_by", "")})
    return PushResult(manifest["revision"], tuple(modules), meta.get("pushed_by", ""), meta.get("pushed_at", ""))


def diff(api: OpaApi, bundle: Path, policy_dir: Path) -> str:
    """Unified diff from what OPA runs to the local files; "" when they are the same."""
    policy_dir = Path(policy_dir)
    local = {m.name: m.text for m in load_policy(policy_dir)}
    running = _running_modules(api, bundle)
    chunks: list[str] = []
    for name in sorted(local.keys() | running.keys()):
        chunks += difflib.unified_diff(_lines(running.get(name, "")), _lines(local.get(name, "")),
                                       fromfile=f"running/{name}", tofile=f"{policy_dir}/{name}")
    return "".join(chunks)


def _lines(text: str) -> list[str]:
    """Lines with their newline, the last one included, so the diff output stays line-shaped."""
    return [line if line.endswith("\n") else line + "\n" for line in text.splitlines(keepends=True)]


def evaluate(api: OpaApi, input_doc: Mapping[str, Any]) -> dict[str, Any]:
    """The decision OPA gives for input_doc: {"allow", "reason", "policy_hash"}, the hash
    being the revision of the policy bundle OPA reports it decided with (not the policy's word)."""
    answer = _rest(api, f"/v1/data/{DECISION_PATH}?provenance=true", {"input": dict(input_doc)}, method="POST")
    if "result" not in answer:
        raise OpaUnavailable(f"OPA at {api.url} has no {DECISION_PATH}: push a policy (`greymesh policy push`)")
    bundles = (answer.get("provenance") or {}).get("bundles")
    return {**answer["result"], "policy_hash": policy_hash_of(bundles)}


# --- mesh data ------------------------------------------------------------------------


def mesh_data(spec: MeshSpec) -> dict[str, Any]:
    """The mesh as the policy reads it at data.greymesh.mesh (shape: policies/README.md).

    mesh.yaml has no per-edge rules yet, so every edge is {} (any method, any path)."""
    td = spec.identity.trust_domain
    return {
        "trust_domain": td,
        "services": {
            s.name: {
                "spiffe_id": spiffe_id(td, s.namespace, s.name),
                "namespace": s.namespace,
                "tags": list(s.tags),
                "calls": {callee: {} for callee in s.calls},
            }
            for s in spec.services
        },
    }


def mesh_data_problems(doc: Mapping[str, Any]) -> list[str]:
    """What is wrong with a mesh document.  The policy would deny on a bad one
    anyway, but two services with one SPIFFE ID would make every decision an error."""
    services = doc.get("services")
    if not isinstance(services, Mapping):
        return ["services: must be an object of service name -> service"]
    problems: list[str] = []
    owners: dict[str, str] = {}
    for name, svc in services.items():
        where = f"services.{name}"
        sid = svc.get("spiffe_id") if isinstance(svc, Mapping) else None
        if not isinstance(sid, str) or not sid.startswith("spiffe://"):
            problems.append(f"{where}.spiffe_id: must be a spiffe:// URI")
            continue
        if sid in owners:
            problems.append(f"{where}.spiffe_id: {sid} is also {owners[sid]}'s")
        owners[sid] = name
        if not _strings(svc.get("tags", [])):
            problems.append(f"{where}.tags: must be a list of strings")
        calls = svc.get("calls", {})
        if not isinstance(calls, Mapping):
            problems.append(f"{where}.calls: must be an object of callee name -> edge rules")
            continue
        for callee, rules in calls.items():
            if not (isinstance(rules, Mapping) and _strings(rules.get("methods", []))
                    and _strings(rules.get("path_prefixes", []))):
                problems.append(f"{where}.calls.{callee}: must be an object with optional string lists "
                                "methods and path_prefixes")
            elif any(not p.startswith("/") for p in rules.get("path_prefixes", [])):
                problems.append(f"{where}.calls.{callee}.path_prefixes: each must start with /")
    return problems


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def push_mesh_data(api: OpaApi, doc: Mapping[str, Any]) -> None:
    """Replace data.greymesh.mesh; a malformed document is refused (PolicyError) before OPA sees it."""
    if problems := mesh_data_problems(doc):
        raise PolicyError("mesh data refused:\n" + "\n".join(problems))
    _rest(api, f"/v1/data/{MESH_DATA_PATH}", dict(doc), method="PUT")


def running_mesh_data(api: OpaApi) -> object:
    """data.greymesh.mesh as OPA holds it (None when it holds none)."""
    return _rest(api, f"/v1/data/{MESH_DATA_PATH}").get("result")


def main(argv: list[str] | None = None) -> int:
    """`python -m controlplane.policy`: what the runtime runs whenever OPA becomes ready (see restore)."""
    p = argparse.ArgumentParser(prog="python -m controlplane.policy", description=restore.__doc__)
    p.add_argument("--opa-url", required=True)
    p.add_argument("--opa-token-file", type=Path, required=True, help="the control plane's token for OPA (0600)")
    p.add_argument("--bundle", type=Path, required=True, help="the policy bundle OPA loads (the data dir's)")
    p.add_argument("--default", type=Path, default=POLICY_DIR, help="pushed when nothing was (default: %(default)s)")
    p.add_argument("--journal", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        api = OpaApi.with_token_file(args.opa_url, args.opa_token_file)
        result = restore(api, args.bundle, default=args.default, actor=f"{getpass.getuser()} (greymesh runtime)",
                         journal_path=args.journal)
    except (PolicyError, OpaUnavailable, credentials.CredentialError) as exc:
        print(f"{exc.prefix}: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"OPA runs {len(result.modules)} module(s), sha256 {result.policy_hash[:12]}, pushed by {result.pushed_by}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
