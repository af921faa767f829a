"""The scaled-out mode for real: PostgreSQL as the database, the Redis server on 127.0.0.1 as
the queue, `hypereal serve` and two `hypereal worker` processes. One worker is killed with
SIGKILL while it runs jobs; every job must still end exactly once, with one signed webhook
each, and the ledger must add up."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from hypereal.domain import ledger
from hypereal.store.db import Database
from hypereal.store.models import Job, WebhookDelivery
from tests.support.infra import ensure_postgres, ensure_redis, temporary_postgres_database
from tests.support.polling import eventually
from tests.support.processes import process
from tests.support.servers import free_port, serve_app
from tests.webhooks.test_delivery import Receiver

HYPEREAL = str(Path(sys.executable).with_name("hypereal"))
JOBS = 12
JOB_SECONDS = 1.5


@pytest.fixture(scope="module")
def infrastructure() -> None:
    if not ensure_postgres():
        pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432 and could not be started")
    if not ensure_redis():
        pytest.fail("Redis is not reachable on 127.0.0.1:6379 and could not be started")


def scaled_out_env(tmp_path: Path, database_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "HYPEREAL_DATA_DIR": str(tmp_path / "data"),
        "HYPEREAL_DATABASE_URL": database_url,
        "HYPEREAL_BROKER_URL": "redis://127.0.0.1:6379/0",
        "HYPEREAL_BROKER_QUEUE": f"hypereal-test-{uuid.uuid4().hex[:12]}",
        "HYPEREAL_ENABLE_TEST_BACKENDS": "1",
        "HYPEREAL_BACKENDS": json.dumps({"noop": {"type": "noop", "delay_seconds": JOB_SECONDS}}),
        "HYPEREAL_JOB_LEASE_SECONDS": "3",
        "HYPEREAL_ENGINE_POLL_SECONDS": "0.3",
        "HYPEREAL_WORKER_CONCURRENCY": "4",
        "HYPEREAL_WEBHOOK_RETRY_SCHEDULE": "0,0.2,0.5,1",
        "HYPEREAL_ALLOWED_PRIVATE_NETWORKS": "127.0.0.1/32",
        "HYPEREAL_BOOTSTRAP_ADMIN": "false",
    }


def wait_for_output(
    log: Path, text: str, proc: subprocess.Popen[bytes], seconds: float = 30
) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited early:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)
    pytest.fail(f"{proc.args} did not print {text!r}:\n{log.read_text(errors='replace')}")


def create_key(env: dict[str, str], credits: int) -> str:
    done = subprocess.run(
        [HYPEREAL, "keys", "create", "--credits", str(credits)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


async def wait_until_finished(
    client: httpx.AsyncClient, job_ids: list[str], headers: dict[str, str], seconds: float
) -> dict[str, dict[str, Any]]:
    finished: dict[str, dict[str, Any]] = {}
    async with asyncio.timeout(seconds):
        while len(finished) < len(job_ids):
            for job_id in job_ids:
                if job_id in finished:
                    continue
                job = (await client.get(f"/v1/jobs/{job_id}", headers=headers)).json()
                if job["status"] != "processing":
                    finished[job_id] = job
            await asyncio.sleep(0.2)
    return finished


def pid_of(worker_id: str | None) -> int | None:
    return int(worker_id.split(":")[1]) if worker_id else None


def test_sigkilled_worker_loses_no_job_and_ends_none_twice(
    infrastructure: None, tmp_path: Path
) -> None:
    receiver = Receiver()
    with ExitStack() as stack:
        database_url = stack.enter_context(temporary_postgres_database())
        env = scaled_out_env(tmp_path, database_url)
        subprocess.run([HYPEREAL, "migrate"], env=env, check=True, capture_output=True)
        port = free_port()
        env["HYPEREAL_PUBLIC_URL"] = f"http://127.0.0.1:{port}"
        hook = stack.enter_context(serve_app(receiver.app())) + "/hook"

        logs = {name: tmp_path / f"{name}.log" for name in ("api", "worker-a", "worker-b")}
        api = stack.enter_context(
            process([HYPEREAL, "serve", "--port", str(port)], env, logs["api"])
        )
        worker_a = stack.enter_context(process([HYPEREAL, "worker"], env, logs["worker-a"]))
        worker_b = stack.enter_context(process([HYPEREAL, "worker"], env, logs["worker-b"]))
        wait_for_output(logs["api"], "Application startup complete", api)
        wait_for_output(logs["worker-a"], "consuming", worker_a)
        wait_for_output(logs["worker-b"], "consuming", worker_b)
        secret = create_key(env, credits=100)

        scenario = Scenario(
            base=env["HYPEREAL_PUBLIC_URL"],
            headers={"Authorization": f"Bearer {secret}"},
            hook=hook,
            receiver=receiver,
            worker_a=worker_a,
            worker_b=worker_b,
        )
        asyncio.run(scenario.run(Database(database_url)))


@dataclass
class Scenario:
    base: str
    headers: dict[str, str]
    hook: str
    receiver: Receiver
    worker_a: subprocess.Popen[bytes]
    worker_b: subprocess.Popen[bytes]

    async def run(self, db: Database) -> None:
        try:
            async with httpx.AsyncClient(base_url=self.base, timeout=30) as client:
                job_ids, killed_jobs = await self.submit_and_kill(client, db)
                await self.check_jobs(client, job_ids)
            await self.check_records(db, job_ids, killed_jobs)
        finally:
            await db.dispose()

    async def submit_and_kill(
        self, client: httpx.AsyncClient, db: Database
    ) -> tuple[list[str], set[str]]:
        secret = await client.get("/v1/webhooks/secret", headers=self.headers)
        self.receiver.secret = secret.json()["secret"]
        job_ids = []
        for n in range(JOBS):
            body = {
                "model": "noop-video",
                "input": {"prompt": f"job {n}"},
                "webhook_url": self.hook,
            }
            response = await client.post("/v1/videos/generate", json=body, headers=self.headers)
            assert response.status_code == 202, response.text
            job_ids.append(response.json()["jobId"])

        # Kill worker A while it holds running jobs.
        killed_jobs: set[str] = set()

        async def worker_a_is_running_jobs() -> bool:
            async with db.session() as session:
                rows = (await session.scalars(select(Job))).all()
            killed_jobs.update(
                row.id
                for row in rows
                if row.state == "processing" and pid_of(row.worker_id) == self.worker_a.pid
            )
            return bool(killed_jobs)

        await eventually(worker_a_is_running_jobs, seconds=30)
        os.kill(self.worker_a.pid, signal.SIGKILL)
        return job_ids, killed_jobs

    async def check_jobs(self, client: httpx.AsyncClient, job_ids: list[str]) -> None:
        finished = await wait_until_finished(client, job_ids, self.headers, seconds=120)
        assert {job["status"] for job in finished.values()} == {"completed"}, finished
        for job in finished.values():
            download = await client.get(job["outputUrl"])
            assert download.status_code == 200
            assert download.content[4:8] == b"ftyp"

        async def every_job_delivered() -> bool:
            return len({r["id"] for r in self.receiver.received}) >= JOBS

        await eventually(every_job_delivered, seconds=30)
        await asyncio.sleep(1)  # a duplicate run would deliver again meanwhile

    async def check_records(self, db: Database, job_ids: list[str], killed_jobs: set[str]) -> None:
        async with db.session() as session:
            rows = {row.id: row for row in (await session.scalars(select(Job))).all()}
            deliveries = (await session.scalars(select(WebhookDelivery))).all()
        # The killed worker's jobs were taken over by worker B, on a later attempt.
        for job_id in killed_jobs:
            assert rows[job_id].attempts >= 2
            assert pid_of(rows[job_id].worker_id) == self.worker_b.pid
        # Webhooks: one delivery row, and one distinct verified webhook-id, per job.
        assert sorted(d.job_id for d in deliveries) == sorted(job_ids)
        assert all(d.state == "delivered" for d in deliveries)
        assert all(r["ok"] for r in self.receiver.received)
        ids_by_job: dict[str, set[str]] = {}
        for received in self.receiver.received:
            assert received["payload"]["status"] == "completed"
            ids_by_job.setdefault(received["payload"]["jobId"], set()).add(received["id"])
        assert {job: len(ids) for job, ids in ids_by_job.items()} == dict.fromkeys(job_ids, 1)

        # Ledger: one debit per job, no refund, entries sum to the balance.
        account_id = rows[job_ids[0]].account_id
        entries = await ledger.entries(db, account_id, limit=100)
        assert [e.kind for e in entries].count("debit") == JOBS
        assert not [e for e in entries if e.kind == "refund"]
        balance = await ledger.balance(db, account_id)
        assert balance == 100 - JOBS
        assert await ledger.ledger_sum(db, account_id) == balance
