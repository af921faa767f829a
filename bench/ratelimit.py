"""Scenario 6, rate limit: a burst of 1,500 requests on one key whose limit is 1,000 per
hour: accepted count (must be exactly 1,000), 429s, and whether each 429 has Retry-After.
Run with the in-memory limiter (embedded default), with the in-memory limiter shared by the
processes of `hypereal serve --processes N` (kept by their parent; BENCH_SERVER_PROCESSES, 2; 1
leaves the row out) and with Redis (scaled-out mode).

Env: BENCH_RL_BURST (1500), BENCH_RL_LIMIT (1000), BENCH_RL_CONCURRENCY (64).
"""

from __future__ import annotations

import asyncio
import os

from bench.common import (
    REDIS_URL,
    Result,
    env_int,
    hypereal_server,
    redis_available,
    scenario_args,
    server_env,
    workdir,
)
from bench.load import Run, closed_loop, get


async def burst(url: str, key: str, total: int, concurrency: int) -> Run:
    call = get(f"{url}/v1/credits", {"authorization": f"Bearer {key}"})
    return await closed_loop(call, concurrency=concurrency, total=total, seconds=120)


def main() -> None:
    args = scenario_args(__doc__ or "")
    result = Result("6 rate limit")
    total = env_int("RL_BURST", 1500, 1500, args.quick)
    limit = env_int("RL_LIMIT", 1000, 1000, args.quick)
    concurrency = env_int("RL_CONCURRENCY", 64, 64, args.quick)
    several = max(1, int(os.environ.get("BENCH_SERVER_PROCESSES", "2")))
    modes: list[tuple[str, dict[str, str], int]] = [("memory", {}, 1)]
    if several > 1:
        modes.append((f"memory, shared by {several} processes", {}, several))
    if redis_available():
        modes.append(("redis", {"HYPEREAL_REDIS_URL": REDIS_URL}, 1))
    else:
        result.add("burst (Redis limiter)", "skipped", notes="Redis not reachable on 6379")
    for mode, extra, processes in modes:
        with workdir(f"rl-{processes}p") as work:
            env = server_env(work, HYPEREAL_RATE_LIMIT_PER_HOUR=str(limit), **extra)
            with hypereal_server(work, env, processes=processes) as server:
                key = server.key(credits=0, rate_limit=None)  # the server's default limit
                run = asyncio.run(burst(server.url, key, total, concurrency))
        statuses = run.statuses()
        accepted = statuses.get(200, 0)
        rejected = [s for s in run.samples if s.status == 429]
        with_retry = sum(1 for s in rejected if s.headers.get("retry-after", "").isdigit())
        result.check(accepted == limit, f"{mode}: accepted {accepted}, expected {limit}")
        result.check(len(rejected) == total - limit, f"{mode}: {len(rejected)} 429s")
        result.check(with_retry == len(rejected), f"{mode}: {with_retry} 429s with Retry-After")
        result.raw[mode] = {"statuses": statuses, "wall": run.wall}
        result.add(
            f"burst {total} on one key ({mode} limiter), c={concurrency}",
            f"{accepted} accepted",
            notes=(
                f"expected {limit}; {len(rejected)} x 429, {with_retry} with Retry-After; "
                f"{len(run.samples) / run.wall:.0f} req/s"
            ),
        )
    result.write(args.json)


if __name__ == "__main__":
    main()
