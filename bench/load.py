"""The load generator: a closed loop of ``concurrency`` asyncio workers, each with its own
keep-alive connection (bench/rawhttp.py), sending requests back to back until ``total`` were
sent or ``seconds`` ran out."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from bench.rawhttp import Connection, HttpError


@dataclass
class Sample:
    status: int
    seconds: float
    ttft: float | None = None  # streams: seconds to the first content chunk
    chunks: int = 0  # streams: content-bearing chunks
    headers: dict[str, str] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Run:
    samples: list[Sample]
    wall: float

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if 200 <= s.status < 300 and s.error is None]

    @property
    def per_second(self) -> float:
        return len(self.ok) / self.wall if self.wall else 0.0

    def statuses(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for s in self.samples:
            counts[s.status] = counts.get(s.status, 0) + 1
        return counts


Call = Callable[[Connection, int], Awaitable[Sample]]


def _split(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return f"{parts.scheme}://{parts.netloc}", path or "/"


async def closed_loop(
    call: Call, *, concurrency: int, total: int, seconds: float, base_url: str | None = None
) -> Run:
    """Send ``total`` calls (at most ``seconds`` long) from ``concurrency`` workers, each with
    its own keep-alive connection."""
    samples: list[Sample] = []
    counter = iter(range(total))
    deadline = time.perf_counter() + seconds
    target = str(base_url or getattr(call, "base_url", ""))

    async def worker() -> None:
        conn = Connection(target)
        try:
            for index in counter:
                if time.perf_counter() > deadline:
                    return
                samples.append(await call(conn, index))
        finally:
            await conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Run(samples, time.perf_counter() - start)


async def _send(
    conn: Connection,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    on_data: Callable[[bytes], None] | None = None,
) -> tuple[int, dict[str, str], bytes] | str:
    try:
        return await conn.request(method, path, headers, body, on_data)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, HttpError, ValueError) as exc:
        await conn.close()
        return repr(exc)


def post_json(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Call:
    """A call that POSTs ``body`` and reads the whole answer."""
    base, path = _split(url)
    payload = json.dumps(body).encode()
    all_headers = {"content-type": "application/json", **(headers or {})}

    async def call(conn: Connection, _: int) -> Sample:
        start = time.perf_counter()
        answer = await _send(conn, "POST", path, all_headers, payload)
        if isinstance(answer, str):
            return Sample(0, time.perf_counter() - start, error=answer)
        return Sample(answer[0], time.perf_counter() - start, headers=_h(answer[1]))

    call.base_url = base  # type: ignore[attr-defined]
    return call


def get(url: str, headers: dict[str, str] | None = None) -> Call:
    base, path = _split(url)

    async def call(conn: Connection, _: int) -> Sample:
        start = time.perf_counter()
        answer = await _send(conn, "GET", path, headers or {}, b"")
        if isinstance(answer, str):
            return Sample(0, time.perf_counter() - start, error=answer)
        return Sample(answer[0], time.perf_counter() - start, headers=_h(answer[1]))

    call.base_url = base  # type: ignore[attr-defined]
    return call


def stream_sse(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Call:
    """A call that POSTs ``body`` and reads the SSE answer as it arrives: time to the first
    content chunk, and the number of chunks carrying content."""
    base, path = _split(url)
    payload = json.dumps(body).encode()
    all_headers = {"content-type": "application/json", **(headers or {})}

    async def call(conn: Connection, _: int) -> Sample:
        start = time.perf_counter()
        state: dict[str, Any] = {"buffer": b"", "ttft": None, "chunks": 0, "done": False}

        def on_data(data: bytes) -> None:
            buffer = state["buffer"] + data
            *events, state["buffer"] = buffer.split(b"\n\n")
            for event in events:
                for line in event.split(b"\n"):
                    if not line.startswith(b"data:"):
                        continue
                    text = line[5:].strip()
                    if text == b"[DONE]":
                        state["done"] = True
                        continue
                    choices = json.loads(text).get("choices") or []
                    if choices and (choices[0].get("delta") or {}).get("content"):
                        state["chunks"] += 1
                        if state["ttft"] is None:
                            state["ttft"] = time.perf_counter() - start

        answer = await _send(conn, "POST", path, all_headers, payload, on_data)
        seconds = time.perf_counter() - start
        if isinstance(answer, str):
            return Sample(0, seconds, error=answer)
        if answer[0] != 200:
            return Sample(answer[0], seconds)
        error = None if state["done"] else "stream ended without [DONE]"
        return Sample(200, seconds, ttft=state["ttft"], chunks=state["chunks"], error=error)

    call.base_url = base  # type: ignore[attr-defined]
    return call


def _h(headers: dict[str, str]) -> dict[str, str]:
    keep = ("retry-after", "x-ratelimit-remaining", "x-ratelimit-limit")
    return {k: headers[k] for k in keep if k in headers}
