"""The loop's seam to whatever runs instances: count them, set how many there are.

The local runtime's backend is `greymesh scale SERVICE N` (wired by actions/service.py);
a Kubernetes backend will come with the Kubernetes issue behind the same Protocol.
"""

from __future__ import annotations

from typing import Protocol

from core.errors import GreymeshError


class ScaleError(GreymeshError):
    """The instances of a service could not be counted or changed; the message says why."""


class Scaler(Protocol):
    def instances(self, service: str) -> int:
        """The service's serving instances now (every subset); ScaleError when unknown."""

    def scale(self, service: str, count: int) -> None:
        """Run ``count`` instances of the service; returns once they serve.  ScaleError when refused."""
