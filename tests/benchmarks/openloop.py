"""An open-loop HTTP/1.1 load generator that does not hide tail latency.

Requests are scheduled at fixed instants (rate r: one every 1/r s) and each latency
is measured from its *scheduled* instant, not from when a connection became free.
A closed-loop tool waits for a reply before sending again, so a slow reply also
delays the requests behind it, and those waits are never counted (coordinated
omission). Here they are. Keep-alive connections are shared from a fixed pool.

Every request sent, warm-up included, ends as a 200 or as an error with its reason
(``status 404``, ``timeout``, ``ConnectionResetError``, ...): a benchmark fails on any.
"""

from __future__ import annotations

import asyncio
import statistics
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Result:
    rate: float
    sent: int  # recorded requests (after the warm-up)
    latencies_ms: list[float]
    errors: int  # failed requests, warm-up included
    reasons: Counter[str] = field(default_factory=Counter)  # why they failed
    unanswered: int = 0  # scheduled but never sent or settled (a worker died): should be 0

    def percentile(self, q: float) -> float:
        data = sorted(self.latencies_ms)
        if not data:
            return float("nan")
        return data[min(len(data) - 1, int(q / 100 * len(data)))]

    def summary(self) -> dict:
        return {
            "rate": self.rate,
            "ok": len(self.latencies_ms),
            "errors": self.errors,
            "p50": self.percentile(50),
            "p90": self.percentile(90),
            "p99": self.percentile(99),
            "max": max(self.latencies_ms, default=float("nan")),
            "mean": statistics.fmean(self.latencies_ms) if self.latencies_ms else float("nan"),
            "reasons": dict(self.reasons),
            "unanswered": self.unanswered,
        }

    def problems(self, what: str) -> list[str]:
        """What went wrong, one line each ([] when every request was answered 200)."""
        out = []
        if self.errors:
            reasons = ", ".join(f"{n} x {r}" for r, n in self.reasons.most_common())
            out.append(f"{what}: {self.errors} request(s) failed: {reasons}")
        if self.unanswered:
            out.append(f"{what}: {self.unanswered} request(s) never settled")
        if not self.latencies_ms:
            out.append(f"{what}: no request succeeded")
        return out


async def _read_response(reader: asyncio.StreamReader) -> int:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionResetError("connection closed before a response")
    status = int(status_line.split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def run(
    host: str, port: int, *, authority: str, path: str, rate: float, seconds: float,
    connections: int = 32, warmup_s: float = 1.0, timeout_s: float = 5.0,
) -> Result:
    """Send rate*(warmup_s + seconds) GETs; latencies are recorded after the warm-up,
    errors throughout.  A request without a complete response within timeout_s is an
    error ("timeout") and its connection is replaced."""
    request = f"GET {path} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
    loop = asyncio.get_running_loop()
    due: asyncio.Queue[float | None] = asyncio.Queue()
    latencies: list[float] = []
    reasons: Counter[str] = Counter()
    settled = 0
    record_from = 0.0

    async def connection() -> None:
        nonlocal settled
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while (scheduled := await due.get()) is not None:
            status, reason = 0, ""
            try:
                if conn is None:
                    conn = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
                reader, writer = conn
                writer.write(request)
                status = await asyncio.wait_for(_read_response(reader), timeout_s)
                if status != 200:
                    reason = f"status {status}"
            except TimeoutError:
                reason = "timeout"
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
                reason = type(exc).__name__
            if reason and conn is not None and status == 0:  # the connection is in an unknown state
                conn[1].close()
                conn = None
            settled += 1
            if reason:
                reasons[reason] += 1
            elif scheduled >= record_from:
                latencies.append((loop.time() - scheduled) * 1000)
        if conn is not None:
            conn[1].close()

    workers = [asyncio.create_task(connection()) for _ in range(connections)]
    start = loop.time() + 0.2
    record_from = start + warmup_s
    total = int(rate * (seconds + warmup_s))
    for i in range(total):
        at = start + i / rate
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        due.put_nowait(at)
    for _ in workers:
        due.put_nowait(None)
    await asyncio.gather(*workers)
    return Result(rate, int(rate * seconds), latencies, sum(reasons.values()), reasons, total - settled)
