"""Scenario 1, chat pass-through: requests/s at concurrency 64 and added latency p50/p99 at
concurrency 1, for our /v1/chat/completions (auth + rate limit + debit on) and the LiteLLM
proxy in front of the same mock upstream, against the same client calling the mock directly.
Also: the server's resident memory (VmRSS sampled every 0.1 s and VmHWM, from /proc) while it
serves the chat load, and `GET /v1/credits` req/s at the same concurrency (beside the mock's
`GET /health`, the load generator's ceiling on this machine).

Env: BENCH_CHAT_REQUESTS (c=64 requests per target, 1500), BENCH_CHAT_LATENCY_REQUESTS (c=1, 300),
BENCH_CHAT_CONCURRENCY (64), BENCH_CHAT_TOKENS (16 tokens per answer), BENCH_CREDITS_REQUESTS
(c=64 GETs, 3000).
"""

from __future__ import annotations

import asyncio
import contextlib

from bench.chat_targets import Target, chat_targets, server_processes, several_processes_name
from bench.common import (
    Result,
    RssSampler,
    at_least,
    at_most,
    cpu_note,
    cpu_seconds,
    env_int,
    mb,
    ms,
    percentile,
    process_tree,
    ratio,
    scenario_args,
    times_at_least,
    workdir,
)
from bench.load import closed_loop, get, post_json

SECONDS_PER_RUN = 120.0

# The targets (bench/README.md).
GOAL_RPS = 1500.0  # req/s at c=64, and this many times LiteLLM's:
GOAL_TIMES_LITELLM = 20.0
GOAL_P50_MS = 1.0  # added latency at c=1
GOAL_P99_MS = 5.0
GOAL_CREDITS_RPS = 3000.0
GOAL_RSS_MB = 200.0  # MB = 10^6 bytes


async def measure(result: Result, targets: dict[str, Target], quick: bool) -> None:
    total = env_int("CHAT_REQUESTS", 1500, 150, quick)
    latency_total = env_int("CHAT_LATENCY_REQUESTS", 300, 50, quick)
    concurrency = env_int("CHAT_CONCURRENCY", 64, 64, quick)
    rps: dict[str, float] = {}
    p50: dict[str, float] = {}
    p99: dict[str, float] = {}
    rss: dict[str, RssSampler] = {}
    cpu_us: dict[str, float] = {}  # server CPU per request at c=64 (user + system)
    for name, target in targets.items():
        call = post_json(target.url, target.body(stream=False, max_tokens=64), target.headers)
        async with contextlib.AsyncExitStack() as stack:
            if target.pid is not None:  # resident memory while it serves the chat load
                rss[name] = await stack.enter_async_context(RssSampler(target.pid))
            await closed_loop(call, concurrency=8, total=50, seconds=30)  # warm up
            pids = process_tree(target.pid) if target.pid is not None else []
            cpu_before = cpu_seconds(pids)
            run = await closed_loop(
                call, concurrency=concurrency, total=total, seconds=SECONDS_PER_RUN
            )
            if pids and run.ok:
                cpu_us[name] = 1e6 * (cpu_seconds(pids) - cpu_before) / len(run.ok)
            result.check(
                len(run.ok) == len(run.samples),
                f"{name}: non-2xx at c={concurrency}: {run.statuses()}",
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
        if name in rss:
            sampler = rss[name]
            result.raw[name]["rss_kib"] = {
                "first": sampler.first,
                "peak": sampler.peak,
                "last": sampler.last,
                "hwm": sampler.hwm,
                "samples": sampler.samples,
                "pids": sampler.pids,
            }
        print(f"  {name}: {rps[name]:.0f} req/s, p50 {ms(p50[name])}, p99 {ms(p99[name])}")

    def fmt(values: dict[str, float], name: str, unit: str) -> str:
        if name not in values:
            return "not run"
        return f"{values[name]:.0f} req/s" if unit == "rps" else ms(values[name])

    has_litellm = "litellm" in targets
    several = several_processes_name() if several_processes_name() in rps else None
    notes = f"one server process each; hypereal/direct {ratio(rps['hypereal'], rps['direct'])}"
    if has_litellm:
        notes += f", litellm/direct {ratio(rps['litellm'], rps['direct'])}"
        notes += f", hypereal/litellm {ratio(rps['hypereal'], rps['litellm'])}"
    notes += cpu_note({n: v for n, v in cpu_us.items() if n != several})
    ratio_goal = times_at_least(rps["hypereal"], rps.get("litellm"), GOAL_TIMES_LITELLM)
    result.add(
        f"req/s at c={concurrency} ({total} req)",
        fmt(rps, "hypereal", "rps"),
        fmt(rps, "direct", "rps"),
        fmt(rps, "litellm", "rps") if has_litellm else "not installed",
        notes,
        # With a several-process server in the run, the absolute goal is judged on its row
        # (what this machine serves), the ratio here (one process against one LiteLLM worker).
        goal=[ratio_goal]
        if several
        else [at_least(rps["hypereal"], GOAL_RPS, "req/s"), ratio_goal],
    )
    if several:
        processes = server_processes()
        result.add(
            f"req/s at c={concurrency} ({total} req), `hypereal serve --processes {processes}`",
            fmt(rps, several, "rps"),
            fmt(rps, "direct", "rps"),
            notes=(
                f"{processes} server processes on one port, one SQLite file, the rate limiter "
                f"kept by their parent; {processes}p/1p "
                f"{ratio(rps[several], rps['hypereal'])}, {processes}p/direct "
                f"{ratio(rps[several], rps['direct'])}"
                + (
                    f", {processes}p/litellm {ratio(rps[several], rps['litellm'])}"
                    if has_litellm
                    else ""
                )
                + f"; added p50 at c=1 {ms(p50[several] - p50['direct'])}"
                + cpu_note({several: cpu_us[several]} if several in cpu_us else {})
            ),
            goal=[at_least(rps[several], GOAL_RPS, "req/s")],
        )
    for label, values, goal_ms in (("p50", p50, GOAL_P50_MS), ("p99", p99, GOAL_P99_MS)):
        added = {n: values[n] - values["direct"] for n in values if n != "direct"}
        # (one process; the several-process server's p50 is in its row's notes)
        result.add(
            f"added latency {label} at c=1 ({latency_total} req)",
            ms(added["hypereal"]),
            f"{ms(values['direct'])} (abs)",
            ms(added["litellm"]) if has_litellm else "not installed",
            f"absolute: hypereal {ms(values['hypereal'])}"
            + (f", litellm {ms(values['litellm'])}" if has_litellm else ""),
            goal=[at_most(added["hypereal"] * 1000, goal_ms, "ms")],
        )
    await measure_credits(result, targets, quick, concurrency)
    add_rss_row(result, rss, has_litellm)


async def measure_credits(
    result: Result, targets: dict[str, Target], quick: bool, concurrency: int
) -> None:
    """``GET /v1/credits`` (auth + a balance read) at c=64 on our server, beside the mock's
    ``GET /health`` (a raw ASGI answer: what this load generator reaches on this machine)."""
    total = env_int("CREDITS_REQUESTS", 3000, 500, quick)
    ours = targets["hypereal"]
    calls = {"hypereal": get(ours.url.removesuffix("/chat/completions") + "/credits", ours.headers)}
    several = targets.get(several_processes_name())
    if several is not None:
        calls[several.name] = get(
            several.url.removesuffix("/chat/completions") + "/credits", several.headers
        )
    calls["direct"] = get(targets["direct"].url.split("/v1/", 1)[0] + "/health")
    per_second: dict[str, float] = {}
    for name, call in calls.items():
        await closed_loop(call, concurrency=8, total=50, seconds=30)  # warm up
        run = await closed_loop(call, concurrency=concurrency, total=total, seconds=SECONDS_PER_RUN)
        result.check(
            len(run.ok) == len(run.samples),
            f"GET {'/health' if name == 'direct' else '/v1/credits'} ({name}): {run.statuses()}",
        )
        per_second[name] = run.per_second
        result.raw[f"{name}_get"] = {"rps": run.per_second, "requests": len(run.samples)}
        print(f"  GET ({name}): {run.per_second:.0f} req/s")
    for name in calls:
        if name == "direct":
            continue
        judged = name == several.name if several is not None else True
        processes = (
            "one server process" if name == "hypereal" else f"`--processes {server_processes()}`"
        )
        result.add(
            f"GET /v1/credits req/s at c={concurrency} ({total} req), {processes}",
            f"{per_second[name]:.0f} req/s",
            f"{per_second['direct']:.0f} req/s (mock GET /health)",
            notes=(
                f"auth + balance read; hypereal/mock-health "
                f"{ratio(per_second[name], per_second['direct'])}"
            ),
            goal=[at_least(per_second[name], GOAL_CREDITS_RPS, "req/s")] if judged else [],
        )


def add_rss_row(result: Result, rss: dict[str, RssSampler], has_litellm: bool) -> None:
    if "hypereal" not in rss:
        return
    ours = rss["hypereal"]
    peak = max(ours.peak, ours.hwm)  # VmHWM also catches a peak between two samples
    litellm = rss.get("litellm")
    result.add(
        "server RSS under the chat load (peak)",
        mb(peak),
        litellm=mb(max(litellm.peak, litellm.hwm))
        if litellm
        else ("not run" if has_litellm else "not installed"),
        notes=(
            f"no local model loaded; VmRSS sampled every 0.1 s through the chat runs "
            f"({ours.samples} samples): {mb(ours.first)} before, peak {mb(ours.peak)}, "
            f"{mb(ours.last)} after; VmHWM {mb(ours.hwm)}; "
            f"{len(ours.pids)} process{'es' if len(ours.pids) > 1 else ''}"
        ),
        goal=[at_most(peak * 1024 / 1e6, GOAL_RSS_MB, "MB")],
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
