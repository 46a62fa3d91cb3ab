"""The authorization bridge: Envoy's ext_authz gRPC API in front of a real OPA server.

Every inbound listener asks ``envoy.service.auth.v3.Authorization/Check`` before a
request reaches its workload.  The OPA Envoy plugin would answer that itself, but
the Go module proxy here refuses it, so this bridge does the same job.  It gives
plain OPA the same input document the plugin would build
(``input.attributes.source.principal``, ``...destination.principal``,
``...request.http``, ``...context_extensions``, ``...metadata_context``,
``input.parsed_path``) and asks ``data.greymesh.authz.decision``.  The policies in
policies/ would therefore run unchanged under the plugin.

The path is the one Envoy routes on and the app receives: the sidecars normalize it
and refuse escaped slashes before ext_authz (controlplane/translate.py), and
``parsed_path`` is its percent-decoded segments, so ``%2e%2e`` is a ``..`` segment the
policy refuses, never a name.  Every header goes to OPA, ``authorization`` and
``cookie`` included, so a rule can decide on them; OPA's decision log masks them
(policies/log_mask.rego).  On the ingress hop, a JWT that Envoy's jwt_authn verified
reaches the policy as its claims (``metadata_context``; policies/README.md).

Identities come from Envoy's attribute context.  Envoy fills ``source.principal``
from the peer certificate it verified during the mTLS handshake, so a caller cannot
claim an identity with a header.

If OPA cannot be reached, the bridge answers UNAVAILABLE.  Envoy then applies the
sidecar's failure mode: deny by default, allow only for services that opted in with
``authz.fail_open``.  One bridge and one OPA serve all sidecars on a host: a
decision costs a loopback hop, not an extra process per sidecar.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import threading
import urllib.parse
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as authz_pb2
from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import json_format, struct_pb2
from google.rpc import code_pb2, status_pb2

from core.contracts import DECISION_PATH
from core import credentials
from core.credentials import CredentialError
from core.sidecar_auth import METADATA_KEY, Authenticator, SidecarTokens

log = logging.getLogger("greymesh.authz")

DECISION_URL_PATH = f"/v1/data/{DECISION_PATH}"
# Below the sidecars' ext_authz timeout (500 ms): the bridge gives up before Envoy does.
OPA_TIMEOUT_S = 0.4


@dataclass(frozen=True)
class Decision:
    allow: bool
    reason: str


class PolicyUnavailable(Exception):
    """OPA could not be asked, or gave no usable decision."""


def opa_input(req: authz_pb2.CheckRequest) -> dict:
    """The input document opa-envoy-plugin would build for this request."""
    attrs = req.attributes
    http_req = attrs.request.http
    path = http_req.path
    return {
        "attributes": {
            "source": {"principal": attrs.source.principal, "address": _address(attrs.source.address)},
            "destination": {"principal": attrs.destination.principal, "address": _address(attrs.destination.address)},
            "request": {
                "http": {
                    "id": http_req.id,
                    "method": http_req.method,
                    "path": path,
                    "host": http_req.host,
                    "protocol": http_req.protocol,
                    "headers": dict(http_req.headers),
                }
            },
            "context_extensions": dict(attrs.context_extensions),
            "metadata_context": {"filter_metadata": {
                ns: json_format.MessageToDict(md) for ns, md in attrs.metadata_context.filter_metadata.items()
            }},
        },
        "parsed_path": parsed_path(path),
    }


def parsed_path(path: str) -> list[str]:
    """The path's segments without the query string, each percent-decoded (as the plugin's
    Go url.Parse does): ``/a/%2e%2e/b?x`` -> ``["a", "..", "b"]``."""
    return [urllib.parse.unquote(p) for p in path.split("?", 1)[0].split("/") if p]


def _address(addr: base_pb2.Address) -> dict:
    sock = addr.socket_address
    return {"address": sock.address, "port": sock.port_value}


class OpaClient(threading.local):
    """One keep-alive connection to OPA per bridge thread, presenting the bridge's token
    (OPA's authorization policy lets it ask the decision and nothing else)."""

    def __init__(self, host: str, port: int, token: str, timeout_s: float = OPA_TIMEOUT_S):
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        self.conn: http.client.HTTPConnection | None = None

    def decide(self, doc: dict) -> Decision:
        body = json.dumps({"input": doc}).encode()
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            try:
                self.conn.request("POST", DECISION_URL_PATH, body, self.headers)
                resp = self.conn.getresponse()
                raw = resp.read()
                break
            except (OSError, http.client.HTTPException) as exc:
                self.conn.close()
                self.conn = None
                # Only a keep-alive connection OPA had closed is worth one fresh try; after a
                # timeout Envoy has already given up on this check (and a retry would log twice).
                stale = isinstance(exc, ConnectionResetError | BrokenPipeError | http.client.RemoteDisconnected)
                if attempt == 2 or not stale:
                    raise PolicyUnavailable(f"OPA at {self.host}:{self.port} unreachable: {exc}") from None
        if resp.status == 401:
            raise PolicyUnavailable("OPA refused the bridge's token (--opa-token-file: is it this mesh's?)")
        if resp.status != 200:
            raise PolicyUnavailable(f"OPA answered {resp.status}: {raw[:200]!r}")
        result = json.loads(raw).get("result")
        if not isinstance(result, dict) or not isinstance(result.get("allow"), bool):
            raise PolicyUnavailable("no policy decision (is a policy pushed? see `greymesh policy push`)")
        return Decision(result["allow"], str(result.get("reason", "")))


class AuthorizationBridge(authz_grpc.AuthorizationServicer):
    """Answers the checks of the sidecars ``sidecars`` authenticates (their ``authz`` credential,
    core/sidecar_auth.py); any other caller is refused before OPA is asked, so nobody else can
    probe the policy or put decisions in OPA's decision log (and so in the audit record)."""

    def __init__(self, opa: OpaClient, sidecars: Authenticator):
        self.opa, self.sidecars = opa, sidecars

    def Check(self, request: authz_pb2.CheckRequest, context: grpc.ServicerContext) -> authz_pb2.CheckResponse:  # noqa: N802
        if self.sidecars.authenticate(context.invocation_metadata()) is None:
            log.warning("refused a check from %s: no valid sidecar credential", context.peer())
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          f"a sidecar credential is required ({METADATA_KEY}: Bearer <token> metadata)")
        try:
            decision = self.opa.decide(opa_input(request))
        except PolicyUnavailable as exc:
            log.warning("no decision for %s -> %s %s: %s", request.attributes.source.principal or "?",
                        request.attributes.destination.principal or "?", request.attributes.request.http.path, exc)
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        # Envoy puts this under the ext_authz filter's dynamic metadata, where the l7 tap
        # reads the verdict and its reason (tapstream.schema).
        verdict = struct_pb2.Struct()
        verdict.update({"allow": decision.allow, "reason": decision.reason})
        if decision.allow:
            return authz_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK),
                                           ok_response=authz_pb2.OkHttpResponse(), dynamic_metadata=verdict)
        body = json.dumps({"error": "forbidden", "reason": decision.reason})
        return authz_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message=decision.reason),
            dynamic_metadata=verdict,
            denied_response=authz_pb2.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=http_status_pb2.Forbidden),
                headers=[base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="content-type", value="application/json"))],
                body=body,
            ),
        )


def serve(host: str, port: int, opa_host: str, opa_port: int, sidecars: Authenticator, opa_token: str,
          workers: int = 16) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="authz"),
                         options=[("grpc.so_reuseport", 0)])
    authz_grpc.add_AuthorizationServicer_to_server(AuthorizationBridge(OpaClient(opa_host, opa_port, opa_token), sidecars), server)
    server.add_insecure_port(f"{host}:{port}")
    server.start()
    log.info("authorization bridge on %s:%d asking OPA at %s:%d", host, port, opa_host, opa_port)
    return server


def main(argv: list[str] | None = None) -> int:
    """`python -m controlplane.authz`: the host's ext_authz bridge (a workload of the runtime)."""
    p = argparse.ArgumentParser(prog="python -m controlplane.authz",
                                description="Run the ext_authz bridge between the sidecars and OPA.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--opa-port", type=int, required=True)
    p.add_argument("--opa-token-file", type=Path, required=True,
                   help="the bridge's token for OPA (0600): OPA refuses a decision request without it")
    p.add_argument("--sidecar-key-file", type=Path, required=True,
                   help="the key (0600) that checks the sidecars' ext_authz credentials (core/sidecar_auth.py)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sidecars = SidecarTokens.load(args.sidecar_key_file, "authz")
        opa_token = credentials.read(args.opa_token_file)
    except CredentialError as exc:
        log.error("%s", exc)
        return 2
    try:
        serve(args.host, args.port, "127.0.0.1", args.opa_port, sidecars, opa_token).wait_for_termination()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
