"""What the candidate hot-path fixes (bench/patched_serve.py) would buy, measured side by side:
chat pass-through req/s at c=64 and p50 at c=1, and GET /v1/credits req/s at c=64, for the
unpatched server and each patch (then all of them) against the same mock upstream.

``python -m bench.experiments [--quick]``; prints a markdown table. Not part of run.sh.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

from bench.common import (
    HOST,
    HYPEREAL,
    PY,
    ROOT,
    Server,
    create_key,
    free_port,
    mock_upstream,
    percentile,
    process,
    server_env,
    upstream_backends,
    wait_http,
    workdir,
)
from bench.load import closed_loop, get, post_json

VARIANTS = [
    ("unpatched", ""),
    ("auth-cache", "auth-cache"),
    ("no-access-log", "no-access-log"),
    ("both", "auth-cache,no-access-log"),
]


@contextlib.contextmanager
def patched_server(work: Path, env: dict[str, str], patches: str) -> Iterator[Server]:
    port = free_port()
    env = {**env, "HYPEREAL_PUBLIC_URL": f"http://{HOST}:{port}"}
    subprocess.run([HYPEREAL, "migrate"], env=env, check=True, capture_output=True, cwd=ROOT)
    log = work / f"api-{patches or 'none'}.log"
    args = [PY, "-m", "bench.patched_serve", "--port", str(port), "--patches", patches]
    with process(args, env=env, log=log) as proc:
        wait_http(f"http://{HOST}:{port}/openapi.json", proc, log)
        yield Server(f"http://{HOST}:{port}", env, proc, log)


async def measure(url: str, key: str, total: int) -> tuple[float, float, float]:
    headers = {"authorization": f"Bearer {key}"}
    body = {"model": "bench-chat", "messages": [{"role": "user", "content": "hi"}]}
    chat = post_json(f"{url}/v1/chat/completions", {**body, "max_tokens": 64}, headers)
    await closed_loop(chat, concurrency=8, total=50, seconds=30)
    rps = (await closed_loop(chat, concurrency=64, total=total, seconds=120)).per_second
    single = await closed_loop(chat, concurrency=1, total=total // 3, seconds=120)
    p50 = percentile([s.seconds for s in single.ok], 50)
    credits = get(f"{url}/v1/credits", headers)
    reads = (await closed_loop(credits, concurrency=64, total=total, seconds=120)).per_second
    return rps, p50, reads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="variant names, comma separated")
    args = parser.parse_args()
    only = {x for x in args.only.split(",") if x}
    total = 300 if args.quick else 900
    lines = [
        "| variant | chat req/s c=64 | chat p50 c=1 | GET /v1/credits req/s c=64 |",
        "|---|---|---|---|",
    ]
    with workdir("experiments") as work, mock_upstream(work, 16) as upstream:
        for name, patches in VARIANTS:
            if only and name not in only:
                continue
            data = work / name.replace(" ", "-")
            data.mkdir()
            env = server_env(data, HYPEREAL_BACKENDS=upstream_backends(upstream))
            with patched_server(data, env, patches) as server:
                key = create_key(server.env, 10**12, 10**9)
                rps, p50, reads = asyncio.run(measure(server.url, key, total))
            line = f"| {name} | {rps:.0f} | {p50 * 1000:.1f} ms | {reads:.0f} |"
            print(line, flush=True)
            lines.append(line)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
