"""The actions stage's client of the control plane's overrides API (controlplane/daemon.py).

The loop changes the mesh only through this: ``PUT /overrides/<service>`` with an
:class:`~core.contracts.Override`, waited on until every changed sidecar has ACKed it, and
``DELETE /overrides/<service>``.  It authenticates with the actions stage's own token; the
control plane records that principal as the override's author.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from core import credentials, jsonhttp
from core.contracts import Override, ServiceRouting
from core.errors import GreymeshError

ACK_TIMEOUT_S = 15.0  # the control plane waits up to 10 s for ACKs, then says who lags


class OverrideError(GreymeshError):
    """The control plane refused an override (``status`` its HTTP status), or could not be
    reached (``status`` None); the message says which."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ControlPlaneOverrides:
    def __init__(self, base_url: str, token_file: Path):
        self.base_url = base_url.rstrip("/")
        self.token_file = token_file

    def _call(self, path: str, body: dict | None = None, method: str | None = None) -> dict:
        url = self.base_url + path
        try:
            return jsonhttp.call(url, body, token=credentials.read(self.token_file), timeout_s=ACK_TIMEOUT_S,
                                 method=method)
        except jsonhttp.ApiError as exc:
            raise OverrideError(f"{method or 'GET'} {url}: {exc}", exc.status) from None
        except jsonhttp.Unreachable as exc:
            raise OverrideError(f"{method or 'GET'} {url}: {exc}") from None

    def routing(self) -> list[ServiceRouting]:
        """Every service's subsets, split and override, as the control plane has them now."""
        doc = self._call("/overrides")
        try:
            return [ServiceRouting.from_json(s) for s in doc["services"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise OverrideError(f"GET {self.base_url}/overrides answered something else than routing: {exc}") \
                from None

    def put(self, override: Override) -> float | None:
        """Merge ``override``; returns once every changed sidecar ACKed (the seconds that took)."""
        doc = self._call(f"/overrides/{quote(override.service, safe='')}?wait=1", override.to_json(), "PUT")
        return doc.get("acked_s")

    def clear(self, service: str) -> float | None:
        """Drop the service's override (its callers go back to the spec's split)."""
        try:
            doc = self._call(f"/overrides/{quote(service, safe='')}?wait=1", None, "DELETE")
        except OverrideError as exc:
            if exc.status == 404:
                return None  # already gone: what clearing wants
            raise
        return doc.get("acked_s")
