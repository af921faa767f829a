"""Profile the gateway under load with py-spy (from bench/.venv; bench/setup.sh installs it).

``python -m bench.profile ROUTE [--seconds 15] [--concurrency 64] [--database postgres]``
(ROUTE: chat, sse, credits, debit or jobs) starts the mock upstream and ``hypereal serve`` (on
SQLite, or on a temporary PostgreSQL database), drives load at the chosen route, samples the server
with ``py-spy record --format raw --gil`` meanwhile (only the thread holding the GIL: the
Python code that costs CPU, not threads waiting on queues), and prints the hottest frames by
own time and hypereal's own code by inclusive time. The collapsed stacks are kept in
bench/work/ (flame graphs: ``flamegraph.pl`` or speedscope).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

from bench.common import (
    BENCH_DIR,
    BENCH_VENV,
    hypereal_server,
    mock_upstream,
    server_env,
    temporary_pg_database,
    upstream_backends,
    workdir,
)
from bench.load import closed_loop, get, post_json, stream_sse

# Layers of the server's time, as RESULTS.md's "Where the time goes" splits it: a sample counts
# for the deepest frame (nearest the leaf) whose file names one of these, in this order of
# rules; a stack with none is "asyncio event loop and the rest".
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "access log, metrics, rate limiter, JSON",
        (
            "observability/logs.py",
            "prometheus_client/",
            "/limits/",
            "domain/ratelimit",
            "/json/",
            "structlog/",
        ),
    ),
    ("upstream HTTP client (aiohttp) and SSE parsing", ("aiohttp/", "backends/upstream/")),
    ("SQLite / PostgreSQL statements (store)", ("hypereal/store/", "asyncpg/")),
    ("media store (file writes)", ("hypereal/media/", "pathlib.py")),
    (
        "our middleware (auth + rate limit, body limit, errors, metrics, route index)",
        (
            "hypereal/api/middleware.py",
            "hypereal/app.py",
            "hypereal/api/errors.py",
            "hypereal/api/error_shapes.py",
            "hypereal/api/routing.py",
            "hypereal/observability/middleware.py",
        ),
    ),
    ("uvicorn HTTP (parsing, socket writes)", ("uvicorn/", "hypereal/api/http_protocol.py")),
    (
        "Starlette / FastAPI (middleware stack, routing, bodies, responses)",
        (
            "starlette/",
            "fastapi/",
            "pydantic/",
        ),
    ),
    ("our route and domain code", ("hypereal/",)),
]
REST = "asyncio event loop and the rest"


def layer_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, marks in LAYERS:
            if any(mark in frame for mark in marks):
                return name
    return REST


def samples(collapsed: Path) -> Iterator[tuple[str, int]]:
    """(stack, count) of each line of a collapsed file. Split on newlines only: a frame's text
    may hold other line-break characters (str.splitlines would cut the line there)."""
    for line in collapsed.read_text(errors="replace").split("\n"):
        stack, _, count_text = line.rpartition(" ")
        if stack and count_text.isdigit():
            yield stack, int(count_text)


def layers(collapsed: Path) -> dict[str, float]:
    """Share of the samples in each layer (see LAYERS), largest first."""
    counts: collections.Counter[str] = collections.Counter()
    for stack, count in samples(collapsed):
        counts[layer_of(stack.split(";"))] += count
    total = sum(counts.values()) or 1
    return {name: 100 * count / total for name, count in counts.most_common()}


def summarize(collapsed: Path, top: int = 25) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for stack, count in samples(collapsed):
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    out = [f"{total} samples"]
    for title, counter, only_ours in (
        ("own time (leaf frames)", own, False),
        ("inclusive time, hypereal code", inclusive, True),
    ):
        out.append(f"\n-- {title}")
        shown = 0
        for frame, count in counter.most_common():
            if only_ours and "hypereal/" not in frame:
                continue
            out.append(f"{100 * count / max(total, 1):6.1f}%  {frame}")
            shown += 1
            if shown >= top:
                break
    out.append("\n-- layers (each sample in the deepest layer it was in)")
    out += [f"{share:6.1f}%  {name}" for name, share in layers(collapsed).items()]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    routes = ["chat", "sse", "credits", "debit", "jobs"]
    parser.add_argument("route", choices=routes, default="chat")
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite")
    args = parser.parse_args()
    py_spy = BENCH_VENV / "bin" / "py-spy"
    if not py_spy.exists():
        raise SystemExit("py-spy is missing: run bash bench/setup.sh")
    out_dir = BENCH_DIR / "work"
    out_dir.mkdir(exist_ok=True)
    collapsed = out_dir / f"profile-{args.route}-{args.database}.txt"
    with (
        workdir("profile") as work,
        contextlib.ExitStack() as stack,
        mock_upstream(work, 16) as upstream,
    ):
        env = server_env(work, HYPEREAL_BACKENDS=upstream_backends(upstream))
        if args.database == "postgres":
            env["HYPEREAL_DATABASE_URL"] = stack.enter_context(temporary_pg_database())
        s = stack.enter_context(hypereal_server(work, env))
        key = s.key(credits=10**12)
        headers = {"authorization": f"Bearer {key}"}
        chat = {"model": "bench-chat", "messages": [{"role": "user", "content": "hi"}]}
        call = {
            "chat": lambda: post_json(f"{s.url}/v1/chat/completions", chat, headers),
            "sse": lambda: stream_sse(
                f"{s.url}/v1/chat/completions", {**chat, "stream": True}, headers
            ),
            "credits": lambda: get(f"{s.url}/v1/credits", headers),
            "debit": lambda: post_json(
                f"{s.url}/v1/images/generate", {"model": "bench-debit", "prompt": "x"}, headers
            ),
            "jobs": lambda: post_json(
                f"{s.url}/v1/videos/generate",
                {"model": "noop-video", "input": {"prompt": "x"}},
                headers,
            ),
        }[args.route]()
        asyncio.run(closed_loop(call, concurrency=8, total=50, seconds=30))
        spy = subprocess.Popen(
            [
                *(str(py_spy), "record", "--pid", str(s.proc.pid)),
                *("--duration", str(args.seconds), "--format", "raw", "--rate", "200"),
                *("--output", str(collapsed), "--nonblocking", "--gil"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        run = asyncio.run(
            closed_loop(
                call,
                concurrency=args.concurrency,
                total=10**7,
                seconds=float(args.seconds),
            )
        )
        spy.wait(timeout=args.seconds + 60)
    print(f"{args.route}: {run.per_second:.0f} req/s at c={args.concurrency} {run.statuses()}")
    print(summarize(collapsed))
    print(f"collapsed stacks: {collapsed}")


if __name__ == "__main__":
    main()
