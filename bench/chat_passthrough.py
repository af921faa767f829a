"""Scenario 1, chat pass-through: requests/s at concurrency 64 and added latency p50/p99 at
concurrency 1, for our /v1/chat/completions (auth + rate limit + debit on) and the LiteLLM
proxy in front of the same mock upstream, against the same client calling the mock directly.

Env: BENCH_CHAT_REQUESTS (c=64 requests per target, 1500), BENCH_CHAT_LATENCY_REQUESTS (c=1, 300),
BENCH_CHAT_CONCURRENCY (64), BENCH_CHAT_TOKENS (16 tokens per answer).
"""

from __future__ import annotations

import asyncio

from bench.chat_targets import Target, chat_targets
from bench.common import Result, env_int, ms, percentile, ratio, scenario_args, workdir
from bench.load import closed_loop, post_json

SECONDS_PER_RUN = 120.0


async def measure(result: Result, targets: dict[str, Target], quick: bool) -> None:
    total = env_int("CHAT_REQUESTS", 1500, 150, quick)
    latency_total = env_int("CHAT_LATENCY_REQUESTS", 300, 50, quick)
    concurrency = env_int("CHAT_CONCURRENCY", 64, 64, quick)
    rps: dict[str, float] = {}
    p50: dict[str, float] = {}
    p99: dict[str, float] = {}
    for name, target in targets.items():
        call = post_json(target.url, target.body(stream=False, max_tokens=64), target.headers)
        await closed_loop(call, concurrency=8, total=50, seconds=30)  # warm up
        run = await closed_loop(call, concurrency=concurrency, total=total, seconds=SECONDS_PER_RUN)
        result.check(
            len(run.ok) == len(run.samples), f"{name}: non-2xx at c={concurrency}: {run.statuses()}"
        )
        rps[name] = run.per_second
        single = await closed_loop(
            call, concurrency=1, total=latency_total, seconds=SECONDS_PER_RUN
        )
        result.check(len(single.ok) == len(single.samples), f"{name}: non-2xx at c=1")
        lat = [s.seconds for s in single.ok]
        p50[name], p99[name] = percentile(lat, 50), percentile(lat, 99)
        result.raw[name] = {
            "rps": rps[name],
            "requests": len(run.samples),
            "p50": p50[name],
            "p99": p99[name],
            "latency_requests": len(single.samples),
        }
        print(f"  {name}: {rps[name]:.0f} req/s, p50 {ms(p50[name])}, p99 {ms(p99[name])}")

    def fmt(values: dict[str, float], name: str, unit: str) -> str:
        if name not in values:
            return "not run"
        return f"{values[name]:.0f} req/s" if unit == "rps" else ms(values[name])

    has_litellm = "litellm" in targets
    notes = f"hypereal/direct {ratio(rps['hypereal'], rps['direct'])}"
    if has_litellm:
        notes += f", litellm/direct {ratio(rps['litellm'], rps['direct'])}"
    result.add(
        f"req/s at c={concurrency} ({total} req)",
        fmt(rps, "hypereal", "rps"),
        fmt(rps, "direct", "rps"),
        fmt(rps, "litellm", "rps") if has_litellm else "not installed",
        notes,
    )
    for label, values in (("p50", p50), ("p99", p99)):
        added = {n: values[n] - values["direct"] for n in values if n != "direct"}
        result.add(
            f"added latency {label} at c=1 ({latency_total} req)",
            ms(added["hypereal"]),
            f"{ms(values['direct'])} (abs)",
            ms(added["litellm"]) if has_litellm else "not installed",
            f"absolute: hypereal {ms(values['hypereal'])}"
            + (f", litellm {ms(values['litellm'])}" if has_litellm else ""),
        )


def main() -> None:
    args = scenario_args(__doc__ or "")
    result = Result("1 chat pass-through")
    tokens = env_int("CHAT_TOKENS", 16, 16, args.quick)
    with workdir("chat") as work, chat_targets(work, tokens) as targets:
        asyncio.run(measure(result, targets, args.quick))
    result.write(args.json)


if __name__ == "__main__":
    main()
