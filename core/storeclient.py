"""The one client of the tap store: the sink's read-only ``POST /query`` API.

An embedded chdb store belongs to the sink's process, and a ClickHouse server answers
the same SQL, so every reader (the ml stage, `greymesh taps query`, the console) goes
through the sink's API and works the same on both backends.  Every query presents the
reader's token (the CLI's api token, or the scorer's): the sink answers no one else.
"""

from __future__ import annotations

from pathlib import Path

from core import credentials, jsonhttp
from core.datadir import DataDir
from core.endpoints import SINK_HTTP, Endpoints
from core.errors import GreymeshError


class StoreError(GreymeshError):
    """The store could not be read; the message says where and what to do."""


def sql_string(text: str) -> str:
    """A ClickHouse string literal of ``text`` (backslashes and quotes escaped)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class StoreClient:
    """Read-only SQL against the store behind the sink at ``base_url`` (http://host:port),
    authenticated by the token in the secret file ``token_file``."""

    def __init__(self, base_url: str, token_file: Path, timeout_s: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.token_file = token_file
        self.timeout_s = timeout_s

    @classmethod
    def of_mesh(cls, dd: DataDir, timeout_s: float = 30.0) -> StoreClient:
        """The CLI's client of the mesh in ``dd`` (its sink, its api token); NotRunning when no
        mesh with taps was started there."""
        return cls(Endpoints.require(dd, SINK_HTTP, "taps").url(SINK_HTTP), dd.api_token, timeout_s)

    def query(self, sql: str) -> tuple[list[str], list[list]]:
        """(column names, rows); StoreError with the store's message when refused or unreachable."""
        url = self.base_url + "/query"
        try:
            doc = jsonhttp.call(url, {"sql": sql}, token=credentials.read(self.token_file), timeout_s=self.timeout_s)
        except jsonhttp.ApiError as exc:
            raise StoreError(f"the store refused the query at {url}: {exc}") from None
        except jsonhttp.Unreachable as exc:
            raise StoreError(f"the sink at {url} is not reachable ({exc}); is the mesh up (`greymesh status`)?") \
                from None
        return doc["columns"], doc["rows"]
