"""HTTP clients, httpx vs aiohttp: the client side of an upstream call, measured against the
mock upstream (bench/mock_upstream.py, its own process) with one long-lived pooled client each
(httpx.AsyncClient with the limits hypereal used, aiohttp.ClientSession on a TCPConnector).

For non-streamed chat completions (body read, JSON decoded) and SSE streams (read line by
line to ``[DONE]``), at concurrency 1 and 64: requests/s and the client process's CPU per
request (``time.process_time`` of this process only; the mock runs in another). The ratio
column is httpx / aiohttp (above 1: aiohttp is cheaper or faster).

Env: BENCH_HTTP_SECONDS (seconds per measurement, 2.5), BENCH_HTTP_TOKENS (tokens per
stream, 16). Runs in about 30 s: ``.venv/bin/python -m bench.http_clients [--quick]``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx

from bench.common import Result, env_int, mock_upstream, scenario_args, workdir

Call = Callable[[], Awaitable[int]]  # one request; returns the content chunks/bytes seen


@dataclass
class Measured:
    requests: int
    wall: float
    cpu: float

    @property
    def per_second(self) -> float:
        return self.requests / self.wall if self.wall else 0.0

    @property
    def cpu_ms(self) -> float:
        return self.cpu / self.requests * 1000 if self.requests else float("nan")


async def closed_loop(call: Call, concurrency: int, seconds: float) -> Measured:
    """``concurrency`` workers calling back to back for ``seconds``."""
    deadline = time.monotonic() + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            await call()
            done += 1

    cpu0, wall0 = time.process_time(), time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Measured(done, time.monotonic() - wall0, time.process_time() - cpu0)


def body(stream: bool) -> bytes:
    payload: dict[str, Any] = {
        "model": "mock-model",
        "messages": [{"role": "user", "content": "Say hello to the whole world"}],
        "max_tokens": 1024,
        "stream": stream,
    }
    if stream:
        payload["stream_options"] = {"include_usage": True}
    return json.dumps(payload).encode()


HEADERS = {"content-type": "application/json", "authorization": "Bearer sk-bench"}


def httpx_calls(client: httpx.AsyncClient, url: str, tokens: int) -> tuple[Call, Call]:
    whole, streamed = body(False), body(True)

    async def complete() -> int:
        response = await client.post(url, content=whole, headers=HEADERS)
        assert response.status_code == 200, response.status_code
        return len(response.json()["choices"])

    async def stream() -> int:
        chunks = 0
        async with client.stream("POST", url, content=streamed, headers=HEADERS) as response:
            assert response.status_code == 200, response.status_code
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    chunks += 1
        assert chunks == tokens + 4, chunks  # role, tokens, finish, usage, [DONE]
        return chunks

    return complete, stream


def aiohttp_calls(session: aiohttp.ClientSession, url: str, tokens: int) -> tuple[Call, Call]:
    whole, streamed = body(False), body(True)

    async def complete() -> int:
        async with session.post(url, data=whole, headers=HEADERS) as response:
            assert response.status == 200, response.status
            return len(json.loads(await response.read())["choices"])

    async def stream() -> int:
        chunks = 0
        async with session.post(url, data=streamed, headers=HEADERS) as response:
            assert response.status == 200, response.status
            async for line in response.content:
                if line.startswith(b"data: "):
                    chunks += 1
        assert chunks == tokens + 4, chunks
        return chunks

    return complete, stream


async def measure(result: Result, base: str, tokens: int, seconds: float) -> None:
    url = base + "/chat/completions"
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    figures: dict[tuple[str, str, int], Measured] = {}
    async with (
        httpx.AsyncClient(limits=limits, timeout=60) as hx,
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1000),
            timeout=aiohttp.ClientTimeout(total=60),
        ) as ah,
    ):
        clients = {"httpx": httpx_calls(hx, url, tokens), "aiohttp": aiohttp_calls(ah, url, tokens)}
        for kind in ("complete", "stream"):
            for concurrency in (1, 64):
                for name, (complete, stream) in clients.items():
                    call = complete if kind == "complete" else stream
                    await closed_loop(call, concurrency, min(0.5, seconds))  # warm the pool
                    run = await closed_loop(call, concurrency, seconds)
                    figures[(kind, name, concurrency)] = run
                    print(
                        f"  {kind:<8} {name:<7} c={concurrency:<3} {run.per_second:8.0f} req/s"
                        f"  {run.cpu_ms:6.3f} ms CPU/request",
                        flush=True,
                    )
    for kind, label in (("complete", "chat completion"), ("stream", f"SSE, {tokens} tok")):
        for concurrency in (1, 64):
            hx_run = figures[(kind, "httpx", concurrency)]
            ah_run = figures[(kind, "aiohttp", concurrency)]
            result.add(
                f"{label}, c={concurrency}: CPU/request",
                f"aiohttp {ah_run.cpu_ms:.3f} ms",
                f"httpx {hx_run.cpu_ms:.3f} ms",
                notes=f"httpx/aiohttp {hx_run.cpu_ms / ah_run.cpu_ms:.2f}x",
            )
            result.add(
                f"{label}, c={concurrency}: req/s",
                f"aiohttp {ah_run.per_second:.0f}/s",
                f"httpx {hx_run.per_second:.0f}/s",
                notes=f"aiohttp/httpx {ah_run.per_second / hx_run.per_second:.2f}x",
            )
            result.raw[f"{kind}_c{concurrency}"] = {
                name: {"per_second": run.per_second, "cpu_ms": run.cpu_ms, "requests": run.requests}
                for name, run in (("httpx", hx_run), ("aiohttp", ah_run))
            }


def print_table(result: Result) -> None:
    print()
    print("| measurement | aiohttp | httpx | ratio |")
    print("|---|---|---|---|")
    for row in result.rows:
        aio = row.hypereal.removeprefix("aiohttp ")
        hx = row.direct.removeprefix("httpx ")
        print(f"| {row.metric} | {aio} | {hx} | {row.notes} |")


def main() -> None:
    args = scenario_args(__doc__ or "")
    result = Result("http clients")
    tokens = env_int("HTTP_TOKENS", 16, 16, args.quick)
    seconds = float(os.environ.get("BENCH_HTTP_SECONDS") or (1.0 if args.quick else 2.5))
    with workdir("http-clients") as work, mock_upstream(work, tokens) as base:
        asyncio.run(measure(result, base, tokens, seconds))
    print_table(result)
    result.write(args.json)


if __name__ == "__main__":
    main()
