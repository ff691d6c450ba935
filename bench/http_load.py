"""A lean closed-loop HTTP/1.1 load client for the service benches (loopback only).

httpx costs about 2.8 ms of client CPU per request on this machine: on 2 cores the client,
not the server, would set the ceiling. This client keeps one keep-alive connection per
simulated client on raw asyncio streams, writes a fixed request and reads the status line,
the headers and ``Content-Length`` bytes of body — what a dashboard does, including
revalidation: each client sends back the ``ETag`` it last got (``If-None-Match``), so
unchanged data is answered ``304``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    request: bytes) -> tuple[int, dict[bytes, bytes], int]:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if b":" in line:
            k, v = line.split(b":", 1)
            headers[k.strip().lower()] = v.strip()
    length = int(headers.get(b"content-length", b"0"))
    if length:
        await reader.readexactly(length)
    return status, headers, length


async def closed_loop(host: str, port: int, paths: list[str], clients: int, seconds: float,
                      revalidate: bool = True) -> dict[str, Any]:
    """``clients`` connections, each alternating ``paths`` as fast as answered, for ``seconds``.
    Returns per path: latencies (s), statuses and body sizes."""
    latencies: dict[str, list[float]] = {p: [] for p in paths}
    statuses: dict[str, Counter[int]] = {p: Counter() for p in paths}
    sizes: dict[str, list[int]] = {p: [] for p in paths}
    errors: Counter[str] = Counter()
    conns = [await asyncio.open_connection(host, port) for _ in range(clients)]
    deadline = time.perf_counter() + seconds

    async def run(i: int) -> None:
        reader, writer = conns[i]
        etags: dict[str, bytes] = {}
        k = i % len(paths)
        while time.perf_counter() < deadline:
            path = paths[k]
            k = (k + 1) % len(paths)
            extra = b"If-None-Match: " + etags[path] + b"\r\n" if revalidate and path in etags else b""
            request = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\n".encode() + extra + b"\r\n")
            start = time.perf_counter()
            try:
                status, headers, length = await _exchange(reader, writer, request)
            except (OSError, asyncio.IncompleteReadError, ValueError) as err:
                errors[f"{path}: {type(err).__name__}"] += 1
                return
            latencies[path].append(time.perf_counter() - start)
            statuses[path][status] += 1
            if status == 200:
                sizes[path].append(length)
            if b"etag" in headers:
                etags[path] = headers[b"etag"]

    start = time.perf_counter()
    await asyncio.gather(*(run(i) for i in range(clients)))
    wall = time.perf_counter() - start
    for _, writer in conns:
        writer.close()
    return {"latencies": latencies, "statuses": {p: dict(c) for p, c in statuses.items()},
            "sizes": sizes, "errors": dict(errors), "seconds": wall}
