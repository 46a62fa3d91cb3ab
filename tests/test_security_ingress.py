"""The ingress hop and one canonical path, attacked on a real mesh (Envoy, OPA, the bridge).

One mesh for the module: the demo with a JWT check at its ingress (a JWKS of a key this
module holds; ``required: false``, so anonymous requests still pass where the policy lets
them) and a pushed policy with two extra rules: a *string prefix* rule on
``/anything/private`` (the kind path tricks walk around) and a rule on the
``authorization`` header.  Also: OPA's decision log masks credentials (a real OPA of its
own), and the spec's ingress fields are refused with file:line.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

import pytest
import yaml

from controlplane.identity import CertificateAuthority, spiffe_id
from controlplane.meshspec import parse_spec
from core.endpoints import entrypoint_tls
from core.installs import opa_binary
from core.specread import SpecError
from tests.support.jwt import Signer
from tests.support.mesh import DEMO_SPEC, Mesh, running_mesh, tls_context, wait_for
from tests.support.net import free_port

POLICIES = Path(__file__).resolve().parents[1] / "policies"
ISSUER, AUDIENCE = "https://login.greymesh.test", "greymesh-demo"
FRONTEND_ID = spiffe_id("greymesh.local", "default", "frontend")
# Pushed with the policy: rules the attacks below try to get around.
TEST_RULES = """package greymesh.authz

# A plain string prefix, as people write them: only a canonical path makes it hold.
deny contains sprintf("%s is private", [request_path]) if startswith(request_path, "/anything/private")

deny contains "the token is revoked" if input.attributes.request.http.headers.authorization == "Bearer revoked"

deny contains "the session is closed" if contains(input.attributes.request.http.headers.cookie, "session=closed")
"""


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer("test-key-1")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, signer: Signer) -> Iterator[Mesh]:
    work = tmp_path_factory.mktemp("ingress")
    jwks = work / "jwks.json"
    jwks.write_text(json.dumps(signer.jwks()))
    doc = yaml.safe_load(DEMO_SPEC.read_text())
    doc["ingress"] = {"jwt": {"issuer": ISSUER, "audiences": [AUDIENCE], "jwks": str(jwks), "required": False}}
    with running_mesh(work, doc, "delta") as m:
        rules = work / "policies"
        shutil.copytree(POLICIES, rules)
        (rules / "test_rules.rego").write_text(TEST_RULES)
        m.cli("policy", "push", "--dir", str(rules))
        yield m


def ingress(mesh: Mesh, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict | str]:
    """One request to the front door, the path sent byte for byte (no client-side cleanup)."""
    url = urllib.parse.urlsplit(mesh.entrypoint)
    conn = http.client.HTTPSConnection(url.hostname, url.port, timeout=10, context=tls_context(mesh.entrypoint))
    return _exchange(conn, path, headers or {})


def call(mesh: Mesh, caller: str, callee: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict | str]:
    """A request from ``caller``'s workload through its sidecar's outbound listener."""
    conn = http.client.HTTPConnection("127.0.0.1", mesh.placement()["sidecars"][caller]["outbound"], timeout=10)
    return _exchange(conn, path, {"Host": callee, **(headers or {})})


def _exchange(conn: http.client.HTTPConnection, path: str, headers: dict[str, str]) -> tuple[int, dict | str]:
    """One GET on ``conn`` (closed after): the status and the body, as JSON when it is."""
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, raw.decode("utf-8", "replace")


def audited_paths(mesh: Mesh, marker: str) -> list[tuple[str, int, str]]:
    """(path, allow, callee) of every decision OPA logged for a path holding ``marker``
    (decision log -> tap service -> Kafka -> store)."""
    rows = mesh.query(f"SELECT path, allow, callee FROM tap_audit WHERE position(path, '{marker}') > 0")
    return [(r["path"], r["allow"], r["callee"]) for r in rows]


# --- TLS at the front door ------------------------------------------------------------


def test_the_ingress_serves_a_certificate_of_the_mesh_ca_for_its_hosts(mesh: Mesh, tmp_path: Path):
    url = urllib.parse.urlsplit(mesh.entrypoint)
    assert url.scheme == "https"
    bundle = mesh.data_dir / "ca" / "greymesh.local" / "bundle.pem"
    for host in ("localhost", "127.0.0.1"):  # the spec's default hosts
        ctx = entrypoint_tls(bundle)
        with socket.create_connection((url.hostname, url.port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as s:
            sans = s.getpeercert()["subjectAltName"]
        assert ("DNS", "localhost") in sans and ("IP Address", "127.0.0.1") in sans
        assert ("URI", FRONTEND_ID) in sans  # the entrypoint's SVID: the policy sees the hop's callee
    # A client that trusts another CA refuses the ingress; a name the certificate lacks, too.
    stranger = CertificateAuthority.load_or_create(tmp_path / "stranger", "greymesh.local")
    strange = tmp_path / "stranger.pem"
    strange.write_bytes(stranger.trust_bundle_pem())
    for ctx, host in ((entrypoint_tls(strange), "localhost"), (entrypoint_tls(bundle), "shop.example.com")):
        with pytest.raises(ssl.SSLCertVerificationError):
            with socket.create_connection((url.hostname, url.port), timeout=5) as raw, \
                    ctx.wrap_socket(raw, server_hostname=host):
                pass


def test_the_ingress_refuses_plaintext(mesh: Mesh):
    url = urllib.parse.urlsplit(mesh.entrypoint)
    with socket.create_connection((url.hostname, url.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: frontend\r\n\r\n")
        try:
            answer = s.recv(100)
        except ConnectionResetError:
            answer = b""
    assert not answer.startswith(b"HTTP/"), answer
    status, body = ingress(mesh, "/")
    assert status == 200 and body["service"] == "frontend"  # the same port over TLS


# --- one canonical path -----------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "/anything/public%2F..%2Fprivate",
    "/anything/public%2f..%2fprivate",
    "/anything%2Fprivate",
    "/anything/public%5C..%5Cprivate",
])
def test_escaped_slashes_are_refused_at_the_ingress_and_between_services(mesh: Mesh, path: str):
    status, body = ingress(mesh, path)
    assert status == 400, body
    status, body = call(mesh, "orders-1", "inventory", path)  # the outbound and inbound listeners too
    assert status == 400, body


def test_dot_segments_cannot_walk_around_a_prefix_rule(mesh: Mesh):
    marker = uuid.uuid4().hex[:12]
    tricks = [f"/anything/public/../private/{marker}", f"/anything/./private/{marker}",
              f"//anything//private/{marker}", f"/anything/public/%2e%2e/private/{marker}"]
    for path in tricks:
        status, body = ingress(mesh, path)
        assert status == 403, (path, status, body)
        assert body["reason"] == f"/anything/private/{marker} is private", (path, body)
        status, body = call(mesh, "orders-1", "inventory", path)
        assert status == 403 and body["reason"] == f"/anything/private/{marker} is private", (path, body)


def test_routing_the_policy_and_the_app_see_the_same_path(mesh: Mesh):
    marker = uuid.uuid4().hex[:12]
    status, body = ingress(mesh, f"/anything/x/../{marker}/./y//z")
    assert status == 200, body
    canonical = f"/anything/{marker}/y/z"
    # The app (frontend), and every service it called with that path, received the canonical one.
    assert body["path"] == canonical
    assert {c["response"]["path"] for c in body["calls"]} == {canonical}
    # OPA decided on the same path at the ingress and at every hop behind it.
    wait_for(lambda: len(audited_paths(mesh, marker)) >= 4, 30, "the decisions to reach the tap store")
    decided = audited_paths(mesh, marker)
    assert {path for path, _, _ in decided} == {canonical}, decided
    assert all(allow == 1 for _, allow, _ in decided)
    assert FRONTEND_ID in {callee for _, _, callee in decided}  # the ingress hop's decision


# --- credentials reach the policy -----------------------------------------------------------


def test_a_rule_on_the_authorization_header_fires(mesh: Mesh):
    status, body = call(mesh, "orders-1", "inventory", "/anything/a", {"Authorization": "Bearer revoked"})
    assert status == 403 and body["reason"] == "the token is revoked", body
    assert call(mesh, "orders-1", "inventory", "/anything/a", {"Authorization": "Bearer fine"})[0] == 200
    status, body = call(mesh, "orders-1", "inventory", "/anything/a", {"Cookie": "a=1; session=closed"})
    assert status == 403 and body["reason"] == "the session is closed", body


# --- end-user identity at the ingress -----------------------------------------------------------


def test_a_verified_jwts_claims_reach_the_policy(mesh: Mesh, signer: Signer):
    admin = signer.token({"iss": ISSUER, "aud": AUDIENCE, "sub": "ada", "roles": ["admin"]})
    dev = signer.token({"iss": ISSUER, "aud": AUDIENCE, "sub": "bob", "roles": ["dev"]})
    status, body = ingress(mesh, "/admin/users", {"Authorization": f"Bearer {admin}"})
    assert status == 200 and body["path"] == "/admin/users", body
    status, body = ingress(mesh, "/admin/users", {"Authorization": f"Bearer {dev}"})
    assert status == 403 and body["reason"] == "/admin/users at the ingress needs a JWT with role admin", body
    status, body = ingress(mesh, "/admin/users")  # no token: the policy asks for one here
    assert status == 403 and body["reason"] == "/admin/users at the ingress needs a JWT with role admin", body
    status, body = ingress(mesh, "/admin/../admin/users", {"Authorization": f"Bearer {admin}"})
    assert status == 200 and body["path"] == "/admin/users"


def test_bad_tokens_are_refused_at_the_ingress(mesh: Mesh, signer: Signer):
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "ada", "roles": ["admin"]}
    stranger = Signer(signer.kid)  # same key id, another key: a forged signature
    bad = {  # what -> (token, Envoy's answer): 401 an unverifiable token, 403 one for someone else
        "expired": (signer.token(claims, lifetime_s=-120), 401, "Jwt is expired"),
        "wrongly signed": (stranger.token(claims), 401, "Jwt verification fails"),
        "wrong issuer": (signer.token({**claims, "iss": "https://evil.example"}), 401, "Jwt issuer is not configured"),
        "wrong audience": (signer.token({**claims, "aud": "someone-else"}), 403, "Audiences in Jwt are not allowed"),
        "not a JWT": ("revoked", 401,
                      "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"),
    }
    for what, (token, code, message) in bad.items():
        assert ingress(mesh, "/anything/x", {"Authorization": f"Bearer {token}"}) == (code, message), what
    assert ingress(mesh, "/anything/x", {"Authorization": f"Bearer {signer.token(claims)}"})[0] == 200


def test_a_spec_that_requires_a_jwt_refuses_requests_without_one(mesh: Mesh, signer: Signer):
    doc = mesh.spec()
    doc["ingress"]["jwt"]["required"] = True
    try:
        assert mesh.apply(doc).returncode == 0
        wait_for(lambda: ingress(mesh, "/anything/x")[0] == 401, 10, "the ingress to require a JWT")
        token = signer.token({"iss": ISSUER, "aud": AUDIENCE, "sub": "ada"})
        assert ingress(mesh, "/anything/x", {"Authorization": f"Bearer {token}"})[0] == 200
    finally:
        assert mesh.apply(mesh.spec()).returncode == 0
    wait_for(lambda: ingress(mesh, "/anything/x")[0] == 200, 10, "anonymous requests to pass again")


# --- OPA's decision log masks credentials -----------------------------------------------------------


class _Logs(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        _Logs.received.extend(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_opas_decision_log_carries_no_bearer_token_or_cookie(tmp_path: Path):
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Logs)
    Thread(target=receiver.serve_forever, daemon=True).start()
    port = free_port()
    config = tmp_path / "opa.json"
    config.write_text(json.dumps({
        "services": {"logs": {"url": f"http://127.0.0.1:{receiver.server_port}"}},
        "decision_logs": {"service": "logs", "reporting": {"min_delay_seconds": 1, "max_delay_seconds": 1}},
    }))
    modules = [p for p in POLICIES.glob("*.rego") if not p.name.endswith("_test.rego")]
    opa = subprocess.Popen([str(opa_binary()), "run", "--server", "--addr", f"127.0.0.1:{port}", "--config-file",
                            str(config), "--skip-version-check", *map(str, modules)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _ok(f"{base}/health"), 10, "OPA to answer")
        doc = {"input": {"attributes": {"request": {"http": {"method": "GET", "path": "/", "headers": {
            "authorization": "Bearer secret-token-123", "cookie": "session=secret-cookie-456", "x-other": "kept"}}}}}}
        req = urllib.request.Request(f"{base}/v1/data/greymesh/authz/decision", data=json.dumps(doc).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=5).read()
        wait_for(lambda: bool(_Logs.received), 10, "OPA's decision log")
    finally:
        opa.terminate()
        opa.wait(10)
        receiver.shutdown()
    logged = json.dumps(_Logs.received)
    assert "secret-token-123" not in logged and "secret-cookie-456" not in logged
    entry = _Logs.received[0]
    assert entry["input"]["attributes"]["request"]["http"]["headers"] == {"x-other": "kept"}
    assert set(entry["erased"]) >= {"/input/attributes/request/http/headers/authorization",
                                    "/input/attributes/request/http/headers/cookie"}


def _ok(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=1).status == 200
    except OSError:
        return False


# --- the spec's ingress fields ------------------------------------------------------------


def _spec(ingress_yaml: str) -> str:
    return DEMO_SPEC.read_text().replace("services:\n", f"ingress:\n{ingress_yaml}services:\n", 1)


def _problem(text: str) -> str:
    with pytest.raises(SpecError) as exc:
        parse_spec(text, source="mesh.yaml")
    return str(exc.value)


def _line(text: str, needle: str) -> int:
    return text.splitlines().index(next(x for x in text.splitlines() if needle in x)) + 1


def test_spec_errors_in_the_ingress_name_file_and_line(tmp_path: Path, signer: Signer):
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(signer.jwks()))
    jwt = f"  jwt:\n    issuer: {ISSUER}\n    audiences: [{AUDIENCE}]\n"
    text = _spec(jwt + f"    jwks: {tmp_path}/missing.json\n")
    assert _problem(text) == f"mesh.yaml:{_line(text, 'jwks:')}: ingress.jwt.jwks: no such file: {tmp_path}/missing.json"
    text = _spec(jwt + "    jwks: jwks.json\n")
    assert f"mesh.yaml:{_line(text, 'jwks:')}: ingress.jwt.jwks: 'jwks.json' is relative" in _problem(text)
    private = tmp_path / "private.json"
    private.write_text(json.dumps({"keys": [{**signer.jwks()["keys"][0], "d": "x"}]}))
    text = _spec(jwt + f"    jwks: {private}\n")
    assert "ingress.jwt.jwks: " in _problem(text) and "holds private key material" in _problem(text)
    not_jwks = tmp_path / "not.json"
    not_jwks.write_text('{"kty": "RSA"}')
    assert "is not a JWKS" in _problem(_spec(jwt + f"    jwks: {not_jwks}\n"))
    ok = parse_spec(_spec(jwt + f"    jwks: {jwks}\n"))
    assert ok.ingress.jwt.issuer == ISSUER and ok.ingress.jwt.required and ok.ingress.jwt.audiences == (AUDIENCE,)

    ca = CertificateAuthority.load_or_create(tmp_path / "ca", "greymesh.local")
    svid = ca.issue(FRONTEND_ID, timedelta(hours=1), hosts=("shop.example.com",))
    cert, key = tmp_path / "ingress.crt", tmp_path / "ingress.key"
    cert.write_bytes(svid.chain_pem)
    text = _spec(f"  tls:\n    cert: {cert}\n    key: {key}\n")
    assert _problem(text) == f"mesh.yaml:{_line(text, 'key:')}: ingress.tls.key: no such file: {key}"
    key.write_bytes(svid.key_pem)
    os.chmod(key, 0o644)
    assert f"mesh.yaml:{_line(text, 'key:')}: ingress.tls.key: {key}: mode 0644 lets other users read" in _problem(text)
    os.chmod(key, 0o600)
    spec = parse_spec(text)
    assert spec.ingress.tls.key_pem == svid.key_pem and "PRIVATE KEY" not in repr(spec)
    other = tmp_path / "other.key"
    other.write_bytes(ca.issue(FRONTEND_ID, timedelta(hours=1)).key_pem)
    os.chmod(other, 0o600)
    text = _spec(f"  tls:\n    cert: {cert}\n    key: {other}\n")
    assert f"mesh.yaml:{_line(text, 'key:')}: ingress.tls.key: {other} is not the key of" in _problem(text)
    text = _spec("  hosts: [Shop_Example]\n")
    assert f"mesh.yaml:{_line(text, 'hosts:')}: ingress.hosts[0]: 'Shop_Example' is not a valid host name" \
        in _problem(text)
    assert _problem(_spec("  hosts: []\n")).endswith("ingress.hosts: give at least one host name")


def test_anonymous_traffic_and_the_loadgen_pass_the_tls_ingress(mesh: Mesh):
    """Clients of the front door keep working: they trust the mesh CA's bundle (runtime.json)."""
    start = time.monotonic()
    statuses = [ingress(mesh, "/")[0] for _ in range(20)]
    assert statuses == [200] * 20, statuses
    assert time.monotonic() - start < 20
    tally = json.loads((mesh.data_dir / "loadgen.json").read_text())
    assert tally["outcomes"].get("200", 0) > 0, tally
