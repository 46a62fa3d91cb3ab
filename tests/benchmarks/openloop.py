"""An open-loop HTTP/1.1 load generator that does not hide tail latency.

Requests are scheduled at fixed instants (rate r: one every 1/r s) and each latency
is measured from its *scheduled* instant, not from when a connection became free.
A closed-loop tool waits for a reply before sending again, so a slow reply also
delays the requests behind it, and those waits are never counted (coordinated
omission). Here they are. Keep-alive connections are shared from a fixed pool.
"""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import dataclass


@dataclass
class Result:
    rate: float
    sent: int
    latencies_ms: list[float]
    errors: int

    def percentile(self, q: float) -> float:
        data = sorted(self.latencies_ms)
        if not data:
            return float("nan")
        return data[min(len(data) - 1, int(q / 100 * len(data)))]

    def summary(self) -> dict[str, float]:
        return {
            "rate": self.rate,
            "ok": len(self.latencies_ms),
            "errors": self.errors,
            "p50": self.percentile(50),
            "p90": self.percentile(90),
            "p99": self.percentile(99),
            "max": max(self.latencies_ms, default=float("nan")),
            "mean": statistics.fmean(self.latencies_ms) if self.latencies_ms else float("nan"),
        }


async def _read_response(reader: asyncio.StreamReader) -> int:
    status_line = await reader.readline()
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
    connections: int = 32, warmup_s: float = 1.0,
) -> Result:
    """Send rate*seconds GETs (after a warm-up that is not recorded)."""
    request = f"GET {path} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
    loop = asyncio.get_running_loop()
    due: asyncio.Queue[float | None] = asyncio.Queue()
    latencies: list[float] = []
    errors = 0
    record_from = 0.0

    async def connection() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        while (scheduled := await due.get()) is not None:
            try:
                writer.write(request)
                status = await _read_response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                status = 0
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
            if scheduled >= record_from:
                if status == 200:
                    latencies.append((loop.time() - scheduled) * 1000)
                else:
                    errors += 1
        writer.close()

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
    return Result(rate, int(rate * seconds), latencies, errors)
