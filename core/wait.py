"""The one way to wait for something to become true (a component answering, sidecars ACKing).

A probe answers None when ready, or a short reason why not; the reason of the last try is
in the TimeoutError, so whoever reads it knows what was still missing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Probe = Callable[[], str | None]  # None: ready; otherwise why not yet


def wait_until(probe: Probe, timeout_s: float, what: str, interval_s: float = 0.2,
               progress: Callable[[str], None] | None = None) -> float:
    """Poll probe until it answers None; the seconds it took.  TimeoutError naming ``what``
    and the last reason after timeout_s.  ``progress`` hears each new reason."""
    start = time.monotonic()
    last: str | None = None
    while (why := probe()) is not None:
        if why != last and progress is not None:
            progress(f"waiting for {what}: {why}")
        last = why
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{what}: not ready after {timeout_s:.0f} s ({last})")
        time.sleep(interval_s)
    return time.monotonic() - start
