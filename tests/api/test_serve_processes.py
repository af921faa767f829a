"""`hypereal serve --processes 2` on one port, embedded mode (SQLite, in-process jobs, no
Redis): both processes answer, and what one process guarantees holds across the two.

- The rate limit is exact: the parent keeps the moving windows and both processes ask it, so
  a burst over many connections is cut at the key's limit, each remaining count given once.
- The balance is exact: concurrent paid requests succeed floor(balance / cost) times.
- Jobs submitted to either process complete, and /metrics counts the requests of both.
- A process killed with SIGKILL is replaced, and the job it was running completes once.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.processes import process, wait_until_healthy
from tests.support.servers import free_port

HYPEREAL = str(Path(sys.executable).with_name("hypereal"))

LIMIT = 40
BURST = 100
COST = 1  # every noop-* model's price (backends/noop.py)


@dataclass
class Served:
    url: str
    log: Path
    admin_key: str


def _env(tmp_path: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("HYPEREAL_")}
    return {
        **env,
        "HYPEREAL_DATA_DIR": str(tmp_path / "data"),
        "HYPEREAL_ENABLE_TEST_BACKENDS": "1",
        "HYPEREAL_BACKENDS": json.dumps({"noop": {"type": "noop", "delay_seconds": 0}}),
        "HYPEREAL_WORKER_CONCURRENCY": "4",
    }


@contextmanager
def serving(tmp_path: Path, **env: str) -> Iterator[Served]:
    """`hypereal serve --processes 2` on a fresh data folder (``env``: more settings) until
    the block ends; the admin key is the one the parent printed."""
    port = free_port()
    log = tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    env = {**_env(tmp_path), "HYPEREAL_PUBLIC_URL": url, **env}
    args = [HYPEREAL, "serve", "--port", str(port), "--processes", "2"]
    with process(args, env, log) as proc:
        wait_until_healthy(url, proc, log, seconds=90)
        # The parent bootstrapped the admin once and printed its key once.
        keys = re.findall(r"^\s+(ck_\S+)\s*$", log.read_text(), re.M)
        assert len(keys) == 1, log.read_text(errors="replace")
        yield Served(url, log, keys[0])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving(tmp_path_factory.mktemp("processes")) as server:
        yield server


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def create_key(served: Served, credits: int, rate_limit: int | None = None) -> dict[str, str]:
    body: dict[str, object] = {"name": "user", "credits": credits}
    if rate_limit is not None:
        body["rateLimitPerHour"] = rate_limit
    created = httpx.post(
        f"{served.url}/v1/admin/keys", json=body, headers=bearer(served.admin_key), timeout=30
    )
    assert created.status_code == 201, created.text
    data: dict[str, str] = created.json()
    return data


def access_pids(served: Served, path: str) -> Counter[int]:
    """How many requests for ``path`` each process logged (JSON access lines with ``pid``)."""
    pids: Counter[int] = Counter()
    for line in served.log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if record.get("event") == "request" and record.get("path") == path:
            pids[int(record["pid"])] += 1
    return pids


async def burst(url: str, key: str, count: int) -> list[httpx.Response]:
    """``count`` requests at once, each on a connection of its own (new connections are
    spread over the processes by the kernel)."""
    start = asyncio.Event()

    async def one() -> httpx.Response:
        async with httpx.AsyncClient(timeout=60) as client:
            await start.wait()
            return await client.get(f"{url}/v1/credits", headers=bearer(key))

    tasks = [asyncio.create_task(one()) for _ in range(count)]
    await asyncio.sleep(0.2)
    start.set()
    return await asyncio.gather(*tasks)


def test_the_rate_limit_is_exact_across_processes(served: Served) -> None:
    key = create_key(served, credits=0, rate_limit=LIMIT)
    answers = asyncio.run(burst(served.url, key["key"], BURST))

    statuses = Counter(answer.status_code for answer in answers)
    assert statuses == {200: LIMIT, 429: BURST - LIMIT}, statuses
    remaining = sorted(int(a.headers["X-RateLimit-Remaining"]) for a in answers if a.is_success)
    assert remaining == list(range(LIMIT))  # each count given out once
    refused = [a for a in answers if a.status_code == 429]
    assert all(a.json()["error"] for a in refused)
    assert all(1 <= int(a.headers["Retry-After"]) <= 3600 for a in refused)
    # Both processes answered part of the burst (else this proved nothing about sharing).
    pids = access_pids(served, "/v1/credits")
    assert len(pids) == 2, pids


def test_the_balance_is_exact_across_processes(served: Served) -> None:
    key = create_key(served, credits=60 * COST)

    async def spend() -> list[httpx.Response]:
        start = asyncio.Event()

        async def one(n: int) -> httpx.Response:
            async with httpx.AsyncClient(timeout=60) as client:
                await start.wait()
                return await client.post(
                    f"{served.url}/v1/images/generate",
                    json={"model": "noop-image", "prompt": f"picture {n}", "size": "64*64"},
                    headers=bearer(key["key"]),
                )

        tasks = [asyncio.create_task(one(n)) for n in range(100)]
        await asyncio.sleep(0.2)
        start.set()
        return await asyncio.gather(*tasks)

    answers = asyncio.run(spend())
    statuses = Counter(answer.status_code for answer in answers)
    assert statuses == {200: 60, 402: 40}, {a.text for a in answers}
    left = httpx.get(f"{served.url}/v1/credits", headers=bearer(key["key"])).json()
    assert left["balance"] == 0, left


def test_jobs_through_either_process_complete(served: Served) -> None:
    key = create_key(served, credits=10_000)
    with httpx.Client(timeout=60) as client:
        polls = []
        for n in range(12):
            # A connection each: the submissions land on both processes.
            answer = httpx.post(
                f"{served.url}/v1/videos/generate",
                json={"model": "noop-video", "input": {"prompt": f"clip {n}"}},
                headers=bearer(key["key"]),
                timeout=60,
            )
            assert answer.status_code == 202, answer.text
            polls.append(answer.json()["pollUrl"])
        deadline = time.monotonic() + 60
        pending = set(polls)
        while pending and time.monotonic() < deadline:
            for poll in list(pending):
                job = client.get(poll, headers=bearer(key["key"])).json()
                if job["status"] in ("completed", "failed"):
                    assert job["status"] == "completed", job
                    pending.discard(poll)
            time.sleep(0.1)
        assert not pending, f"jobs not completed: {pending}"
    assert len(access_pids(served, "/v1/videos/generate")) == 2


def test_metrics_count_the_requests_of_every_process(served: Served) -> None:
    key = create_key(served, credits=0)
    answers = asyncio.run(burst(served.url, key["key"], 30))
    assert all(answer.status_code == 200 for answer in answers)
    logged = sum(access_pids(served, "/v1/credits").values())
    text = httpx.get(f"{served.url}/metrics").text
    counted = sum(
        float(value)
        for value in re.findall(
            r'^hypereal_http_requests_total\{[^}]*route="/v1/credits"[^}]*\} (\S+)$', text, re.M
        )
    )
    assert counted == logged, (counted, logged)


def test_a_killed_process_is_replaced_and_its_job_runs_again_once(tmp_path: Path) -> None:
    """SIGKILL the server process running a job: the parent starts a new process, which takes
    the dead one's job back at once (no waiting for its lease), and the job completes once,
    charged once."""
    database = tmp_path / "data" / "hypereal.db"
    delayed = json.dumps({"noop": {"type": "noop", "delay_seconds": 3}})
    # A lease of 10 minutes: the recovery must not come from the lease running out.
    with serving(tmp_path, HYPEREAL_BACKENDS=delayed, HYPEREAL_JOB_LEASE_SECONDS="600") as server:
        url, log = server.url, server.log
        deadline = time.monotonic() + 90
        key = create_key(server, credits=100)
        answer = httpx.post(
            f"{url}/v1/videos/generate",
            json={"model": "noop-video", "input": {"prompt": "kill me"}},
            headers=bearer(key["key"]),
            timeout=30,
        )
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["jobId"]
        worker = ""
        while not worker:  # the process that runs it ("host:pid:tag")
            assert time.monotonic() < deadline
            with sqlite3.connect(database) as conn:
                row = conn.execute(
                    "SELECT worker_id FROM jobs WHERE id = ? AND state = 'processing'", (job_id,)
                ).fetchone()
            worker = row[0] if row and row[0] else ""
            time.sleep(0.05)
        os.kill(int(worker.split(":")[1]), signal.SIGKILL)

        poll = answer.json()["pollUrl"]
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            job = httpx.get(poll, headers=bearer(key["key"]), timeout=30).json()
            if job["status"] in ("completed", "failed"):
                break
            time.sleep(0.2)
        assert job["status"] == "completed", job
        with sqlite3.connect(database) as conn:
            attempts, finished_by = conn.execute(
                "SELECT attempts, worker_id FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            kinds = [
                row[0]
                for row in conn.execute(
                    "SELECT kind FROM ledger_entries WHERE account_id = ? ORDER BY id",
                    (key["accountId"],),
                )
            ]
        assert attempts == 2  # the killed run and the one that completed
        assert finished_by != worker
        assert kinds == ["grant", "debit"]  # charged once, nothing refunded
        balance = httpx.get(f"{url}/v1/credits", headers=bearer(key["key"])).json()["balance"]
        assert balance == 100 - COST
        assert "taking it back" in log.read_text()
