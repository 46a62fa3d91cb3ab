"""Contract receivers for tests: a Slack incoming webhook and PagerDuty's Events API v2 on
loopback, answering as the real services document they do (the real ones are not reachable
from here).

Sources of the contract:

* Slack, "Sending messages using incoming webhooks" (docs.slack.dev/messaging/sending-messages-
  using-incoming-webhooks): POST a JSON object with ``text`` and/or ``blocks`` to the webhook
  URL; ``200`` with the body ``ok``.  Its errors are short strings in the body, with the status
  of the changelog "Improving error conditions for Incoming Webhooks" (api.slack.com/changelog/
  2016-05-17): 400 ``invalid_payload`` (not understood as JSON), ``no_text`` (nothing to
  post), ``invalid_blocks``; 403 ``action_prohibited``, ``invalid_token``; 404
  ``channel_not_found``, ``no_service`` (the webhook is disabled, removed or invalid); 410
  ``channel_is_archived``; 500 ``rollup_error``.  Rate limits (api.slack.com/docs/rate-limits):
  about one message per second, then ``429 Too Many Requests`` with a ``Retry-After`` header
  in seconds (the body is not specified; ``rate_limited`` here).
* PagerDuty, "Send an Alert Event" and "Send a Change Event" (developer.pagerduty.com/docs/
  events-api-v2/trigger-events, .../send-change-events) and the "Events API v2 Overview"
  (response codes and retry logic): ``POST /v2/enqueue`` with ``routing_key`` (32
  characters), ``event_action`` (trigger | acknowledge | resolve), ``dedup_key`` (<= 255),
  and for a trigger ``payload.summary`` (<= 1024), ``payload.source``, ``payload.severity``
  (critical | error | warning | info); ``POST /v2/change/enqueue`` with ``routing_key`` and
  ``payload.summary`` (<= 1024).  ``202 {"status": "success", "message": "Event processed",
  "dedup_key": ...}``; ``400 {"status": "invalid event", "message": "Event object is invalid",
  "errors": [...]}`` (not to be retried); 429 and 5xx to be retried (no Retry-After is
  documented, none is sent).  Alert de-duplication: a trigger for an open alert's
  ``dedup_key`` joins it; once resolved, a trigger with that key opens a new one; a resolve
  for no open alert is dropped.  :attr:`PagerDutyEvents.incidents` models that.

Each server records every request (with the status it answered and the monotonic time it
arrived) and can be told to answer the next N requests with a given status (and body,
Retry-After), or to answer them late.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SEVERITIES = ("critical", "error", "warning", "info")
SLACK_ERRORS = {400: "invalid_payload", 403: "invalid_token", 404: "channel_not_found", 410: "channel_is_archived",
                429: "rate_limited", 500: "rollup_error"}
PAGERDUTY_THROTTLE = {"status": "throttle event",
                      "message": "Requests for this service are arriving too quickly. Please retry later."}


@dataclass(frozen=True)
class Received:
    at: float  # time.monotonic() when it arrived
    path: str
    body: bytes
    status: int  # what was answered

    def json(self) -> object:
        return json.loads(self.body)


@dataclass
class _Scripted:
    count: int
    status: int | None  # None: answer normally, only late
    body: str | None
    retry_after: str | None
    delay_s: float


@dataclass
class Incident:
    """A PagerDuty alert opened by a trigger: how many triggers it took, and whether it resolved."""

    dedup_key: str
    triggers: int = 1
    resolved: bool = False
    summaries: list[str] = field(default_factory=list)


class _Contract:
    def __init__(self) -> None:
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._script: list[_Scripted] = []
        contract = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                step = contract._next()
                if step and step.delay_s:
                    time.sleep(step.delay_s)
                if step and step.status is not None:
                    status, text, ctype = step.status, step.body, "text/plain"
                    if text is None:
                        text, ctype = contract.scripted_body(step.status)
                    headers = {"Retry-After": step.retry_after} if step.retry_after is not None else {}
                else:
                    with contract._lock:
                        status, text, ctype = contract.handle(urlsplit(self.path).path, body)
                    headers = {}
                with contract._lock:
                    contract.received.append(Received(time.monotonic(), self.path, body, status))
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def _next(self) -> _Scripted | None:
        with self._lock:
            if not self._script:
                return None
            step = self._script[0]
            step.count -= 1
            if step.count <= 0:
                self._script.pop(0)
            return step

    def answer_next(self, n: int, status: int, body: str | None = None, retry_after: float | None = None) -> None:
        """Answer the next ``n`` requests with ``status`` (default body: the service's own for it)."""
        with self._lock:
            self._script.append(_Scripted(n, status, body, None if retry_after is None else f"{retry_after:g}", 0.0))

    def delay_next(self, n: int, seconds: float) -> None:
        """Answer the next ``n`` requests normally, ``seconds`` late."""
        with self._lock:
            self._script.append(_Scripted(n, None, None, None, seconds))

    def handle(self, path: str, body: bytes) -> tuple[int, str, str]:
        raise NotImplementedError

    def scripted_body(self, status: int) -> tuple[str, str]:
        raise NotImplementedError

    def requests(self, status: int | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.received if status is None or r.status == status]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):  # noqa: ANN204
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SlackWebhook(_Contract):
    """One incoming webhook: :attr:`url` (a secret, like the real one) takes messages."""

    def __init__(self) -> None:
        super().__init__()
        self.path = f"/services/T{uuid.uuid4().hex[:8].upper()}/B{uuid.uuid4().hex[:8].upper()}/{uuid.uuid4().hex}"
        self.url = self.base + self.path
        self.messages: list[dict] = []  # what was posted

    def scripted_body(self, status: int) -> tuple[str, str]:
        return SLACK_ERRORS.get(status, "rollup_error"), "text/html"

    def handle(self, path: str, body: bytes) -> tuple[int, str, str]:
        if path != self.path:
            return 404, "no_service", "text/html"
        try:
            doc = json.loads(body)
        except ValueError:
            return 400, "invalid_payload", "text/html"
        if not isinstance(doc, dict) or not isinstance(doc.get("text", ""), str):
            return 400, "invalid_payload", "text/html"
        blocks = doc.get("blocks")
        if blocks is not None and (not isinstance(blocks, list) or len(blocks) > 50
                                   or not all(isinstance(b, dict) and isinstance(b.get("type"), str) for b in blocks)):
            return 400, "invalid_blocks", "text/html"
        if not doc.get("text") and not blocks:
            return 400, "no_text", "text/html"
        self.messages.append(doc)
        return 200, "ok", "text/html"


class PagerDutyEvents(_Contract):
    """Events API v2: :attr:`enqueue_url` and :attr:`change_url`; keys must be 32 characters."""

    def __init__(self) -> None:
        super().__init__()
        self.enqueue_url = self.base + "/v2/enqueue"
        self.change_url = self.base + "/v2/change/enqueue"
        self.incidents: list[Incident] = []
        self.dropped_resolves = 0
        self.changes: list[dict] = []

    def scripted_body(self, status: int) -> tuple[str, str]:
        if status == 429:
            return json.dumps(PAGERDUTY_THROTTLE), "application/json"
        if status == 400:
            return json.dumps(self._invalid(["Event object is invalid"])[1]), "application/json"
        return json.dumps({"status": "error", "message": "internal server error"}), "application/json"

    @staticmethod
    def _invalid(errors: list[str]) -> tuple[int, dict]:
        return 400, {"status": "invalid event", "message": "Event object is invalid", "errors": errors}

    def _open(self, dedup_key: str) -> Incident | None:
        return next((i for i in reversed(self.incidents) if i.dedup_key == dedup_key and not i.resolved), None)

    def handle(self, path: str, body: bytes) -> tuple[int, str, str]:
        if path not in ("/v2/enqueue", "/v2/change/enqueue"):
            return 404, json.dumps({"status": "not found"}), "application/json"
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            status, answer = self._invalid(["Event object is invalid JSON"])
            return status, json.dumps(answer), "application/json"
        status, answer = (self._change if path == "/v2/change/enqueue" else self._event)(doc)
        return status, json.dumps(answer), "application/json"

    @staticmethod
    def _check(doc: dict, *, change: bool) -> list[str]:
        errors = []
        key = doc.get("routing_key")
        if not isinstance(key, str) or not key:
            errors.append("'routing_key' is missing or blank")
        elif len(key) != 32:
            errors.append("Length of 'routing_key' is incorrect (should be 32 characters)")
        action = doc.get("event_action")
        if not change and action not in ("trigger", "acknowledge", "resolve"):
            errors.append("'event_action' is missing or invalid (must be trigger, acknowledge or resolve)")
        dedup = doc.get("dedup_key")
        if dedup is not None and (not isinstance(dedup, str) or len(dedup) > 255):
            errors.append("'dedup_key' must be a string of at most 255 characters")
        if change or action == "trigger":
            payload = doc.get("payload")
            if not isinstance(payload, dict):
                return errors + ["'payload' is missing or not an object"]
            summary = payload.get("summary")
            if not isinstance(summary, str) or not summary:
                errors.append("'payload.summary' is missing or blank")
            elif len(summary) > 1024:
                errors.append("Length of 'payload.summary' is too long (maximum is 1024 characters)")
            if not change:
                if not isinstance(payload.get("source"), str) or not payload["source"]:
                    errors.append("'payload.source' is missing or blank")
                if payload.get("severity") not in SEVERITIES:
                    errors.append("'payload.severity' is invalid (must be one of critical, error, warning, info)")
        elif not dedup:
            errors.append("'dedup_key' is required for acknowledge and resolve events")
        return errors

    def _event(self, doc: dict) -> tuple[int, dict]:
        errors = self._check(doc, change=False)
        if errors:
            return self._invalid(errors)
        key = doc.get("dedup_key") or uuid.uuid4().hex
        action, open_ = doc["event_action"], self._open(key)
        if action == "trigger":
            if open_ is None:
                open_ = Incident(key, triggers=0)
                self.incidents.append(open_)
            open_.triggers += 1
            open_.summaries.append(doc["payload"]["summary"])
        elif action == "resolve":
            if open_ is None:
                self.dropped_resolves += 1
            else:
                open_.resolved = True
        return 202, {"status": "success", "message": "Event processed", "dedup_key": key}

    def _change(self, doc: dict) -> tuple[int, dict]:
        errors = self._check(doc, change=True)
        if errors:
            return self._invalid(errors)
        self.changes.append(doc)
        return 202, {"status": "success", "message": "Change event processed"}
