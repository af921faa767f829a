"""Scenario 2, SSE: time-to-first-token overhead p50/p99 (concurrency 1) and streams/s
(concurrency 64) of our streamed /v1/chat/completions and the LiteLLM proxy against the mock
streamed directly. Asserts that every stream through us carries exactly the chunks the
upstream sent (one content chunk per token).

Env: BENCH_SSE_STREAMS (c=64 streams per target, 600), BENCH_SSE_TTFT_STREAMS (c=1, 200),
BENCH_SSE_CONCURRENCY (64), BENCH_SSE_TOKENS (32 tokens per stream).
"""

from __future__ import annotations

import asyncio

from bench.chat_targets import Target, chat_targets
from bench.common import (
    Result,
    at_most,
    cpu_note,
    cpu_seconds,
    env_int,
    holds,
    ms,
    percentile,
    process_tree,
    ratio,
    scenario_args,
    times_at_least,
    workdir,
)
from bench.load import closed_loop, stream_sse

SECONDS_PER_RUN = 120.0

# The targets (bench/README.md).
GOAL_TIMES_LITELLM = 20.0  # streams/s at c=64
GOAL_TTFT_P50_MS = 1.0  # TTFT overhead at c=1


async def measure(result: Result, targets: dict[str, Target], tokens: int, quick: bool) -> None:
    total = env_int("SSE_STREAMS", 600, 100, quick)
    ttft_total = env_int("SSE_TTFT_STREAMS", 200, 50, quick)
    concurrency = env_int("SSE_CONCURRENCY", 64, 64, quick)
    sps: dict[str, float] = {}
    p50: dict[str, float] = {}
    p99: dict[str, float] = {}
    chunk_counts: dict[str, set[int]] = {}
    cpu_us: dict[str, float] = {}  # server CPU per stream at c=64 (user + system)
    for name, target in targets.items():
        call = stream_sse(target.url, target.body(stream=True, max_tokens=1024), target.headers)
        await closed_loop(call, concurrency=8, total=40, seconds=30)  # warm up
        pids = process_tree(target.pid) if target.pid is not None else []
        cpu_before = cpu_seconds(pids)
        run = await closed_loop(call, concurrency=concurrency, total=total, seconds=SECONDS_PER_RUN)
        if pids and run.ok:
            cpu_us[name] = 1e6 * (cpu_seconds(pids) - cpu_before) / len(run.ok)
        result.check(
            len(run.ok) == len(run.samples),
            f"{name}: failed streams at c={concurrency}: {run.statuses()} "
            f"{[s.error for s in run.samples if s.error][:3]}",
        )
        sps[name] = run.per_second
        single = await closed_loop(call, concurrency=1, total=ttft_total, seconds=SECONDS_PER_RUN)
        ttft = [s.ttft for s in single.ok if s.ttft is not None]
        p50[name], p99[name] = percentile(ttft, 50), percentile(ttft, 99)
        chunk_counts[name] = {s.chunks for s in run.ok + single.ok}
        result.raw[name] = {
            "streams_per_s": sps[name],
            "ttft_p50": p50[name],
            "ttft_p99": p99[name],
            "chunk_counts": sorted(chunk_counts[name]),
        }
        print(f"  {name}: {sps[name]:.0f} streams/s, TTFT p50 {ms(p50[name])}, p99 {ms(p99[name])}")

    # The bench's assertion: our gateway passes every upstream chunk through, one for one.
    assert chunk_counts["direct"] == {tokens}, f"mock sent {chunk_counts['direct']} chunks"
    assert chunk_counts["hypereal"] == {tokens}, (
        f"chunk counts changed through hypereal: {chunk_counts['hypereal']} != {{{tokens}}}"
    )
    has_litellm = "litellm" in targets
    notes = f"hypereal/direct {ratio(sps['hypereal'], sps['direct'])}"
    if has_litellm:
        notes += f", litellm/direct {ratio(sps['litellm'], sps['direct'])}"
        notes += f", hypereal/litellm {ratio(sps['hypereal'], sps['litellm'])}"
    notes += cpu_note(cpu_us, "stream")
    result.add(
        f"streams/s at c={concurrency} ({total} streams, {tokens} tok)",
        f"{sps['hypereal']:.0f}/s",
        f"{sps['direct']:.0f}/s",
        f"{sps['litellm']:.0f}/s" if has_litellm else "not installed",
        notes,
        goal=[times_at_least(sps["hypereal"], sps.get("litellm"), GOAL_TIMES_LITELLM)],
    )
    for label, values in (("p50", p50), ("p99", p99)):
        added = {n: values[n] - values["direct"] for n in values if n != "direct"}
        result.add(
            f"TTFT overhead {label} at c=1 ({ttft_total} streams)",
            ms(added["hypereal"]),
            f"{ms(values['direct'])} (abs)",
            ms(added["litellm"]) if has_litellm else "not installed",
            f"absolute: hypereal {ms(values['hypereal'])}"
            + (f", litellm {ms(values['litellm'])}" if has_litellm else "")
            + f"; TTFT hypereal/direct {ratio(values['hypereal'], values['direct'])}"
            + (
                f", litellm/direct {ratio(values['litellm'], values['direct'])}"
                if has_litellm
                else ""
            ),
            goal=[at_most(added["hypereal"] * 1000, GOAL_TTFT_P50_MS, "ms")]
            if label == "p50"
            else [],
        )
    litellm_chunks = sorted(chunk_counts.get("litellm", set()))
    result.add(
        "content chunks per stream (asserted equal)",
        f"{sorted(chunk_counts['hypereal'])}",
        f"{sorted(chunk_counts['direct'])}",
        f"{litellm_chunks}" if has_litellm else "not installed",
        "OK: unchanged" if chunk_counts["hypereal"] == chunk_counts["direct"] else "CHANGED",
        goal=[holds(chunk_counts["hypereal"] == chunk_counts["direct"], "= upstream's")],
    )


def main() -> None:
    args = scenario_args(__doc__ or "")
    result = Result("2 SSE")
    tokens = env_int("SSE_TOKENS", 32, 32, args.quick)
    with workdir("sse") as work, chat_targets(work, tokens, several=False) as targets:
        asyncio.run(measure(result, targets, tokens, args.quick))
    result.write(args.json)


if __name__ == "__main__":
    main()
