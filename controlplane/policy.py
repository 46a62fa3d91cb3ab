"""The authorization policy's lifecycle against a running OPA: test, push, diff, evaluate.

OPA compiles whatever module it is handed, so a broken or untested policy would go
live the moment it is PUT.  :func:`push` is the gate.  It runs ``opa check`` and
``opa test`` on the local files and only then replaces the running modules.  If OPA
refuses one of them, the modules already replaced are put back, so the running
policy stays whole.  Every attempt, refused ones too, is appended to a JSONL journal.
``data.greymesh.policy`` records the hash of the running policy, and every decision
carries that hash.

The mesh itself (who may call whom, SPIFFE IDs, tags) reaches the policy as data at
``data.greymesh.mesh``: see :func:`mesh_data` and policies/README.md for its shape.

OPA is spoken to through opa-python-client (its REST API) and the ``opa`` binary
(``check`` and ``test`` exist only there).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import getpass
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from controlplane.identity import spiffe_id
from controlplane.meshspec import MeshSpec
from core import jsonhttp
from core.contracts import DECISION_PATH, MESH_DATA_PATH, POLICY_META_PATH
from core.errors import GreymeshError, InputError
from core.installs import opa_binary

if TYPE_CHECKING:
    # Imported where used: opa_client pulls in requests and aiohttp (~0.4 s), and every
    # `greymesh` command imports this module to build its parser.
    from opa_client import OpaClient
    from opa_client.errors import RegoParseError

POLICY_DIR = Path(__file__).resolve().parents[1] / "policies"
MODULE_PREFIX = "greymesh/"  # policy IDs of our modules in OPA
JOURNAL_VERSION = 1
TEST_SUFFIX = "_test.rego"
KEPT_META = "push.json"  # beside a kept copy: the meta of the push it is a copy of
OPA_TIMEOUT_S = 10.0
OPA_CLI_TIMEOUT_S = 120.0


class PolicyError(InputError):
    """A policy or mesh document was refused; the message says why, with file and line when known."""


class OpaUnavailable(GreymeshError):
    """OPA could not be asked (not running, not reachable, or it failed)."""


@dataclass(frozen=True)
class Module:
    """One policy file: `name` is its path under the policy dir, `id` its policy ID in OPA."""

    name: str
    id: str
    text: str


@dataclass(frozen=True)
class PushResult:
    policy_hash: str
    modules: tuple[str, ...]  # module names, as under the policy dir
    pushed_by: str
    pushed_at: str  # RFC 3339, UTC


# --- local files ------------------------------------------------------------------


def module_id(name: str) -> str:
    """The policy ID in OPA of the module at `name` (its path under the policy dir).

    Independent of where the policy dir lives, so a push from any checkout replaces the
    running modules in place instead of adding a second, conflicting copy of the package."""
    return MODULE_PREFIX + name


def load_policy(policy_dir: Path) -> tuple[Module, ...]:
    """The policy modules under policy_dir (tests excluded: they are run, not deployed)."""
    files = sorted(p for p in policy_dir.rglob("*.rego") if not p.name.endswith(TEST_SUFFIX))
    if not files:
        raise PolicyError(f"{policy_dir}: no policy modules (*.rego other than *{TEST_SUFFIX})")
    names = [p.relative_to(policy_dir).as_posix() for p in files]
    return tuple(Module(n, module_id(n), p.read_text(encoding="utf-8")) for n, p in zip(names, files))


def policy_hash(modules: tuple[Module, ...]) -> str:
    """sha256 over each module's name and text: the same files give the same hash in any checkout."""
    h = hashlib.sha256()
    for m in sorted(modules, key=lambda m: m.name):
        h.update(m.name.encode() + b"\0" + m.text.encode() + b"\0")
    return h.hexdigest()


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


@contextlib.contextmanager
def _opa(opa_url: str) -> Iterator[OpaClient]:
    """A client for OPA at opa_url; the client's failures become OpaUnavailable."""
    import requests
    from opa_client import OpaClient
    from opa_client.errors import ConnectionsError, DeletePolicyError, PolicyNotFoundError, RegoParseError

    url = urlsplit(opa_url)
    if url.hostname is None or url.port is None:
        raise OpaUnavailable(f"not an OPA URL (want http://host:port): {opa_url}")
    try:
        with OpaClient(host=url.hostname, port=url.port, ssl=url.scheme == "https", timeout=OPA_TIMEOUT_S) as client:
            yield client
    except (requests.RequestException, ConnectionsError, DeletePolicyError, PolicyNotFoundError, RegoParseError) as exc:
        # The client raises HTTPError without OPA's explanation; it is in the response body.
        body = exc.response.text if isinstance(exc, requests.HTTPError) and exc.response is not None else ""
        raise OpaUnavailable(f"OPA at {opa_url} unreachable or failing: {exc} {body}".strip()) from exc


def _opa_errors(exc: RegoParseError, policy_dir: Path) -> str:
    """OPA's compile errors as `file:line: code: message` lines.  OPA names a module by
    its policy ID: ours are shown as their files, others as `opa:<id>`."""
    prefix = MODULE_PREFIX
    lines = []
    for err in exc.errors or [{"code": exc.expression, "message": exc.message}]:
        line = f"{err.get('code')}: {err.get('message')}"
        loc = err.get("location") or {}
        if file := loc.get("file"):
            where = f"{policy_dir}/{file.removeprefix(prefix)}" if file.startswith(prefix) else f"opa:{file}"
            line = f"{where}:{loc.get('row', '?')}: {line}"
        lines.append(line)
    return "\n".join(lines)


def _running_modules(client: OpaClient, policy_dir: Path) -> dict[str, str]:
    """The modules OPA runs from policy_dir: {name: text}.

    The client's policy list keeps only IDs, so each text is one more GET."""
    prefix = MODULE_PREFIX
    return {pid.removeprefix(prefix): client.get_policy(pid)["result"]["raw"]
            for pid in client.get_policies_list() if pid.startswith(prefix)}


def _put_modules(client: OpaClient, modules: tuple[Module, ...], previous: Mapping[str, str], policy_dir: Path) -> None:
    """PUT each module; if OPA refuses one, restore the ones already replaced and raise PolicyError.

    OPA's REST API has no multi-module transaction; this undo keeps the running
    policy whole.  rego_compat=False: the client must not rewrite what we push."""
    from opa_client.errors import RegoParseError

    done: list[Module] = []
    for module in modules:
        try:
            client.update_policy_from_string(module.text, module.id, rego_compat=False)
        except RegoParseError as exc:
            for m in reversed(done):
                if m.name in previous:
                    client.update_policy_from_string(previous[m.name], m.id, rego_compat=False)
                else:
                    client.delete_policy(m.id)
            raise PolicyError(f"OPA refused {policy_dir}/{module.name}:\n{_opa_errors(exc, policy_dir)}") from None
        done.append(module)


def _journal(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"version": JOURNAL_VERSION, **record}) + "\n")


def push(opa_url: str, policy_dir: Path, *, actor: str, journal_path: Path, keep_in: Path | None = None) -> PushResult:
    """Test the local policy and make it the one OPA runs.

    Refuses (PolicyError; nothing in OPA changes) a policy that does not compile, whose
    tests fail, or that OPA itself refuses.  On success the modules are replaced,
    modules deleted locally are removed from OPA, and data.greymesh.policy says what runs.
    Every attempt is journalled: who, when, the policy's sha256 and the outcome.
    ``keep_in``: a folder that then holds a copy of the pushed files (tests included),
    so that a restarted OPA can be given the same policy again (:func:`restore`)."""
    policy_dir = Path(policy_dir)
    pushed_at = datetime.now(UTC).isoformat(timespec="seconds")
    record: dict[str, Any] = {"at": pushed_at, "actor": actor, "opa": opa_url,
                              "policy_dir": str(policy_dir.resolve())}
    try:
        modules = load_policy(policy_dir)
        record |= {"sha256": policy_hash(modules), "modules": [m.name for m in modules]}
        check(policy_dir)
        ok, report = run_tests(policy_dir, verbose=False)
        if not ok:
            raise PolicyError(f"{policy_dir}: the policy's tests fail:\n{report.strip()}")
        meta = {"hash": record["sha256"], "pushed_by": actor, "pushed_at": pushed_at}
        _install(opa_url, modules, meta, policy_dir)
    except (PolicyError, OpaUnavailable) as exc:
        outcome = "refused" if isinstance(exc, PolicyError) else "failed"
        _journal(journal_path, record | {"outcome": outcome, "error": str(exc)})
        raise
    _journal(journal_path, record | {"outcome": "pushed"})
    if keep_in is not None and keep_in.resolve() != policy_dir.resolve():
        _keep_copy(policy_dir, keep_in, meta)
    return PushResult(record["sha256"], tuple(record["modules"]), actor, pushed_at)


def _install(opa_url: str, modules: tuple[Module, ...], meta: dict[str, str], policy_dir: Path) -> None:
    """Make ``modules`` what OPA runs (the others of ours removed) and ``meta`` what it says it runs."""
    with _opa(opa_url) as client:
        previous = _running_modules(client, policy_dir)
        _put_modules(client, modules, previous, policy_dir)
        for name in previous.keys() - {m.name for m in modules}:
            client.delete_policy(module_id(name))
        client.update_or_create_data(meta, POLICY_META_PATH)


def _keep_copy(policy_dir: Path, dest: Path, meta: dict[str, str]) -> None:
    """Replace dest with the .rego files of policy_dir and the push's meta, in one rename."""
    staging = dest.with_name(dest.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    for src in policy_dir.rglob("*.rego"):
        target = staging / src.relative_to(policy_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    (staging / KEPT_META).write_text(json.dumps(meta))
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)


def restore(opa_url: str, kept: Path, *, default: Path, actor: str, journal_path: Path) -> PushResult | None:
    """Give an OPA that runs no pushed policy (just started, or restarted) the one last
    pushed, kept in ``kept`` by :func:`push`, or ``default`` when nothing was ever pushed.

    Does nothing (None) when OPA already runs a pushed policy.  The kept policy passed the
    gate (check and tests) when it was pushed, so it is installed as it is, with the meta
    of that push (its hash is what decisions carry), and journalled as ``restored``: a
    fail-closed mesh denies every request until OPA has its policy again.  ``default`` goes
    through the gate like any push."""
    try:
        meta = jsonhttp.get(f"{opa_url}/v1/data/{POLICY_META_PATH}", timeout_s=OPA_TIMEOUT_S).get("result")
    except (jsonhttp.ApiError, jsonhttp.Unreachable) as exc:
        raise OpaUnavailable(f"OPA at {opa_url} unreachable or failing: {exc}") from None
    if meta:
        return None
    if not (kept / KEPT_META).is_file():
        return push(opa_url, default, actor=actor, journal_path=journal_path, keep_in=kept)
    meta = json.loads((kept / KEPT_META).read_text())
    modules = load_policy(kept)
    record = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "actor": actor, "opa": opa_url,
              "policy_dir": str(kept.resolve()), "sha256": policy_hash(modules), "modules": [m.name for m in modules]}
    try:
        _install(opa_url, modules, meta, kept)
    except (PolicyError, OpaUnavailable) as exc:
        _journal(journal_path, record | {"outcome": "failed", "error": str(exc)})
        raise
    _journal(journal_path, record | {"outcome": "restored", "pushed_by": meta["pushed_by"]})
    return PushResult(meta["hash"], tuple(record["modules"]), meta["pushed_by"], meta["pushed_at"])


def diff(opa_url: str, policy_dir: Path) -> str:
    """Unified diff from what OPA runs to the local files; "" when they are the same."""
    policy_dir = Path(policy_dir)
    local = {m.name: m.text for m in load_policy(policy_dir)}
    with _opa(opa_url) as client:
        running = _running_modules(client, policy_dir)
    chunks: list[str] = []
    for name in sorted(local.keys() | running.keys()):
        chunks += difflib.unified_diff(_lines(running.get(name, "")), _lines(local.get(name, "")),
                                       fromfile=f"running/{name}", tofile=f"{policy_dir}/{name}")
    return "".join(chunks)


def _lines(text: str) -> list[str]:
    """Lines with their newline, the last one included, so the diff output stays line-shaped."""
    return [line if line.endswith("\n") else line + "\n" for line in text.splitlines(keepends=True)]


def evaluate(opa_url: str, input_doc: Mapping[str, Any]) -> dict[str, Any]:
    """The decision OPA gives for input_doc: {"allow", "reason", "policy_hash"}."""
    with _opa(opa_url) as client:
        answer = client.query_rule(input_data=dict(input_doc), package_path=DECISION_PATH.replace("/", "."))
    if "result" not in answer:
        raise OpaUnavailable(f"OPA at {opa_url} has no {DECISION_PATH}: push a policy (`greymesh policy push`)")
    return answer["result"]


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


def push_mesh_data(opa_url: str, doc: Mapping[str, Any]) -> None:
    """Replace data.greymesh.mesh; a malformed document is refused (PolicyError) before OPA sees it."""
    if problems := mesh_data_problems(doc):
        raise PolicyError("mesh data refused:\n" + "\n".join(problems))
    with _opa(opa_url) as client:
        client.update_or_create_data(dict(doc), MESH_DATA_PATH)


def main(argv: list[str] | None = None) -> int:
    """`python -m controlplane.policy`: restore OPA's policy (what the runtime runs whenever OPA becomes ready)."""
    p = argparse.ArgumentParser(prog="python -m controlplane.policy", description=restore.__doc__)
    p.add_argument("--opa-url", required=True)
    p.add_argument("--kept", type=Path, required=True, help="the copy of the last push (the data dir's policy/active)")
    p.add_argument("--default", type=Path, default=POLICY_DIR, help="pushed when nothing was kept (default: %(default)s)")
    p.add_argument("--journal", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        result = restore(args.opa_url, args.kept, default=args.default, actor=f"{getpass.getuser()} (greymesh runtime)",
                         journal_path=args.journal)
    except (PolicyError, OpaUnavailable) as exc:
        print(f"{exc.prefix}: {exc}", file=sys.stderr)
        return exc.exit_code
    print("OPA already runs a pushed policy" if result is None else
          f"pushed {len(result.modules)} module(s), sha256 {result.policy_hash[:12]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
