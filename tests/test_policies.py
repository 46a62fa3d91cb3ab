"""The authorization policy's lifecycle against a real OPA, and its decision logs.

Each test starts its own OPA (loopback, a free port) the way the runtime does
(tests/support/opa.py: token authentication, the system bundle, the policy bundle), with
its own copy of policies/ to push, reporting decisions to an in-process receiver; both are
always stopped.
Inputs are built by the ext_authz bridge's own opa_input from Envoy CheckRequests,
so these tests also hold the policy to the bridge's input shape.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TextIO

import pytest
from envoy.service.auth.v3 import external_auth_pb2 as authz_pb2

from controlplane import policy
from controlplane.authz import opa_input
from controlplane.meshspec import load_spec
from core import credentials, jsonhttp
from core.contracts import POLICY_BUNDLE_FILE
from core.datadir import DataDir
from core.installs import opa_binary, pinned_versions
from core.jsonhttp import CLI, Credential
from greymesh.cli import main as greymesh_main
from greymesh.runtime.opa import files as opa_files
from greymesh.runtime.opa import opa_argv
from greymesh.runtime.workloads import DECISIONLOG_TOKEN
from tapstream.decisionlog import OPA, AuditRecord, DecisionLogReceiver, receiver_access
from tests.support.mesh import DEMO_SPEC
from tests.support.net import free_port
from tests.support.opa import RunningOpa, running_opa

DELIVERY_TIMEOUT_S = 8.0  # OPA reports every second (greymesh.runtime.opa.opa_config)


def sid(name: str) -> str:
    return f"spiffe://greymesh.local/ns/demo/sa/{name}"


MESH = {
    "trust_domain": "greymesh.local",
    "services": {
        "frontend": {"spiffe_id": sid("frontend"), "namespace": "demo", "tags": [], "calls": {"orders": {}}},
        "orders": {"spiffe_id": sid("orders"), "namespace": "demo", "tags": [], "calls": {"inventory": {}}},
        "billing": {"spiffe_id": sid("billing"), "namespace": "demo", "tags": ["pci"],
                    "calls": {"payments": {"methods": ["POST"], "path_prefixes": ["/charge"]}}},
        "payments": {"spiffe_id": sid("payments"), "namespace": "demo", "tags": ["pci"], "calls": {}},
        "inventory": {"spiffe_id": sid("inventory"), "namespace": "demo"},
        "reporting": {"spiffe_id": sid("reporting"), "namespace": "demo", "calls": {"payments": {}}},
    },
}


def request(caller_id: str, callee_id: str, method: str = "GET", path: str = "/") -> dict:
    """The OPA input the bridge sends for an Envoy CheckRequest between these SPIFFE IDs."""
    req = authz_pb2.CheckRequest()
    req.attributes.source.principal = caller_id
    req.attributes.destination.principal = callee_id
    req.attributes.request.http.method = method
    req.attributes.request.http.path = path
    req.attributes.request.http.host = "svc"
    return opa_input(req)


def wait_for(what: str, ready: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


class JsonlSink:
    """Appends each record as one JSON line; safe to share between handler threads."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: TextIO = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def __call__(self, records: list[AuditRecord]) -> None:
        with self._lock:
            self._file.writelines(r.to_json() + "\n" for r in records)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


@dataclass
class Opa:
    server: RunningOpa
    policy_dir: Path  # this test's copy of policies/, to push
    journal: Path
    audit_log: Path  # where the decision-log receiver's JsonlSink appends

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def api(self) -> policy.OpaApi:
        return self.server.admin

    @property
    def bundle(self) -> Path:
        return self.server.files.policy_bundle

    @property
    def receiver(self) -> DecisionLogReceiver:
        return self.server.receiver

    def push(self) -> policy.PushResult:
        return policy.push(self.api, self.bundle, self.policy_dir, actor="alice", journal_path=self.journal)

    def diff(self) -> str:
        return policy.diff(self.api, self.bundle, self.policy_dir)

    def running(self) -> dict:
        return policy.running_manifest(self.api, self.bundle)

    def decide(self, caller: str, callee: str, method: str = "GET", path: str = "/") -> dict:
        """The decision on a call between services of MESH ("" caller: no certificate)."""
        return policy.evaluate(self.api, request(sid(caller) if caller else "", sid(callee), method, path))

    def edit(self, old: str, new: str, name: str = "authz.rego") -> Path:
        path = self.policy_dir / name
        text = path.read_text()
        assert old in text, f"{old!r} not in {name}"
        path.write_text(text.replace(old, new, 1))
        return path

    def journal_records(self) -> list[dict]:
        return [json.loads(line) for line in self.journal.read_text().splitlines()]

    def audit_records(self) -> list[dict]:
        return [json.loads(line) for line in self.audit_log.read_text().splitlines()] if self.audit_log.exists() else []

    def get(self, data_path: str) -> object:
        return jsonhttp.get(f"{self.url}/v1/data/{data_path}", token=self.api.token).get("result")


@pytest.fixture
def opa(tmp_path: Path) -> Iterator[Opa]:
    policy_dir = tmp_path / "policies"
    shutil.copytree(policy.POLICY_DIR, policy_dir, ignore=shutil.ignore_patterns("*.md"))
    sink = JsonlSink(tmp_path / "audit.jsonl")
    try:
        with running_opa(tmp_path / "mesh", sink) as server:
            policy.push_mesh_data(server.admin, MESH)
            yield Opa(server, policy_dir, tmp_path / "journal.jsonl", sink.path)
    finally:
        sink.close()


# --- the installed OPA and the unit tests -------------------------------------------------


def test_doctor_finds_the_pinned_opa():
    proc = subprocess.run([sys.executable, "-m", "greymesh.cli", "doctor", "--json"],
                          capture_output=True, text=True, timeout=60)
    row = next(r for r in json.loads(proc.stdout) if r["name"] == "opa")
    assert row["installed"] and row["version"] == pinned_versions()["OPA_VERSION"], row
    assert row["path"] == str(opa_binary())


def test_the_policys_own_unit_tests_pass():
    ok, report = policy.run_tests(policy.POLICY_DIR)
    assert ok, report
    passed = re.search(r"^PASS: (\d+)/(\d+)$", report, re.MULTILINE)
    assert passed and passed[1] == passed[2] and int(passed[1]) >= 25, report


# --- push and evaluate ----------------------------------------------------------------


def test_a_fresh_opa_decides_nothing_until_a_push_from_any_checkout_replaces_it_in_place(opa: Opa, tmp_path: Path):
    assert "+package greymesh.authz" in opa.diff()  # runs nothing yet
    assert opa.running()["revision"] == ""  # the placeholder bundle the runtime starts OPA with
    with pytest.raises(Exception):
        opa.decide("frontend", "orders")  # undefined: the bridge fails closed on it
    result = opa.push()
    assert opa.diff() == ""
    assert opa.decide("frontend", "orders")["policy_hash"] == result.policy_hash
    elsewhere = tmp_path / "other-checkout" / "policies"
    shutil.copytree(opa.policy_dir, elsewhere)
    again = policy.push(opa.api, opa.bundle, elsewhere, actor="bob", journal_path=opa.journal)
    assert again.policy_hash == result.policy_hash  # same files, same hash, no conflicting copy
    assert opa.diff() == ""
    assert opa.running()["metadata"]["pushed_by"] == "bob"


def test_a_pushed_policy_allows_declared_edges_and_denies_the_rest_with_reasons(opa: Opa):
    result = opa.push()
    modules = policy.load_policy(opa.policy_dir)
    assert "authz.rego" in result.modules and result.modules == tuple(m.name for m in modules)
    assert result.pushed_by == "alice"
    assert opa.running() == {"revision": result.policy_hash, "roots": policy.bundle_roots(modules, opa.policy_dir),
                             "metadata": {"pushed_by": "alice", "pushed_at": result.pushed_at}}

    assert opa.decide("frontend", "orders") == {"allow": True, "reason": "frontend may call orders",
                                                "policy_hash": result.policy_hash}
    assert opa.decide("billing", "payments", "POST", "/charge/7?amount=3")["allow"] is True
    for args, reason in [
        (("orders", "frontend"), "orders may not call frontend: not in its callers"),
        (("", "orders"), "caller has no mesh identity: the request carried no verified client certificate"),
        (("billing", "payments", "DELETE", "/charge"),
         "billing may not call payments with DELETE: allowed methods are POST"),
        (("billing", "payments", "POST", "/chargeback"),
         "billing may not call payments at /chargeback: allowed path prefixes are /charge"),
        (("reporting", "payments"), "reporting may not call payments: payments is tagged pci and reporting is not"),
    ]:
        assert opa.decide(*args) == {"allow": False, "reason": reason, "policy_hash": result.policy_hash}, args


def test_the_demo_mesh_spec_becomes_mesh_data_the_policy_decides_on(opa: Opa):
    doc = policy.mesh_data(load_spec(DEMO_SPEC))
    assert policy.mesh_data_problems(doc) == []
    policy.push_mesh_data(opa.api, doc)
    opa.push()

    def decide(caller: str, callee: str) -> dict:
        ids = doc["services"]
        return policy.evaluate(opa.api, request(ids[caller]["spiffe_id"], ids[callee]["spiffe_id"]))

    assert decide("frontend", "orders")["allow"] and decide("orders", "payments")["allow"]
    assert decide("payments", "orders")["reason"] == "payments may not call orders: not in its callers"


def test_malformed_mesh_data_is_refused_before_it_reaches_opa(opa: Opa):
    opa.push()
    bad = {"services": {"a": {"spiffe_id": sid("a")},
                        "b": {"spiffe_id": sid("a"), "calls": {"a": {"path_prefixes": ["x"]}}}}}
    with pytest.raises(policy.PolicyError) as refused:
        policy.push_mesh_data(opa.api, bad)
    assert f"services.b.spiffe_id: {sid('a')} is also a's" in str(refused.value)
    assert "services.b.calls.a.path_prefixes: each must start with /" in str(refused.value)
    assert opa.get("greymesh/mesh") == MESH

    # Why: with two services behind one SPIFFE ID, OPA cannot decide at all.
    jsonhttp.call(f"{opa.url}/v1/data/greymesh/mesh", bad, token=opa.api.token, method="PUT")
    with pytest.raises(policy.OpaUnavailable, match="eval_conflict_error"):
        opa.decide("a", "b")


# --- refused pushes ---------------------------------------------------------------------


def test_a_policy_that_does_not_compile_is_refused_with_file_and_line_and_the_old_one_keeps_deciding(opa: Opa):
    good = opa.push()
    path = opa.edit("default allow := false\n", "default allow := false\n\nallow if {\n\tinput.x ==\n}\n")
    line = path.read_text().splitlines().index("}", path.read_text().splitlines().index("allow if {")) + 1

    with pytest.raises(policy.PolicyError) as refused:
        opa.push()
    assert f"{path}:{line}: rego_parse_error" in str(refused.value)
    assert opa.decide("frontend", "orders") == {"allow": True, "reason": "frontend may call orders",
                                                "policy_hash": good.policy_hash}
    assert opa.journal_records()[-1]["outcome"] == "refused"


def test_a_policy_whose_tests_fail_is_refused_and_not_pushed(opa: Opa):
    good = opa.push()
    opa.edit('if "pci" in (callee.tags - caller.tags)', 'if "pci" in (callee.tags - caller.tags - {"pci"})')

    with pytest.raises(policy.PolicyError) as refused:
        opa.push()
    assert "tests fail" in str(refused.value)
    assert "test_pci_services_cannot_be_called_by_untagged_services_even_on_a_declared_edge: FAIL" in str(refused.value)
    assert opa.decide("reporting", "payments")["allow"] is False  # the running pci rule still holds
    assert opa.running()["revision"] == good.policy_hash
    assert opa.diff() != ""


def test_a_package_that_would_own_data_the_policy_does_not_own_is_refused_naming_the_file(opa: Opa):
    """A bundle owns its packages' data paths; none may be the mesh data, OPA's own
    authorization or its token digests."""
    good = opa.push()
    for package in ("greymesh.mesh", "greymesh", "system.authz", "system"):
        (opa.policy_dir / "extra.rego").write_text(f"package {package}\n\nextra := 1\n")
        with pytest.raises(policy.PolicyError) as refused:
            opa.push()
        assert f"{opa.policy_dir}/extra.rego: package {package} would own data." in str(refused.value), package
    assert opa.running()["revision"] == good.policy_hash
    assert opa.get("greymesh/mesh") == MESH


def test_a_push_to_a_bundle_opa_does_not_load_changes_nothing(opa: Opa, tmp_path: Path):
    elsewhere = tmp_path / "other" / POLICY_BUNDLE_FILE
    with pytest.raises(policy.OpaUnavailable, match="does not load the policy bundle"):
        policy.push(opa.api, elsewhere, opa.policy_dir, actor="alice", journal_path=opa.journal)
    assert not elsewhere.exists() and opa.running()["revision"] == ""
    assert opa.journal_records()[-1]["outcome"] == "failed"


# --- diff and journal --------------------------------------------------------------------


def test_diff_is_empty_after_a_push_and_shows_local_changes(opa: Opa):
    opa.push()
    assert opa.diff() == ""

    opa.edit("default allow := false\n", "default allow := false # deny unless a rule allows\n")
    (opa.policy_dir / "more.rego").write_text("package greymesh.more\n\nx := 1\n")
    changed = opa.diff()
    assert "--- running/authz.rego" in changed and f"+++ {opa.policy_dir}/authz.rego" in changed
    assert "-default allow := false\n+default allow := false # deny unless a rule allows\n" in changed
    assert f"+++ {opa.policy_dir}/more.rego" in changed and "+x := 1\n" in changed

    opa.push()
    assert {"greymesh/authz", "greymesh/more"} <= set(opa.running()["roots"])
    (opa.policy_dir / "more.rego").unlink()
    assert "-x := 1\n" in opa.diff()
    opa.push()  # a module deleted locally leaves OPA too
    assert opa.diff() == ""


def test_the_journal_records_who_when_the_policy_hash_and_the_outcome(opa: Opa):
    deployed = sorted(p for p in opa.policy_dir.glob("*.rego") if not p.name.endswith("_test.rego"))
    texts = b"".join(p.name.encode() + b"\0" + p.read_bytes() + b"\0" for p in deployed)
    before = datetime.now().astimezone()
    result = opa.push()
    opa.edit("package greymesh.authz", "package greymesh.authz\n\nbroken :=")
    with pytest.raises(policy.PolicyError):
        opa.push()

    pushed, refused = opa.journal_records()
    expected = hashlib.sha256(texts).hexdigest()  # every deployed module (not system/), by name
    assert pushed["outcome"] == "pushed" and pushed["actor"] == "alice" and pushed["sha256"] == expected
    assert result.policy_hash == expected and pushed["at"] == result.pushed_at
    assert datetime.fromisoformat(pushed["at"]) >= before.replace(microsecond=0)
    assert pushed["modules"] == [p.name for p in deployed] and pushed["opa"] == opa.url and pushed["version"] == 1
    assert refused["outcome"] == "refused" and refused["sha256"] != expected
    assert "does not compile" in refused["error"] and "authz.rego:" in refused["error"]


def test_an_unreachable_opa_is_reported_and_journalled(tmp_path: Path):
    journal = tmp_path / "journal.jsonl"
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(policy.OpaUnavailable, match="unreachable"):
        policy.push(policy.OpaApi(url, "token"), tmp_path / POLICY_BUNDLE_FILE, policy.POLICY_DIR, actor="bob",
                    journal_path=journal)
    assert not (tmp_path / POLICY_BUNDLE_FILE).exists()
    assert json.loads(journal.read_text())["outcome"] == "failed"


# --- decision logs -----------------------------------------------------------------------


def wait_for_audit(opa: Opa, n: int) -> list[dict]:
    wait_for(f"{n} audit records", lambda: len(opa.audit_records()) >= n, DELIVERY_TIMEOUT_S)
    return opa.audit_records()


def test_every_decision_arrives_as_a_structured_audit_record(opa: Opa):
    result = opa.push()
    asked = [("frontend", "orders", "GET", "/a?token=secret"), ("orders", "frontend", "POST", "/b"),
             ("", "orders", "GET", "/c"), ("reporting", "payments", "PUT", "/d")]
    decisions = [opa.decide(*a) for a in asked]
    opa.get("greymesh/mesh")  # any other query is logged by OPA too, and ignored here

    records = wait_for_audit(opa, len(asked))
    assert len(records) == len(asked)
    by_path = {r["path"]: r for r in records}
    for (caller, callee, method, path), decision in zip(asked, decisions, strict=True):
        r = by_path[path.split("?")[0]]
        assert AuditRecord(**r) == AuditRecord(
            time=r["time"], decision_id=r["decision_id"], caller=sid(caller) if caller else "", callee=sid(callee),
            method=method, path=path.split("?")[0], allow=decision["allow"], reason=decision["reason"],
            policy_hash=result.policy_hash)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", r["time"]), r["time"]
    assert len({r["decision_id"] for r in records}) == len(records)
    assert {r["schema"] for r in records} == {"greymesh.authz.decision"} and {r["version"] for r in records} == {1}
    assert "secret" not in opa.audit_log.read_text()
    wait_for("the other query to be ignored", lambda: opa.receiver.stats.snapshot()["ignored"] >= 1, DELIVERY_TIMEOUT_S)


def post_logs(url: str, body: bytes, token: str, encoding: str | None = "gzip") -> tuple[int, dict]:
    """POST a batch as OPA does, with OPA's decision-log token."""
    headers = ({"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
               | ({"Content-Encoding": encoding} if encoding else {}))
    req = urllib.request.Request(f"{url}/logs", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_malformed_batches_are_counted_and_skipped_and_the_receiver_keeps_working(opa: Opa):
    url, token = opa.receiver.url, credentials.read(opa.server.dd.secret(DECISIONLOG_TOKEN))
    assert post_logs(url, b"\x1f\x8b not really gzip", token)[0] == 400
    assert post_logs(url, gzip.compress(b"{not json"), token)[0] == 400
    assert post_logs(url, gzip.compress(b'{"an": "object"}'), token)[0] == 400
    assert post_logs(url, b"[]", token, encoding=None) == (200, {"records": 0, "ignored": 0, "bad_entries": 0})
    good = {"path": policy.DECISION_PATH, "decision_id": "d-1", "timestamp": "2026-01-01T00:00:00Z",
            "input": request(sid("frontend"), sid("orders"), "GET", "/x"),
            "result": {"allow": True, "reason": "r", "policy_hash": "h"}}
    bad = good | {"decision_id": "d-2", "result": {"allow": "yes"}}
    status, counts = post_logs(url, gzip.compress(json.dumps([bad, 7, good]).encode()), token)
    assert (status, counts) == (200, {"records": 1, "ignored": 0, "bad_entries": 2})
    stats = opa.receiver.stats.snapshot()
    assert stats["malformed"] == 3 and stats["bad_entries"] == 2

    opa.push()
    decision = opa.decide("frontend", "orders", "GET", "/after")
    records = wait_for_audit(opa, 2)
    assert records[0]["decision_id"] == "d-1"
    assert records[1]["path"] == "/after" and records[1]["reason"] == decision["reason"]


def test_a_failing_sink_makes_opa_send_the_batch_again(tmp_path: Path):
    failures, got = [1], []

    def flaky(records: list[AuditRecord]) -> None:
        if failures:
            failures.pop()
            raise OSError("disk full")
        got.extend(records)

    entry = {"path": policy.DECISION_PATH, "decision_id": "d", "timestamp": "2026-01-01T00:00:00Z",
             "input": request(sid("frontend"), sid("orders")),
             "result": {"allow": True, "reason": "r", "policy_hash": ""}}
    token = credentials.issue(tmp_path / "secrets" / "dl.token")
    access = receiver_access(Credential(OPA, token), Credential(CLI, credentials.new_token()))
    with DecisionLogReceiver(flaky, access) as receiver:
        body = gzip.compress(json.dumps([entry]).encode())
        assert post_logs(receiver.url, body, token)[0] == 500
        assert post_logs(receiver.url, body, token)[0] == 200
    assert [r.decision_id for r in got] == ["d"] and receiver.stats.snapshot()["sink_failures"] == 1


def test_opa_is_only_ever_bound_to_loopback(tmp_path: Path):
    files = opa_files(DataDir(tmp_path))
    with pytest.raises(ValueError, match="loopback"):
        opa_argv(Path("opa"), "0.0.0.0:8181", files)
    assert "127.0.0.1:8181" in opa_argv(Path("opa"), "127.0.0.1:8181", files)


# --- `greymesh policy ...` ----------------------------------------------------------------


def policy_cli(*argv: str) -> int:
    """Run `greymesh policy ARGV` in this process, through the CLI's own entry point."""
    return greymesh_main(["policy", *argv])


def test_the_policy_commands_use_the_data_dirs_opa(opa: Opa, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    data_dir = opa.server.dd.root  # the data dir whose OPA it is: its tokens and policy bundle
    (data_dir / "runtime.json").write_text(json.dumps({"ports": {"opa.http": opa.server.port}}))
    dd = ["--data-dir", str(data_dir), "--dir", str(opa.policy_dir)]

    assert policy_cli("test", "--dir", str(opa.policy_dir)) == 0
    assert policy_cli("push", *dd) == 0
    assert "pushed" in capsys.readouterr().out and DataDir(data_dir).policy_journal.exists()
    # The bundle OPA runs is also what a restarted OPA loads: the pushed modules and their hash.
    with tarfile.open(opa.bundle) as bundle:
        assert sorted(bundle.getnames()) == sorted([".manifest", *(m.name for m in policy.load_policy(opa.policy_dir))])
        manifest = json.load(bundle.extractfile(".manifest"))
    assert manifest["revision"] == policy.policy_hash(policy.load_policy(opa.policy_dir))
    assert oct(opa.bundle.stat().st_mode & 0o777) == "0o600"
    assert policy_cli("diff", *dd) == 0 and "runs exactly" in capsys.readouterr().out

    doc = tmp_path / "input.json"
    doc.write_text(json.dumps(request(sid("orders"), sid("frontend"))))
    assert policy_cli("eval", "--input", str(doc), *dd) == 0
    assert json.loads(capsys.readouterr().out)["reason"] == "orders may not call frontend: not in its callers"

    doc.write_text("{nope")
    assert policy_cli("eval", "--input", str(doc), *dd) == 2
    assert "cannot read a JSON input document" in capsys.readouterr().err

    opa.edit("package greymesh.authz", "package greymesh.authz\n\nbroken :=")
    assert policy_cli("push", *dd) == 2
    assert "refused:" in capsys.readouterr().err


def test_the_policy_commands_say_when_no_opa_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert policy_cli("diff", "--data-dir", str(tmp_path)) == 1
    assert f"no mesh with OPA has been started in {tmp_path}: run `greymesh up` first" in capsys.readouterr().err
