"""The one client of the tap store: the sink's read-only ``POST /query`` API.

An embedded chdb store belongs to the sink's process, and a ClickHouse server answers
the same SQL, so every reader (the ml stage, `greymesh taps query`, the console) goes
through the sink's API and works the same on both backends.
"""

from __future__ import annotations

from core import jsonhttp
from core.errors import GreymeshError


class StoreError(GreymeshError):
    """The store could not be read; the message says where and what to do."""


def sql_string(text: str) -> str:
    """A ClickHouse string literal of ``text`` (backslashes and quotes escaped)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class StoreClient:
    """Read-only SQL against the store behind the sink at ``base_url`` (http://host:port)."""

    def __init__(self, base_url: str, timeout_s: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def query(self, sql: str) -> tuple[list[str], list[list]]:
        """(column names, rows); StoreError with the store's message when refused or unreachable."""
        url = self.base_url + "/query"
        try:
            doc = jsonhttp.call(url, {"sql": sql}, timeout_s=self.timeout_s)
        except jsonhttp.ApiError as exc:
            raise StoreError(f"the store refused the query at {url}: {exc}") from None
        except jsonhttp.Unreachable as exc:
            raise StoreError(f"the sink at {url} is not reachable ({exc}); is the mesh up (`greymesh status`)?") \
                from None
        return doc["columns"], doc["rows"]
