"""Scenario 4, webhooks: N no-op jobs (`noop-audio`) with a `webhook_url` at a local verifying
receiver (bench/receiver.py, its own process) that answers 500 to 20% of the deliveries; the
retry schedule is in milliseconds. Counts: delivered (unique webhook-ids answered 2xx),
duplicates, invalid signatures; and deliveries/s (first submission to last 2xx).

A second row measures delivery on its own, without the job pipeline: once the server has
stopped, the same number of delivery rows are inserted into its database (for the jobs of the
first row, so the same account and secret), then sent by a ``WebhookSender`` in this process
to a fresh receiver, driven as the engine drives it (each delivery started at once, as a job's
end starts it; due retries picked up every BENCH_ENGINE_POLL seconds).

Goal, on both rows: >= 500 deliveries/s with 0 duplicates and every signature valid.

Env: BENCH_WEBHOOKS (jobs, 500), BENCH_WEBHOOK_FAIL_RATE (0.2), BENCH_WEBHOOKS_TIMEOUT (300),
BENCH_WEBHOOK_SCHEDULE (seconds, comma separated), BENCH_ENGINE_POLL (seconds, 0.05).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from bench.common import (
    HOST,
    PY,
    Goal,
    Result,
    at_least,
    cpu_seconds,
    env_int,
    free_port,
    hypereal_server,
    process,
    process_tree,
    scenario_args,
    server_env,
    wait_http,
    workdir,
)
from bench.load import closed_loop, post_json
from hypereal.settings import Settings
from hypereal.store.db import Database
from hypereal.store.models import Job, WebhookDelivery, utcnow
from hypereal.webhooks.delivery import WebhookSender

GOAL_DELIVERIES = 500.0  # deliveries/s (the target, bench/README.md)


def goals(rate: float | None, stats: dict[str, Any]) -> list[Goal]:
    return [
        at_least(rate, GOAL_DELIVERIES, "deliveries/s"),
        Goal("0 duplicates", stats["duplicates"] == 0),
        Goal("every signature valid", stats["invalid_signatures"] == 0),
    ]


SCHEDULE = "0,0.001,0.002,0.005,0.01,0.02,0.05,0.1,0.2,0.5"


async def wait_delivered(stats_url: str, total: int, seconds: float) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=10) as http:
        while True:
            stats: dict[str, Any] = (await http.get(stats_url)).json()
            if stats["delivered"] >= total or time.monotonic() > deadline:
                # a short grace period to catch late duplicates
                await asyncio.sleep(1.0)
                return dict((await http.get(stats_url)).json())
            await asyncio.sleep(0.2)


async def send_directly(
    work: Path, receiver: str, total: int, schedule: str, poll: float, timeout: float
) -> tuple[float, dict[str, Any]]:
    """Insert ``total`` deliveries into the stopped server's database and send them from this
    process; (seconds from the first send to the last 2xx, the receiver's counts)."""
    settings = Settings(
        data_dir=work / "data",
        allowed_private_networks=["127.0.0.1/32"],
        webhook_retry_schedule=[float(x) for x in schedule.split(",")],
    )
    db = Database(settings.resolved_database_url)
    async with db.session.begin() as session:
        jobs = (await session.execute(select(Job.id, Job.account_id).limit(total))).all()
        ids = [f"msg_direct_{i}" for i in range(len(jobs))]
        for (job_id, account_id), delivery_id in zip(jobs, ids, strict=True):
            session.add(
                WebhookDelivery(
                    id=delivery_id,
                    job_id=job_id,
                    account_id=account_id,
                    url=f"{receiver}/hook",
                    event="job.completed",
                    payload={"jobId": job_id, "status": "completed"},
                    next_attempt_at=utcnow(),
                )
            )
    sender = WebhookSender(settings, db)
    tasks: set[asyncio.Task[None]] = set()

    def spawn(delivery_id: str) -> None:
        task = asyncio.create_task(sender.deliver(delivery_id))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    start = time.time()
    for delivery_id in ids:
        spawn(delivery_id)
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=10) as http:
        stats: dict[str, Any] = (await http.get(f"{receiver}/stats")).json()
        while stats["delivered"] < len(ids) and time.monotonic() < deadline:
            await asyncio.sleep(poll)
            for delivery_id in await sender.due():
                spawn(delivery_id)
            stats = (await http.get(f"{receiver}/stats")).json()
        await asyncio.sleep(1.0)  # late duplicates
        stats = (await http.get(f"{receiver}/stats")).json()
    for task in tasks:
        task.cancel()
    await sender.aclose()
    await db.dispose()
    return (stats["last_ok_at"] or start) - start, stats


def main() -> None:
    args = scenario_args(__doc__ or "")
    result = Result("4 webhooks")
    total = env_int("WEBHOOKS", 500, 50, args.quick)
    fail_rate = float(os.environ.get("BENCH_WEBHOOK_FAIL_RATE", "0.2"))
    timeout = float(os.environ.get("BENCH_WEBHOOKS_TIMEOUT", "300"))
    schedule = os.environ.get("BENCH_WEBHOOK_SCHEDULE", SCHEDULE)
    with workdir("webhooks") as work:
        env = server_env(
            work,
            HYPEREAL_WEBHOOK_RETRY_SCHEDULE=schedule,
            HYPEREAL_ENGINE_POLL_SECONDS=os.environ.get("BENCH_ENGINE_POLL", "0.05"),
        )
        with hypereal_server(work, env) as server:
            key = server.key(credits=total * 2)
            headers = {"authorization": f"Bearer {key}"}
            secret = httpx.get(f"{server.url}/v1/webhooks/secret", headers=headers).json()["secret"]
            port = free_port()
            receiver_args = [PY, "-m", "bench.receiver", "--port", str(port), "--secret", secret]
            receiver_args += ["--fail-rate", str(fail_rate)]
            log = work / "receiver.log"
            with process(receiver_args, log=log) as receiver:
                base = f"http://{HOST}:{port}"
                wait_http(f"{base}/stats", receiver, log)
                call = post_json(
                    f"{server.url}/v1/audio/generate",
                    {"model": "noop-audio", "input": {"text": "hi"}, "webhook_url": f"{base}/hook"},
                    headers,
                )
                pids = process_tree(server.proc.pid)
                cpu_before = cpu_seconds(pids)
                start = time.time()
                submitted = asyncio.run(
                    closed_loop(call, concurrency=16, total=total, seconds=timeout)
                )
                accepted = sum(1 for s in submitted.samples if s.status == 202)
                stats = asyncio.run(wait_delivered(f"{base}/stats", accepted, timeout))
                # The job, its webhook and the retries; the wait's 1 s grace costs nothing.
                cpu_us = (cpu_seconds(pids) - cpu_before) / max(accepted, 1) * 1e6
        poll = float(os.environ.get("BENCH_ENGINE_POLL", "0.05"))
        port = free_port()
        receiver_args = [PY, "-m", "bench.receiver", "--port", str(port), "--secret", secret]
        receiver_args += ["--fail-rate", str(fail_rate)]
        log = work / "receiver-direct.log"
        with process(receiver_args, log=log) as receiver:
            base = f"http://{HOST}:{port}"
            wait_http(f"{base}/stats", receiver, log)
            direct_span, direct = asyncio.run(
                send_directly(work, base, total, schedule, poll, timeout)
            )
    result.raw = {
        "stats": stats,
        "accepted": accepted,
        "schedule": schedule,
        "delivery_only": {"stats": direct, "seconds": direct_span},
    }
    span = (stats["last_ok_at"] or start) - start
    delivered = stats["delivered"]
    result.check(accepted == total, f"{accepted} of {total} jobs accepted")
    result.check(delivered == total, f"{delivered} of {total} delivered")
    result.check(stats["duplicates"] == 0, f"{stats['duplicates']} duplicates")
    result.check(stats["invalid_signatures"] == 0, f"{stats['invalid_signatures']} invalid")
    rate = delivered / span if span > 0 else None
    result.add(
        f"{total} jobs, {fail_rate:.0%} injected 500s, ms retry schedule",
        f"{rate:.0f} deliveries/s" if rate is not None else "n/a",
        notes=(
            f"delivered {delivered}/{total}, duplicates {stats['duplicates']}, invalid "
            f"signatures {stats['invalid_signatures']}; {stats['received']} POSTs, "
            f"{stats['injected_500']} injected 500s; {span:.1f} s; server CPU per job with its "
            f"webhook: {cpu_us:.0f} us"
        ),
        goal=goals(rate, stats),
    )
    result.check(direct["delivered"] == total, f"delivery only: {direct['delivered']} delivered")
    result.check(direct["duplicates"] == 0, f"delivery only: {direct['duplicates']} duplicates")
    result.check(
        direct["invalid_signatures"] == 0,
        f"delivery only: {direct['invalid_signatures']} invalid signatures",
    )
    direct_rate = direct["delivered"] / direct_span if direct_span > 0 else None
    result.add(
        f"{total} deliveries inserted, then sent (no jobs), same receiver and schedule",
        f"{direct_rate:.0f} deliveries/s" if direct_rate is not None else "n/a",
        notes=(
            f"delivered {direct['delivered']}/{total}, duplicates {direct['duplicates']}, "
            f"invalid signatures {direct['invalid_signatures']}; {direct['received']} POSTs, "
            f"{direct['injected_500']} injected 500s; {direct_span:.1f} s"
        ),
        goal=goals(direct_rate, direct),
    )
    result.write(args.json)


if __name__ == "__main__":
    main()
