"""The authorization policy's lifecycle against a real OPA, and its decision logs.

Each test starts its own OPA (loopback, a free port) the way the runtime does
(tapstream.decisionlog.opa_argv/opa_config), loaded with its own copy of policies/,
reporting decisions to an in-process receiver; both are always stopped.
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
from core.datadir import DataDir
from core.installs import opa_binary, pinned_versions
from greymesh.cli import main as greymesh_main
from greymesh.runtime.opa import opa_argv, opa_config
from tapstream.decisionlog import AuditRecord, DecisionLogReceiver
from tests.support.mesh import DEMO_SPEC
from tests.support.net import free_port

START_TIMEOUT_S = 20.0
DELIVERY_TIMEOUT_S = 8.0  # OPA reports every second (opa_config)


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
    url: str
    policy_dir: Path  # this test's copy of policies/, which OPA loaded at start
    journal: Path
    audit_log: Path  # where the decision-log receiver's JsonlSink appends
    receiver: DecisionLogReceiver

    def push(self) -> policy.PushResult:
        return policy.push(self.url, self.policy_dir, actor="alice", journal_path=self.journal)

    def decide(self, caller: str, callee: str, method: str = "GET", path: str = "/") -> dict:
        """The decision on a call between services of MESH ("" caller: no certificate)."""
        return policy.evaluate(self.url, request(sid(caller) if caller else "", sid(callee), method, path))

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
        with urllib.request.urlopen(f"{self.url}/v1/data/{data_path}", timeout=5) as resp:
            return json.load(resp).get("result")


@pytest.fixture
def opa(tmp_path: Path) -> Iterator[Opa]:
    binary = opa_binary()
    assert binary.exists(), f"no OPA at {binary}: run deploy/install.sh"
    policy_dir = tmp_path / "policies"
    shutil.copytree(policy.POLICY_DIR, policy_dir, ignore=shutil.ignore_patterns("*.md"))
    sink = JsonlSink(tmp_path / "audit.jsonl")
    receiver = DecisionLogReceiver(sink).start()
    config = tmp_path / "opa-config.json"
    config.write_text(json.dumps(opa_config(receiver.url)))
    port = free_port()
    log = (tmp_path / "opa.log").open("wb")
    proc = subprocess.Popen(opa_argv(binary, f"127.0.0.1:{port}", config), stdout=log, stderr=log)
    try:
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"OPA exited ({proc.returncode}): {(tmp_path / 'opa.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as resp:
                    return resp.status == 200
            except OSError:
                return False

        wait_for("OPA to serve", healthy, START_TIMEOUT_S)
        policy.push_mesh_data(url, MESH)
        yield Opa(url, policy_dir, tmp_path / "journal.jsonl", sink.path, receiver)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
        receiver.stop()
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
    assert "+package greymesh.authz" in policy.diff(opa.url, opa.policy_dir)  # runs nothing yet
    with pytest.raises(Exception):
        opa.decide("frontend", "orders")  # undefined: the bridge fails closed on it
    result = opa.push()
    assert policy.diff(opa.url, opa.policy_dir) == ""
    assert opa.decide("frontend", "orders")["policy_hash"] == result.policy_hash
    elsewhere = tmp_path / "other-checkout" / "policies"
    shutil.copytree(opa.policy_dir, elsewhere)
    again = policy.push(opa.url, elsewhere, actor="bob", journal_path=opa.journal)
    assert again.policy_hash == result.policy_hash  # same files, same hash, no conflicting copy
    assert policy.diff(opa.url, opa.policy_dir) == ""


def test_a_pushed_policy_allows_declared_edges_and_denies_the_rest_with_reasons(opa: Opa):
    result = opa.push()
    assert result.modules == ("authz.rego",) and result.pushed_by == "alice"
    assert opa.get("greymesh/policy") == {"hash": result.policy_hash, "pushed_by": "alice",
                                          "pushed_at": result.pushed_at}

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
    policy.push_mesh_data(opa.url, doc)
    opa.push()

    def decide(caller: str, callee: str) -> dict:
        ids = doc["services"]
        return policy.evaluate(opa.url, request(ids[caller]["spiffe_id"], ids[callee]["spiffe_id"]))

    assert decide("frontend", "orders")["allow"] and decide("orders", "payments")["allow"]
    assert decide("payments", "orders")["reason"] == "payments may not call orders: not in its callers"


def test_malformed_mesh_data_is_refused_before_it_reaches_opa(opa: Opa):
    opa.push()
    bad = {"services": {"a": {"spiffe_id": sid("a")},
                        "b": {"spiffe_id": sid("a"), "calls": {"a": {"path_prefixes": ["x"]}}}}}
    with pytest.raises(policy.PolicyError) as refused:
        policy.push_mesh_data(opa.url, bad)
    assert f"services.b.spiffe_id: {sid('a')} is also a's" in str(refused.value)
    assert "services.b.calls.a.path_prefixes: each must start with /" in str(refused.value)
    assert opa.get("greymesh/mesh") == MESH

    # Why: with two services behind one SPIFFE ID, OPA cannot decide at all.
    put = urllib.request.Request(f"{opa.url}/v1/data/greymesh/mesh", data=json.dumps(bad).encode(), method="PUT")
    urllib.request.urlopen(put, timeout=5).close()
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
    assert opa.get("greymesh/policy")["hash"] == good.policy_hash
    assert policy.diff(opa.url, opa.policy_dir) != ""


def test_a_module_opa_refuses_undoes_the_modules_already_replaced(opa: Opa):
    """Modules go in one by one; when OPA refuses a later one, the earlier ones are put back."""
    opa.push()
    foreign = b"package greymesh.authz\n\ndefault extra := 1\n"
    put = urllib.request.Request(f"{opa.url}/v1/policies/foreign", data=foreign, method="PUT")
    urllib.request.urlopen(put, timeout=5).close()
    opa.edit("default allow := false\n", "default allow := false\n\n# changed\n")  # authz.rego goes in first ...
    (opa.policy_dir / "extra.rego").write_text("package greymesh.authz\n\ndefault extra := 2\n")  # ... this clashes

    with pytest.raises(policy.PolicyError) as refused:
        opa.push()
    assert f"OPA refused {opa.policy_dir}/extra.rego" in str(refused.value)
    assert "opa:foreign:1: rego_type_error: multiple default rules data.greymesh.authz.extra" in str(refused.value)
    running = policy.diff(opa.url, opa.policy_dir)
    assert "+# changed" in running and "+++ " + f"{opa.policy_dir}/extra.rego" in running


# --- diff and journal --------------------------------------------------------------------


def test_diff_is_empty_after_a_push_and_shows_local_changes(opa: Opa):
    opa.push()
    assert policy.diff(opa.url, opa.policy_dir) == ""

    opa.edit("default allow := false\n", "default allow := false # deny unless a rule allows\n")
    (opa.policy_dir / "more.rego").write_text("package greymesh.more\n\nx := 1\n")
    changed = policy.diff(opa.url, opa.policy_dir)
    assert "--- running/authz.rego" in changed and f"+++ {opa.policy_dir}/authz.rego" in changed
    assert "-default allow := false\n+default allow := false # deny unless a rule allows\n" in changed
    assert f"+++ {opa.policy_dir}/more.rego" in changed and "+x := 1\n" in changed

    opa.push()
    (opa.policy_dir / "more.rego").unlink()
    assert "-x := 1\n" in policy.diff(opa.url, opa.policy_dir)
    opa.push()  # a module deleted locally leaves OPA too
    assert policy.diff(opa.url, opa.policy_dir) == ""


def test_the_journal_records_who_when_the_policy_hash_and_the_outcome(opa: Opa):
    text = (opa.policy_dir / "authz.rego").read_text()
    before = datetime.now().astimezone()
    result = opa.push()
    opa.edit("package greymesh.authz", "package greymesh.authz\n\nbroken :=")
    with pytest.raises(policy.PolicyError):
        opa.push()

    pushed, refused = opa.journal_records()
    expected = hashlib.sha256(b"authz.rego\0" + text.encode() + b"\0").hexdigest()
    assert pushed["outcome"] == "pushed" and pushed["actor"] == "alice" and pushed["sha256"] == expected
    assert result.policy_hash == expected and pushed["at"] == result.pushed_at
    assert datetime.fromisoformat(pushed["at"]) >= before.replace(microsecond=0)
    assert pushed["modules"] == ["authz.rego"] and pushed["opa"] == opa.url and pushed["version"] == 1
    assert refused["outcome"] == "refused" and refused["sha256"] != expected
    assert "does not compile" in refused["error"] and "authz.rego:" in refused["error"]


def test_an_unreachable_opa_is_reported_and_journalled(tmp_path: Path):
    journal = tmp_path / "journal.jsonl"
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(policy.OpaUnavailable, match="unreachable"):
        policy.push(url, policy.POLICY_DIR, actor="bob", journal_path=journal)
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
    opa.get("greymesh/policy")  # any other query is logged by OPA too, and ignored here

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


def post_logs(url: str, body: bytes, encoding: str | None = "gzip") -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"} | ({"Content-Encoding": encoding} if encoding else {})
    req = urllib.request.Request(f"{url}/logs", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_malformed_batches_are_counted_and_skipped_and_the_receiver_keeps_working(opa: Opa):
    url = opa.receiver.url
    assert post_logs(url, b"\x1f\x8b not really gzip")[0] == 400
    assert post_logs(url, gzip.compress(b"{not json"))[0] == 400
    assert post_logs(url, gzip.compress(b'{"an": "object"}'))[0] == 400
    assert post_logs(url, b"[]", encoding=None) == (200, {"records": 0, "ignored": 0, "bad_entries": 0})
    good = {"path": policy.DECISION_PATH, "decision_id": "d-1", "timestamp": "2026-01-01T00:00:00Z",
            "input": request(sid("frontend"), sid("orders"), "GET", "/x"),
            "result": {"allow": True, "reason": "r", "policy_hash": "h"}}
    bad = good | {"decision_id": "d-2", "result": {"allow": "yes"}}
    status, counts = post_logs(url, gzip.compress(json.dumps([bad, 7, good]).encode()))
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
    with DecisionLogReceiver(flaky) as receiver:
        body = gzip.compress(json.dumps([entry]).encode())
        assert post_logs(receiver.url, body)[0] == 500
        assert post_logs(receiver.url, body)[0] == 200
    assert [r.decision_id for r in got] == ["d"] and receiver.stats.snapshot()["sink_failures"] == 1


def test_opa_is_only_ever_bound_to_loopback():
    with pytest.raises(ValueError, match="loopback"):
        opa_argv(Path("opa"), "0.0.0.0:8181", Path("c.json"))
    assert "127.0.0.1:8181" in opa_argv(Path("opa"), "127.0.0.1:8181", Path("c.json"))


# --- `greymesh policy ...` ----------------------------------------------------------------


def policy_cli(*argv: str) -> int:
    """Run `greymesh policy ARGV` in this process, through the CLI's own entry point."""
    return greymesh_main(["policy", *argv])


def test_the_policy_commands_use_the_data_dirs_opa(opa: Opa, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    data_dir = tmp_path / "mesh"
    data_dir.mkdir()
    (data_dir / "runtime.json").write_text(json.dumps({"ports": {"opa.http": int(opa.url.rsplit(":", 1)[1])}}))
    dd = ["--data-dir", str(data_dir), "--dir", str(opa.policy_dir)]

    assert policy_cli("test", "--dir", str(opa.policy_dir)) == 0
    assert policy_cli("push", *dd) == 0
    assert "pushed" in capsys.readouterr().out and DataDir(data_dir).policy_journal.exists()
    kept = DataDir(data_dir).active_policy  # kept for a restarted OPA, with the push's meta
    assert sorted(p.name for p in kept.glob("*.rego")) == sorted(p.name for p in opa.policy_dir.glob("*.rego"))
    assert json.loads((kept / policy.KEPT_META).read_text())["hash"] == policy.policy_hash(
        policy.load_policy(opa.policy_dir))
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
