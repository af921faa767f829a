"""What a restarted in-process server does with the jobs an earlier process left behind: a
job whose worker's lease ran out is re-run while attempts remain and failed + refunded once
when they are used up; a job still queued is run. An embedded server (no broker: the only
worker) takes back its predecessor's running jobs at start without waiting for their leases,
also after a real ``kill -9``; a worker of the distributed mode, or a live embedded server on
the same host, keeps its lease. And the same give-up in a running server's maintenance pass,
with the job's ``failed`` webhook."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx

from hypereal.domain import jobs, keys, ledger
from hypereal.engine.engine import LOST_WORKER_ERROR, Engine
from tests.engine.test_distributed import HYPEREAL, create_key, pid_of, process
from tests.support.jobs import job_app, job_services, job_settings, ledger_kinds
from tests.support.polling import eventually
from tests.support.servers import free_port
from tests.webhooks.test_delivery import PRIVATE_OK, Receiver, receiving


async def _leave_jobs_behind(
    tmp_path: Path, *, worker_id: str = "dead-host:1:abc", lease_seconds: float = 0.01
) -> tuple[str, str, str, str]:
    """A previous server's state: one job claimed by a worker that died (by default its lease
    already ran out), one queued job never started. Returns (account, API key, running id,
    queued id)."""
    services = job_services(job_settings(tmp_path))
    try:
        await services.migrate()
        account = await keys.create_account(services.db, "left-behind")
        await ledger.grant(services.db, account, 10, "test grant")
        secret = (await keys.create_key(services.db, account)).secret
        new = jobs.NewJob(
            account_id=account,
            type="video",
            model="test-video",
            input={"duration": 1},
            credits=3,
            media={},
        )
        running = (await jobs.submit(services.db, new)).job
        queued = (await jobs.submit(services.db, new)).job
        claim = await jobs.claim_job(
            services.db,
            running.id,
            new.model,
            worker_id,
            concurrency=1,
            lease_seconds=lease_seconds,
        )
        assert claim is not None and claim.worker_id == worker_id
        if lease_seconds < 1:
            await asyncio.sleep(0.05)  # the dead worker's lease runs out
        return account, secret, running.id, queued.id
    finally:
        await services.close()


async def test_restart_reruns_a_lost_job_and_runs_the_queued_one(tmp_path: Path) -> None:
    account, secret, running_id, queued_id = await _leave_jobs_behind(tmp_path)
    headers = {"Authorization": f"Bearer {secret}"}
    async with job_app(tmp_path, job_max_attempts=3) as env:
        for job_id in (running_id, queued_id):
            job = await env.wait_for(job_id, headers)
            assert job["status"] == "completed", job
            assert job["outputUrl"]
        assert await ledger.balance(env.services.db, account) == 4
        assert await ledger_kinds(env.services, account) == ["grant", "debit", "debit"]
        rerun = await jobs.load_job(env.services.db, running_id)
        assert rerun is not None and rerun.attempts == 2
        assert rerun.worker_id != "dead-host:1:abc"


async def test_a_lost_job_out_of_attempts_is_failed_and_refunded_once(tmp_path: Path) -> None:
    account, secret, running_id, queued_id = await _leave_jobs_behind(tmp_path)
    headers = {"Authorization": f"Bearer {secret}"}
    async with job_app(tmp_path, job_max_attempts=1) as env:
        failed = await env.wait_for(running_id, headers)
        assert failed["status"] == "failed"
        assert "lease expired" in failed["error"]
        assert (await env.wait_for(queued_id, headers))["status"] == "completed"
        engine = env.engine
        await engine.maintain()  # further sweeps change nothing
        await engine.maintain()
        assert await ledger.balance(env.services.db, account) == 7
        assert await ledger_kinds(env.services, account) == ["grant", "debit", "debit", "refund"]


async def test_an_embedded_restart_takes_back_running_jobs_before_their_leases_end(
    tmp_path: Path,
) -> None:
    # The predecessor's lease has an hour left; test-video has one slot, which it holds.
    account, secret, running_id, queued_id = await _leave_jobs_behind(tmp_path, lease_seconds=3600)
    headers = {"Authorization": f"Bearer {secret}"}
    async with job_app(tmp_path, job_max_attempts=3) as env:
        for job_id in (running_id, queued_id):
            job = await env.wait_for(job_id, headers)
            assert job["status"] == "completed", job
        rerun = await jobs.load_job(env.services.db, running_id)
        assert rerun is not None and rerun.attempts == 2
        assert rerun.worker_id == env.engine.worker_id
        assert await ledger_kinds(env.services, account) == ["grant", "debit", "debit"]


async def test_an_embedded_restart_fails_a_taken_back_job_out_of_attempts(
    tmp_path: Path,
) -> None:
    account, secret, running_id, _ = await _leave_jobs_behind(tmp_path, lease_seconds=3600)
    headers = {"Authorization": f"Bearer {secret}"}
    async with job_app(tmp_path, job_max_attempts=1) as env:
        failed = await env.wait_for(running_id, headers)
        assert failed["status"] == "failed"
        assert failed["error"] == LOST_WORKER_ERROR.format(attempts=1)
        assert await ledger_kinds(env.services, account) == ["grant", "debit", "debit", "refund"]


async def test_a_live_embedded_server_on_this_host_keeps_its_jobs(tmp_path: Path) -> None:
    """Two embedded servers may share one database: a restart of one leaves the jobs of the
    other, still running on this host, to their leases."""
    sibling = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(60)"
    )
    try:
        worker_id = f"{socket.gethostname()}:{sibling.pid}:abc"
        _, _, running_id, _ = await _leave_jobs_behind(
            tmp_path, worker_id=worker_id, lease_seconds=3600
        )
        async with job_app(tmp_path) as env:
            # The start-up pass has run (the lifespan starts the engine before this).
            job = await jobs.load_job(env.services.db, running_id)
            assert job is not None and job.state == "processing"
            assert job.worker_id == worker_id and job.attempts == 1
    finally:
        sibling.kill()
        await sibling.wait()


async def test_a_distributed_worker_respects_the_leases_of_others(tmp_path: Path) -> None:
    """With a broker (``hypereal worker`` processes) a worker's start takes nothing back: other
    workers may be running; a job is re-queued only once its lease runs out."""
    _, _, running_id, queued_id = await _leave_jobs_behind(tmp_path, lease_seconds=3600)
    services = job_services(job_settings(tmp_path, broker_url="redis://127.0.0.1:6379/0"))
    try:
        engine = Engine(services, consume=True)
        sent: list[tuple[str, str]] = []

        async def kick(job_id: str, model: str) -> None:  # instead of the broker
            sent.append((job_id, model))

        engine.kick = kick  # type: ignore[method-assign]
        await engine.maintain(startup=True)  # what a worker's start runs
        assert sent == [(queued_id, "test-video")]
        job = await jobs.load_job(services.db, running_id)
        assert job is not None and job.state == "processing"
        assert job.worker_id == "dead-host:1:abc" and job.attempts == 1
    finally:
        await services.close()


def test_a_sigkilled_embedded_server_restarts_running_its_jobs(tmp_path: Path) -> None:
    """A real ``hypereal serve`` (embedded: SQLite, in-process jobs) killed with SIGKILL while
    it runs a job of a one-slot model, another job waiting: the restarted server runs both,
    long before the dead process's 600-s lease would run out."""
    catalogue = tmp_path / "catalogue.toml"
    catalogue.write_text(
        '[[models]]\nslug = "one-slot-video"\nname = "One slot"\nmodality = "video"\n'
        "concurrency = 1\ntimeout_seconds = 600\nprice = { credits = 1 }\n"
        'params = [{ name = "prompt", type = "string" }]\nbindings = [{ backend = "noop" }]\n'
    )
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HYPEREAL_")},
        "HYPEREAL_DATA_DIR": str(tmp_path / "data"),
        "HYPEREAL_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "HYPEREAL_ENABLE_TEST_BACKENDS": "1",
        "HYPEREAL_BACKENDS": json.dumps({"noop": {"type": "noop", "delay_seconds": 2}}),
        "HYPEREAL_CATALOGUE_FILE": str(catalogue),
        "HYPEREAL_JOB_LEASE_SECONDS": "600",
        "HYPEREAL_ENGINE_POLL_SECONDS": "0.2",
        "HYPEREAL_BOOTSTRAP_ADMIN": "false",
        "HYPEREAL_RATE_LIMIT_PER_HOUR": "1000000",  # room for the polling
    }
    serve = [HYPEREAL, "serve", "--host", "127.0.0.1", "--port", str(port)]
    subprocess.run([HYPEREAL, "migrate"], env=env, check=True, capture_output=True)
    headers = {"Authorization": f"Bearer {create_key(env, credits=10)}"}
    base = f"http://127.0.0.1:{port}"

    def healthy(proc: subprocess.Popen[bytes]) -> None:
        async def up() -> bool:
            assert proc.poll() is None, "the server exited"
            try:
                async with httpx.AsyncClient() as client:
                    return (await client.get(f"{base}/health")).status_code == 200
            except httpx.TransportError:
                return False

        asyncio.run(eventually(up, seconds=30))

    async def submit_and_wait_running() -> list[str]:
        async with httpx.AsyncClient(base_url=base, headers=headers) as client:
            ids = []
            for n in range(2):
                body = {"model": "one-slot-video", "input": {"prompt": f"job {n}"}}
                response = await client.post("/v1/videos/generate", json=body)
                assert response.status_code == 202, response.text
                ids.append(response.json()["jobId"])

            async def one_running() -> bool:
                stages = [(await client.get(f"/v1/jobs/{i}")).json()["stage"] for i in ids]
                return "running" in stages

            await eventually(one_running)
            return ids

    async def wait_finished(ids: list[str]) -> list[dict[str, object]]:
        async with httpx.AsyncClient(base_url=base, headers=headers) as client:
            finished: dict[str, dict[str, object]] = {}

            async def all_finished() -> bool:
                for job_id in ids:
                    response = await client.get(f"/v1/jobs/{job_id}")
                    assert response.status_code == 200, response.text
                    job = response.json()
                    if job["status"] != "processing":
                        finished[job_id] = job
                return len(finished) == len(ids)

            # Far less than the 600-s lease the dead process left on its job.
            await eventually(all_finished, seconds=60)
            return [finished[i] for i in ids]

    def running_jobs_by_pid() -> dict[str, int | None]:
        with sqlite3.connect(tmp_path / "data" / "hypereal.db") as db:
            rows = db.execute("SELECT id, worker_id FROM jobs WHERE state = 'processing'")
            return {job_id: pid_of(worker) for job_id, worker in rows}

    with process(serve, env, tmp_path / "first.log") as first:
        healthy(first)
        ids = asyncio.run(submit_and_wait_running())
        killed = running_jobs_by_pid()
        assert list(killed.values()) == [first.pid]
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    with process(serve, env, tmp_path / "second.log") as second:
        healthy(second)
        finished = asyncio.run(wait_finished(ids))
        assert [job["status"] for job in finished] == ["completed", "completed"], finished
    with sqlite3.connect(tmp_path / "data" / "hypereal.db") as db:
        (killed_id,) = killed
        attempts, worker = db.execute(
            "SELECT attempts, worker_id FROM jobs WHERE id = ?", (killed_id,)
        ).fetchone()
    assert attempts == 2 and pid_of(worker) == second.pid


async def test_the_sweep_fails_a_dead_workers_job_once_with_its_webhook(tmp_path: Path) -> None:
    """A running app, another worker that claimed two jobs: one still renews its lease, the
    other died. With no attempts left, ``Engine.maintain`` fails the dead one (fail_expired),
    refunds it once and sends its signed ``failed`` webhook; the live one is left alone."""
    receiver = Receiver()
    with receiving(receiver) as url:
        # The background sweep is held off so that the test drives each pass itself.
        async with job_app(
            tmp_path, job_max_attempts=1, engine_poll_seconds=3600, **PRIVATE_OK
        ) as env:
            db = env.services.db
            account, headers = await env.new_key(10)
            secret = (await env.client.get("/v1/webhooks/secret", headers=headers)).json()
            receiver.secret = secret["secret"]
            new = jobs.NewJob(
                account_id=account,
                type="video",
                model="test-video",
                input={"duration": 1},
                credits=3,
                media={},
                webhook_url=url,
            )
            # Not put on the queue: the other worker takes them straight from the database.
            dead, alive = (await jobs.submit(db, new)).job, (await jobs.submit(db, new)).job
            for job, lease in ((dead, 0.01), (alive, 3600.0)):
                claim = await jobs.claim_job(
                    db, job.id, new.model, "other-host:1:abc", concurrency=4, lease_seconds=lease
                )
                assert claim is not None
            await asyncio.sleep(0.05)  # the dead worker's lease runs out
            engine = env.engine
            await engine.maintain()

            failed = (await env.client.get(f"/v1/jobs/{dead.id}", headers=headers)).json()
            assert failed["status"] == failed["stage"] == "failed"
            assert failed["error"] == LOST_WORKER_ERROR.format(attempts=1)
            assert failed["creditsUsed"] == 0
            still = (await env.client.get(f"/v1/jobs/{alive.id}", headers=headers)).json()
            assert (still["status"], still["stage"]) == ("processing", "running")

            async def delivered() -> bool:
                listed = await env.client.get(f"/v1/jobs/{dead.id}/deliveries", headers=headers)
                data = listed.json()["data"]
                return bool(data) and data[0]["status"] == "delivered"

            await eventually(delivered)
            await engine.maintain()  # later passes neither refund nor notify again
            await engine.maintain()
            assert await ledger.balance(db, account) == 10 - 3
            kinds = await ledger_kinds(env.services, account)
            assert kinds == ["grant", "debit", "debit", "refund"]
            deliveries = await env.client.get(f"/v1/jobs/{dead.id}/deliveries", headers=headers)
            (delivery,) = deliveries.json()["data"]
            assert delivery["event"] == "job.failed" and delivery["attempts"] == 1
            alive_deliveries = await env.client.get(
                f"/v1/jobs/{alive.id}/deliveries", headers=headers
            )
            assert alive_deliveries.json()["data"] == []

    (received,) = receiver.received
    assert received["ok"] and received["id"] == delivery["id"]
    assert received["payload"] == {
        "status": "failed",
        "outputUrl": None,
        "jobId": dead.id,
        "type": "video",
        "model": "test-video",
        "creditsUsed": 0,
        "error": LOST_WORKER_ERROR.format(attempts=1),
    }
