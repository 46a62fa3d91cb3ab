"""Attacks on OPA, the policy engine, on a real OPA started as the runtime starts it
(tests/support/opa.py): its REST API obeys only the control plane, and the policy hash a
decision's tap event carries is OPA's account of what it loaded, which no policy can forge.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from envoy.service.auth.v3 import external_auth_pb2 as authz_pb2

from controlplane import policy
from controlplane.authz import DECISION_URL_PATH, OpaClient, PolicyUnavailable, opa_input
from core import credentials
from core.installs import opa_binary
from greymesh.cli import main as greymesh_main
from greymesh.runtime.opa import opa_argv
from tapstream.decisionlog import AuditRecord
from tests.support.opa import RunningOpa, running_opa

DELIVERY_TIMEOUT_S = 8.0  # OPA reports decisions every second


def sid(name: str) -> str:
    return f"spiffe://greymesh.local/ns/demo/sa/{name}"


MESH = {
    "trust_domain": "greymesh.local",
    "services": {
        "frontend": {"spiffe_id": sid("frontend"), "namespace": "demo", "tags": [], "calls": {"orders": {}}},
        "orders": {"spiffe_id": sid("orders"), "namespace": "demo", "tags": [], "calls": {}},
    },
}
FORGED = "f" * 64


def check_request(caller: str, callee: str, path: str = "/") -> dict:
    req = authz_pb2.CheckRequest()
    req.attributes.source.principal = sid(caller)
    req.attributes.destination.principal = sid(callee)
    req.attributes.request.http.method = "GET"
    req.attributes.request.http.path = path
    return opa_input(req)


class Taps:
    """The decision-log receiver's sink: every decision as the tap event it becomes."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self._lock = threading.Lock()

    def __call__(self, records: list[AuditRecord]) -> None:
        with self._lock:
            self.events.extend(r.to_event() for r in records)

    def for_path(self, path: str) -> dict:
        deadline = time.monotonic() + DELIVERY_TIMEOUT_S
        while time.monotonic() < deadline:
            with self._lock:
                found = [e for e in self.events if e["path"] == path]
            if found:
                assert len(found) == 1, found
                return found[0]
            time.sleep(0.05)
        pytest.fail(f"no tap event for {path} within {DELIVERY_TIMEOUT_S}s")


@dataclass
class Setup:
    opa: RunningOpa
    taps: Taps
    policy_dir: Path
    journal: Path

    def push(self, policy_dir: Path | None = None) -> policy.PushResult:
        return policy.push(self.opa.admin, self.opa.files.policy_bundle, policy_dir or self.policy_dir,
                           actor="alice", journal_path=self.journal)

    def decide(self, path: str) -> tuple[dict, dict]:
        """(the decision as `greymesh policy eval` reports it, its tap event) for frontend -> orders at path."""
        decision = policy.evaluate(self.opa.admin, check_request("frontend", "orders", path))
        return decision, self.taps.for_path(path)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    policy_dir = tmp_path / "policies"
    shutil.copytree(policy.POLICY_DIR, policy_dir, ignore=shutil.ignore_patterns("*.md"))
    taps = Taps()
    with running_opa(tmp_path / "mesh", taps) as opa:
        policy.push_mesh_data(opa.admin, MESH)
        yield Setup(opa, taps, policy_dir, tmp_path / "journal.jsonl")


def rest(opa: RunningOpa, method: str, path: str, body: bytes | None = None, token: str | None = None) -> int:
    """The status OPA answers a raw request with (no client library that might fix the path)."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    req = urllib.request.Request(opa.url + path, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


ROGUE_MODULE = b"package greymesh.authz\n\ndecision := {\"allow\": true, \"reason\": \"rogue\"}\n"
OPEN_MESH = json.dumps({"services": {"x": {"spiffe_id": sid("x"), "calls": {"orders": {}}}}}).encode()


# --- the REST API obeys only the control plane --------------------------------------------


def test_nobody_puts_a_policy_through_the_rest_api_with_or_without_a_token(setup: Setup):
    opa = setup.opa
    for token in (None, opa.bridge_token, "guessed", opa.admin.token):
        assert rest(opa, "PUT", "/v1/policies/rogue", ROGUE_MODULE, token) == 401, token
        assert rest(opa, "DELETE", "/v1/policies/rogue", None, token) == 401, token
    assert rest(opa, "GET", "/v1/policies", None, opa.admin.token) == 200  # the control plane may read them
    assert not any("rogue" in p["id"] for p in json.loads(
        urllib.request.urlopen(urllib.request.Request(
            opa.url + "/v1/policies", headers={"Authorization": f"Bearer {opa.admin.token}"}), timeout=5).read()
    )["result"])


def test_a_direct_write_of_data_is_refused_except_the_control_planes_mesh_sync(setup: Setup):
    opa = setup.opa
    for token in (None, opa.bridge_token, "guessed"):
        assert rest(opa, "PUT", "/v1/data/greymesh/mesh", OPEN_MESH, token) == 401, token
        assert rest(opa, "PATCH", "/v1/data/greymesh/mesh", b"[]", token) == 401, token
    for token in (None, opa.bridge_token, opa.admin.token):
        assert rest(opa, "PUT", "/v1/data/system/greymesh/clients", b"{}", token) == 401, token
        assert rest(opa, "PUT", "/v1/data", b"{}", token) == 401, token
        assert rest(opa, "PUT", "/v1/data/greymesh/other", b"{}", token) == 401, token
    assert policy.running_mesh_data(opa.admin) == MESH  # nothing changed


def test_reads_without_the_control_planes_token_are_refused(setup: Setup):
    opa = setup.opa
    for token in (None, opa.bridge_token):
        assert rest(opa, "GET", "/v1/policies", None, token) == 401, token
        assert rest(opa, "GET", "/v1/data/greymesh/mesh", None, token) == 401, token
        assert rest(opa, "GET", "/v1/data/system/greymesh", None, token) == 401, token
        assert rest(opa, "GET", "/v1/config", None, token) == 401, token
        assert rest(opa, "POST", "/v1/query", b'{"query": "data"}', token) == 401, token
    assert rest(opa, "GET", "/v1/data/system/greymesh", None, opa.admin.token) == 401  # the token digests


def test_the_bridge_token_asks_the_decision_and_nothing_else(setup: Setup):
    opa = setup.opa
    setup.push()
    bridge = OpaClient("127.0.0.1", opa.port, opa.bridge_token)
    decision = bridge.decide(check_request("frontend", "orders"))
    assert decision.allow is True and decision.reason == "frontend may call orders"
    assert bridge.decide(check_request("orders", "frontend")).allow is False
    assert bridge.conn is not None  # the keep-alive connection is kept for the next check

    body = json.dumps({"input": check_request("frontend", "orders")}).encode()
    assert rest(opa, "POST", DECISION_URL_PATH, body, None) == 401
    # Path tricks do not reach another document with the bridge's token.
    for trick in ("/v1/data/greymesh/authz/decision/../../mesh", "/v1/data/greymesh/authz%2Fdecision",
                  "/v1/data/greymesh/authz", "/v1/data/greymesh/authz/decision/x", "/v1/data//greymesh/mesh"):
        assert rest(opa, "POST", trick, body, opa.bridge_token) in (401, 404), trick  # never 200
        assert rest(opa, "GET", trick, None, opa.bridge_token) in (401, 404), trick
    with pytest.raises(PolicyUnavailable, match="refused the bridge's token"):
        OpaClient("127.0.0.1", opa.port, "guessed").decide(check_request("frontend", "orders"))


def test_health_answers_without_a_token(setup: Setup):
    assert rest(setup.opa, "GET", "/health", None, None) == 200
    assert rest(setup.opa, "POST", "/health", b"{}", None) == 401


def test_no_token_is_on_opas_command_line_or_in_its_config(setup: Setup):
    opa = setup.opa
    argv = " ".join(opa_argv(opa_binary(), "127.0.0.1:8181", opa.files))
    tokens = [opa.admin.token, opa.bridge_token, credentials.read(opa.dd.secret("decisionlog.token"))]
    config = opa.files.config.read_text()
    system = "".join(p.read_text() for p in opa.files.system_bundle.rglob("*") if p.is_file())
    for token in tokens:
        assert token not in argv and token not in config and token not in system
    for path in (opa.files.admin_token, opa.files.bridge_token, opa.files.system_bundle / "system/greymesh/data.json",
                 opa.files.config, opa.files.policy_bundle):
        assert os.stat(path).st_mode & 0o077 == 0, path


def test_greymesh_policy_push_works_with_the_data_dirs_token(setup: Setup, capsys: pytest.CaptureFixture[str]):
    data_dir = setup.opa.dd.root
    (data_dir / "runtime.json").write_text(json.dumps({"ports": {"opa.http": setup.opa.port}}))
    args = ["--data-dir", str(data_dir), "--dir", str(setup.policy_dir)]
    assert greymesh_main(["policy", "push", *args]) == 0
    assert "pushed" in capsys.readouterr().out
    assert greymesh_main(["policy", "diff", *args]) == 0 and "runs exactly" in capsys.readouterr().out

    setup.opa.files.admin_token.chmod(0o644)  # a token others could read is refused, with the fix
    assert greymesh_main(["policy", "push", *args]) != 0
    assert "chmod 600" in capsys.readouterr().err


# --- the policy hash is OPA's, not the policy's -------------------------------------------


def test_the_policy_hash_changes_when_and_only_when_a_pushed_policy_changes(setup: Setup):
    first = setup.push()
    assert first.policy_hash == policy.policy_hash(policy.load_policy(setup.policy_dir))
    decision, event = setup.decide("/one")
    assert decision["policy_hash"] == event["policy_hash"] == first.policy_hash

    again = setup.push()  # the same files: the same hash
    decision, event = setup.decide("/two")
    assert again.policy_hash == decision["policy_hash"] == event["policy_hash"] == first.policy_hash

    rego = setup.policy_dir / "authz.rego"
    rego.write_text(rego.read_text() + "\n# a comment is a change of the policy\n")
    changed = setup.push()
    decision, event = setup.decide("/three")
    assert changed.policy_hash != first.policy_hash
    assert decision["policy_hash"] == event["policy_hash"] == changed.policy_hash

    rego.write_text(rego.read_text() + "\n# not pushed\n")  # a local edit alone changes nothing
    decision, event = setup.decide("/four")
    assert decision["policy_hash"] == event["policy_hash"] == changed.policy_hash


def test_a_policy_that_writes_its_own_policy_hash_cannot_change_the_tap_event(setup: Setup):
    rego = setup.policy_dir / "authz.rego"
    rego.write_text(rego.read_text().replace(
        'decision := {"allow": allow, "reason": reason}',
        f'decision := {{"allow": allow, "reason": reason, "policy_hash": "{FORGED}"}}'))
    tests = setup.policy_dir / "authz_test.rego"  # its tests compare whole decisions: let them ignore the field
    tests.write_text(tests.read_text().replace(
        "d := authz.decision with", 'd := object.remove(authz.decision, ["policy_hash"]) with'))
    (setup.policy_dir / "hash.rego").write_text(f'package greymesh.policy\n\nhash := "{FORGED}"\n')

    pushed = setup.push()
    decision, event = setup.decide("/forged")
    assert decision["allow"] is True
    assert event["policy_hash"] == decision["policy_hash"] == pushed.policy_hash != FORGED
    raw = json.loads(urllib.request.urlopen(urllib.request.Request(
        setup.opa.url + DECISION_URL_PATH, data=json.dumps({"input": check_request("frontend", "orders")}).encode(),
        headers={"Authorization": f"Bearer {setup.opa.bridge_token}"}, method="POST"), timeout=5).read())
    assert raw["result"]["policy_hash"] == FORGED  # what the policy says, which nothing downstream believes
