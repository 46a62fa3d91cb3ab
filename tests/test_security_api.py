"""Attacks on greymesh's HTTP APIs: each must be refused before a handler runs or a body is read.

The guard lives in one place (core/jsonhttp.py); the unit cases drive it in process, on a
server of its own, on the real decision-log receiver and on the control plane's override
endpoints.  The e2e cases attack the real
daemons of one running mesh (control plane admin API, sink, tap service) the way a local
process or a browser page would: no token, a wrong or another holder's token, a foreign
Origin or Host, a cross-site ``text/plain`` POST, a negative or oversized Content-Length
on a raw socket, a forged decision-log batch, a forged ``X-Greymesh-Source``.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

from audit.migrations import table_for
from controlplane.daemon import MAX_APPLY_BODY_BYTES
from core import credentials, jsonhttp
from core.contracts import DECISION_PATH
from core.datadir import DataDir
from core.jsonhttp import ACTIONS, CLI, Access, ApiHandler, Credential
from core.storeclient import sql_string
from greymesh.runtime.workloads import ACTIONS_TOKEN, DECISIONLOG_TOKEN, SCORER_TOKEN
from tapstream.decisionlog import OPA, DecisionLogReceiver, receiver_access
from tests.support.controlplane import admin_plane, prepare
from tests.support.mesh import DEMO_SPEC, Mesh, wait_for

HOST = "127.0.0.1"
ANSWER_WITHIN_S = 3.0  # a refusal comes at once; a server that waited for a body would hold the socket 30 s


# --- talking to an API the way an attacker does ---------------------------------------------


def request(url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
            method: str | None = None) -> tuple[int, dict]:
    """(status, JSON answer) of one request, whatever the status."""
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def raw(port: int, head: str) -> tuple[int, float]:
    """Send only a request head (never a body, never closing) and return (status, seconds to
    the answer).  A server that read the announced body would not answer in time."""
    with socket.create_connection((HOST, port), timeout=ANSWER_WITHIN_S) as s:
        started = time.monotonic()
        s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
        first = s.recv(4096).split(b"\r\n", 1)[0]  # socket.timeout here: the server waited for the body
        return int(first.split()[1]), time.monotonic() - started


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


JSON = {"Content-Type": "application/json"}


# --- unit: the guard of core/jsonhttp.py on a server of its own ----------------------------------


class Echo(ApiHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_json(200, {"principal": self.principal, "path": self.path})

    def do_POST(self) -> None:  # noqa: N802
        self.send_json(200, {"principal": self.principal, "body": json.loads(self.read_body() or b"null")})


@pytest.fixture
def echo() -> Iterator[tuple[int, dict[str, str]]]:
    """An API with two holders ("cli" everywhere, "reader" only on /read), bodies <= 100 bytes."""
    tokens = {CLI: credentials.new_token(), "reader": credentials.new_token()}
    access = Access(tuple(Credential(p, t) for p, t in tokens.items()), max_body_bytes=100,
                    only={"/admin": frozenset({CLI})})
    server = jsonhttp.serve(Echo, HOST, 0, access)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], tokens
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.unit
def test_the_guard_admits_a_holder_and_knows_who_it_is(echo):
    port, tokens = echo
    assert request(f"http://{HOST}:{port}/admin", headers=bearer(tokens[CLI])) == (200, {"principal": CLI,
                                                                                       "path": "/admin"})
    status, doc = request(f"http://{HOST}:{port}/x", json.dumps({"a": 1}).encode(), bearer(tokens["reader"]) | JSON)
    assert (status, doc) == (200, {"principal": "reader", "body": {"a": 1}})
    # The client of core/jsonhttp.py sends the token it is given, and says a refusal's reason.
    assert jsonhttp.get(f"http://{HOST}:{port}/admin", token=tokens[CLI])["principal"] == CLI
    with pytest.raises(jsonhttp.ApiError, match="requires its credential") as refused:
        jsonhttp.get(f"http://{HOST}:{port}/admin")
    assert refused.value.status == 401


@pytest.mark.unit
def test_the_guard_refuses_without_the_credential_and_says_nothing_of_it(echo):
    port, tokens = echo
    url = f"http://{HOST}:{port}/admin"
    for headers in ({}, bearer("wrong"), bearer(tokens[CLI] + "x"), {"Authorization": tokens[CLI]},
                    {"Authorization": f"Basic {tokens[CLI]}"}):
        status, doc = request(url, headers=headers)
        assert status == 401, headers
        assert tokens[CLI] not in json.dumps(doc) and "reader" not in json.dumps(doc)
    assert request(url, headers=bearer(tokens["reader"]))[0] == 403  # a holder, but not of this path


@pytest.mark.unit
def test_the_guard_refuses_cross_site_requests(echo):
    port, tokens = echo
    url = f"http://{HOST}:{port}/x"
    ok = bearer(tokens[CLI])
    # What a browser page can send without a preflight: a text/plain POST (with or without the token).
    assert request(url, b'{"a": 1}', {"Content-Type": "text/plain", "Origin": "http://evil.example"})[0] in (401, 403)
    assert request(url, b'{"a": 1}', ok | {"Content-Type": "text/plain"})[0] == 415
    assert request(url, b'{"a": 1}', ok | {"Content-Type": "application/x-www-form-urlencoded"})[0] == 415
    assert request(url, b'{"a": 1}', ok)[0] == 415  # no Content-Type at all
    for origin in ("http://evil.example", "null", f"http://localhost:{port + 1}", f"https://{HOST}:{port}"):
        assert request(url, headers=ok | {"Origin": origin})[0] == 403, origin
    assert request(url, headers=ok | {"Origin": f"http://{HOST}:{port}"})[0] == 200  # same origin
    for site in ("cross-site", "same-site"):  # another port on localhost is "same-site"
        assert request(url, headers=ok | {"Sec-Fetch-Site": site})[0] == 403, site
    for host in ("evil.example", f"evil.example:{port}", f"{HOST}:{port + 1}", f"{HOST}"):  # DNS rebinding
        assert request(url, headers=ok | {"Host": host})[0] == 421, host
    assert request(url, headers=ok | {"Host": f"localhost:{port}"})[0] == 200


@pytest.mark.unit
def test_the_guard_bounds_bodies_without_reading_them(echo):
    port, tokens = echo
    auth = f"Authorization: Bearer {tokens[CLI]}\nContent-Type: application/json"
    for length, status in (("-1", 400), ("101", 413), ("99999999999", 413), ("abc", 400), ("+5", 400),
                           ("5, 5", 400)):
        got, took = raw(port, f"POST /x HTTP/1.1\nHost: {HOST}:{port}\n{auth}\nContent-Length: {length}\n")
        assert (got, took < ANSWER_WITHIN_S) == (status, True), length
    assert raw(port, f"POST /x HTTP/1.1\nHost: {HOST}:{port}\n{auth}\n")[0] == 411  # no length
    assert raw(port, f"POST /x HTTP/1.1\nHost: {HOST}:{port}\n{auth}\nTransfer-Encoding: chunked\n")[0] == 411
    assert raw(port, f"POST /x HTTP/1.1\nHost: {HOST}:{port}\nContent-Length: -1\n")[0] == 401  # auth first
    # Within the bound, the body is read and the connection goes on serving.
    status, doc = request(f"http://{HOST}:{port}/x", b'"' + b"x" * 98 + b'"', bearer(tokens[CLI]) | JSON)
    assert status == 200 and doc["body"] == "x" * 98


@pytest.mark.unit
def test_healthz_is_open_and_says_nothing_but_ok(echo):
    port, _ = echo
    assert request(f"http://{HOST}:{port}/healthz") == (200, {"ok": True})
    assert request(f"http://{HOST}:{port}/healthz", headers={"Host": "evil.example"})[0] == 421
    assert request(f"http://{HOST}:{port}/healthz?verbose=1")[0] == 401  # only the exact probe is open
    assert jsonhttp.http_ok(f"http://{HOST}:{port}/healthz")


@pytest.mark.unit
def test_an_api_cannot_be_served_without_its_access():
    with pytest.raises(TypeError, match="Access"):
        jsonhttp.serve(Echo, HOST, 0)
    with pytest.raises(ValueError, match="no credential"):
        Access((Credential(CLI, "t"),), 10, only={"/logs": frozenset({OPA})})


# --- unit: the control plane's override endpoints, in process -------------------------------------


@pytest.mark.unit
@pytest.mark.asyncio
async def test_the_override_endpoints_refuse_attacks_and_change_nothing(tmp_path):
    dd = prepare(tmp_path / "data", DEMO_SPEC.read_text())
    async with admin_plane(dd) as plane:
        port = int(plane.url.rsplit(":", 1)[1])
        versions = {n: snap.version_key for n, snap in plane.cp.cache.snapshots().items()}
        url, body = plane.url + "/overrides/payments", json.dumps({"id": "x", "reason": "r", "timeout_s": 1}).encode()
        actions = bearer(plane.tokens[ACTIONS])
        attacks = [("PUT", body, JSON, 401), ("DELETE", None, {}, 401), ("GET", None, {}, 401),  # no token
                   ("PUT", body, JSON | bearer(plane.tokens[ACTIONS][:-1]), 401),  # a wrong one
                   ("PUT", body, JSON | actions | {"Origin": "http://evil.example"}, 403),  # a page's fetch
                   ("PUT", body, actions | {"Content-Type": "text/plain"}, 415),  # a page's form
                   ("PUT", b'{"id": "x", "reason": ', JSON | actions, 400)]  # bad JSON
        for method, data, headers, status in attacks:
            target = plane.url + "/overrides" if method == "GET" else url
            assert (await asyncio.to_thread(request, target, data, headers, method))[0] == status, (method, headers)
        head = f"PUT /overrides/payments HTTP/1.1\nHost: {HOST}:{port}\nAuthorization: Bearer {plane.tokens[ACTIONS]}\n"
        status, took = await asyncio.to_thread(raw, port, head + f"Content-Type: application/json\nContent-Length: "
                                                            f"{MAX_APPLY_BODY_BYTES + 1}\n")
        assert (status, took < ANSWER_WITHIN_S) == (413, True)  # refused before a byte of it is read
        assert {n: snap.version_key for n, snap in plane.cp.cache.snapshots().items()} == versions
        assert not dd.overrides.exists() and len(plane.cp.overrides) == 0


# --- unit: the real decision-log receiver --------------------------------------------------------


def decision_batch(decision_id: str) -> bytes:
    """One gzip'ed decision-log batch, as OPA posts it, for the mesh's authorization rule."""
    entry = {"path": DECISION_PATH, "decision_id": decision_id, "timestamp": "2026-01-01T00:00:00Z",
             "input": {"attributes": {"source": {"principal": "spiffe://greymesh.local/ns/default/sa/frontend"},
                                      "destination": {"principal": "spiffe://greymesh.local/ns/default/sa/orders"},
                                      "request": {"http": {"method": "GET", "path": "/forged"}}}},
             "result": {"allow": True, "reason": "forged", "policy_hash": "h"}}
    return gzip.compress(json.dumps([entry]).encode())


OPA_HEADERS = {"Content-Type": "application/json", "Content-Encoding": "gzip"}  # what OPA sends


@pytest.mark.unit
def test_a_forged_decision_log_post_stores_nothing_and_opas_own_is_taken():
    stored: list = []
    opa, cli = Credential(OPA, credentials.new_token()), Credential(CLI, credentials.new_token())
    with DecisionLogReceiver(stored.extend, receiver_access(opa, cli)) as receiver:
        url = f"{receiver.url}/logs"
        assert request(url, decision_batch("forged-1"), OPA_HEADERS)[0] == 401
        assert request(url, decision_batch("forged-2"), OPA_HEADERS | bearer("guess"))[0] == 401
        assert request(url, decision_batch("forged-3"), OPA_HEADERS | bearer(cli.token))[0] == 403  # not OPA's
        assert request(url, decision_batch("forged-4"), {"Content-Type": "text/plain"} | bearer(opa.token))[0] == 415
        assert stored == [] and receiver.stats.snapshot()["batches"] == 0
        assert request(url, decision_batch("real"), OPA_HEADERS | bearer(opa.token))[0] == 200
        assert request(f"{receiver.url}/stats", headers=bearer(opa.token))[0] == 403  # OPA reads no stats
        assert request(f"{receiver.url}/stats", headers=bearer(cli.token))[0] == 200
    assert [r.decision_id for r in stored] == ["real"]


# --- e2e: the real daemons of one mesh -----------------------------------------------------------


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """One demo mesh for every attack below (they change nothing it serves)."""
    work = tmp_path_factory.mktemp("security-api")
    spec = work / "mesh.yaml"
    spec.write_text(DEMO_SPEC.read_text())
    m = Mesh(work / "data", spec, "delta", ("--rps", "2"))
    try:
        m.up()
        yield m
    finally:
        m.cli("down", check=False)


def _apis(mesh: Mesh) -> dict[str, tuple[int, str, str]]:
    """Every HTTP API of the mesh: name -> (port, a GET path, a POST path)."""
    ports = mesh.ports()
    return {"controlplane": (ports["controlplane.admin"], "/status", "/apply"),
            "sink": (ports["sink.http"], "/stats", "/query"),
            "taps": (ports["taps.http"], "/stats", "/logs"),
            "taps-2": (ports["taps-2.http"], "/stats", "/logs"),
            "actions": (ports["actions.http"], "/status", "/silences")}


def _secret(mesh: Mesh, name: str) -> str:
    return credentials.read(DataDir(mesh.data_dir).secret(name))


def _poster(mesh: Mesh, post_path: str) -> str:
    """The token of the one who may POST to ``post_path``: OPA for /logs, the CLI elsewhere."""
    return _secret(mesh, DECISIONLOG_TOKEN) if post_path == "/logs" else mesh.api_token()


def test_every_api_refuses_calls_without_its_credential(mesh: Mesh):
    token = mesh.api_token()
    for name, (port, get_path, post_path) in _apis(mesh).items():
        base = f"http://{HOST}:{port}"
        assert request(base + get_path)[0] == 401, name
        assert request(base + get_path, headers=bearer("x" * len(token)))[0] == 401, name
        assert request(base + post_path, b"{}", JSON)[0] == 401, name
        assert request(base + post_path, b"{}", JSON | bearer(token[:-1]))[0] == 401, name
        assert request(base + "/healthz") == (200, {"ok": True}), name  # the supervisor's probe
    # Each holder only where it must be: the scorer queries the sink, OPA posts decisions.
    ports = mesh.ports()
    scorer, opa = _secret(mesh, SCORER_TOKEN), _secret(mesh, DECISIONLOG_TOKEN)
    assert request(f"http://{HOST}:{ports['sink.http']}/query", b'{"sql": "SELECT 1"}', JSON | bearer(scorer))[0] == 200
    assert request(f"http://{HOST}:{ports['sink.http']}/stats", headers=bearer(scorer))[0] == 403
    assert request(f"http://{HOST}:{ports['controlplane.admin']}/status", headers=bearer(scorer))[0] == 401
    assert request(f"http://{HOST}:{ports['controlplane.admin']}/status", headers=bearer(opa))[0] == 401
    assert request(f"http://{HOST}:{ports['taps.http']}/stats", headers=bearer(opa))[0] == 403
    # The actions stage reads the store and asks for overrides; it applies nothing, and its
    # own API answers the CLI only (a stolen stage token cannot unfreeze or revert).
    actions = _secret(mesh, ACTIONS_TOKEN)
    assert request(f"http://{HOST}:{ports['sink.http']}/query", b'{"sql": "SELECT 1"}', JSON | bearer(actions))[0] == 200
    assert request(f"http://{HOST}:{ports['controlplane.admin']}/overrides", headers=bearer(actions))[0] == 200
    assert request(f"http://{HOST}:{ports['controlplane.admin']}/apply", b"{}", JSON | bearer(actions))[0] == 403
    assert request(f"http://{HOST}:{ports['actions.http']}/unfreeze", b"{}", JSON | bearer(actions))[0] == 401
    assert request(f"http://{HOST}:{ports['actions.http']}/status", headers=bearer(scorer))[0] == 401


def test_every_api_refuses_cross_site_requests(mesh: Mesh):
    token = mesh.api_token()
    for name, (port, get_path, post_path) in _apis(mesh).items():
        base = f"http://{HOST}:{port}"
        # A page's form or fetch without preflight: text/plain, its own Origin, no credential it could read.
        assert request(base + post_path, b'{"sql": "SELECT 1"}', {"Content-Type": "text/plain",
                                                               "Origin": "http://evil.example"})[0] in (401, 403)
        poster = _poster(mesh, post_path)
        assert request(base + post_path, b"{}", bearer(poster) | {"Content-Type": "text/plain"})[0] == 415, name
        assert request(base + get_path, headers=bearer(token) | {"Origin": "http://evil.example"})[0] == 403, name
        assert request(base + get_path, headers=bearer(token) | {"Sec-Fetch-Site": "cross-site"})[0] == 403, name
        assert request(base + get_path, headers=bearer(token) | {"Host": f"rebound.example:{port}"})[0] == 421, name
        assert request(base + get_path, headers=bearer(token))[0] == 200, name


def test_every_api_refuses_unbounded_bodies_without_reading_them(mesh: Mesh):
    for name, (port, _, post_path) in _apis(mesh).items():
        auth = f"Authorization: Bearer {_poster(mesh, post_path)}"
        head = f"POST {post_path} HTTP/1.1\nHost: {HOST}:{port}\n{auth}\nContent-Type: application/json\n"
        status, took = raw(port, head + "Content-Length: -1\n")
        assert status == 400 and took < ANSWER_WITHIN_S, name
        status, took = raw(port, head + f"Content-Length: {1 << 40}\n")
        assert status == 413 and took < ANSWER_WITHIN_S, name
        assert raw(port, head)[0] == 411, name
    # The daemons still serve.
    assert mesh.status()["controlplane"]["nodes"]


def test_a_forged_decision_log_post_reaches_no_store(mesh: Mesh):
    """A batch posted without OPA's token is refused; one posted after it with OPA's token is
    stored, so once that one is in the store the forged one would be too, had it been taken."""
    ports, forged, genuine = mesh.ports(), f"forged-{uuid.uuid4()}", f"witness-{uuid.uuid4()}"
    url = f"http://{HOST}:{ports['taps.http']}/logs"
    assert request(url, decision_batch(forged), OPA_HEADERS)[0] == 401
    assert request(url, decision_batch(forged), OPA_HEADERS | bearer(mesh.api_token()))[0] == 403
    assert request(url, decision_batch(genuine), OPA_HEADERS | bearer(_secret(mesh, DECISIONLOG_TOKEN)))[0] == 200

    def stored(decision_id: str) -> bool:
        return bool(mesh.query(f"SELECT event_id FROM {table_for('audit')} WHERE event_id = {sql_string(decision_id)}"))

    wait_for(lambda: stored(genuine), 30, "the batch posted with OPA's token to be stored")
    assert not stored(forged)


def test_the_journal_records_who_applied_not_what_the_request_claims(mesh: Mesh):
    port, token = mesh.ports()["controlplane.admin"], mesh.api_token()
    journal = mesh.data_dir / "applies.jsonl"
    before = len(journal.read_text().splitlines())
    applied = (mesh.data_dir / "applied.yaml").read_text()
    status, _ = request(f"http://{HOST}:{port}/apply", json.dumps({"spec": applied}).encode(),
                        JSON | bearer(token) | {"X-Greymesh-Source": "controlplane-itself", "X-Greymesh-By": "x"})
    assert status == 200
    entries = [json.loads(line) for line in journal.read_text().splitlines()[before:]]
    assert [(e["outcome"], e["source"]) for e in entries] == [("applied", CLI)]
    # The CLI's own apply is recorded the same way; the file it names is where, not who.
    assert mesh.cli("apply", str(mesh.spec_path)).returncode == 0
    last = json.loads(journal.read_text().splitlines()[-1])
    assert (last["source"], last["file"]) == (CLI, str(mesh.spec_path))
    assert mesh.status()["controlplane"]["spec"]["by"] == CLI


def test_the_cli_works_with_no_flag_and_no_secret_leaves_its_file(mesh: Mesh):
    doc = mesh.status()
    assert doc["mesh"] == "running" and doc["controlplane"]["nodes"]
    assert "error" not in doc["taps"]["collector"] and "error" not in doc["taps"]["sink"]
    out = mesh.cli("taps", "query", "SELECT 1 AS one", "--json").stdout
    assert json.loads(out.splitlines()[0]) == {"one": 1}
    assert mesh.cli("taps", "stats", "--interval", "0.2").returncode == 0
    secrets_dir = DataDir(mesh.data_dir).secrets
    names = ("api.token", SCORER_TOKEN, DECISIONLOG_TOKEN, ACTIONS_TOKEN)
    tokens = [credentials.read(secrets_dir / n) for n in names]
    assert all((secrets_dir / n).stat().st_mode & 0o077 == 0 for n in names)
    shown = "".join(p.read_text() for p in (mesh.data_dir / "workloads.json", mesh.data_dir / "runtime.json"))
    shown += mesh.cli("status", "--json").stdout
    shown += "".join(p.read_text(errors="replace") for p in DataDir(mesh.data_dir).logs.iterdir() if p.is_file())
    assert not [t for t in tokens if t in shown]
