"""What a restarted in-process server does with the jobs an earlier process left behind: a
job whose worker's lease ran out is re-run while attempts remain and failed + refunded once
when they are used up; a job still queued is run. And the same give-up in a running server's
maintenance pass, with the job's ``failed`` webhook."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hypereal.domain import jobs, keys, ledger
from hypereal.engine.engine import LOST_WORKER_ERROR
from tests.fakes_jobs import eventually, job_app, job_services, job_settings, ledger_kinds
from tests.webhooks.test_delivery import PRIVATE_OK, Receiver, receiving


async def _leave_jobs_behind(tmp_path: Path) -> tuple[str, str, str, str]:
    """A previous server's state: one job claimed by a worker that died (lease already run
    out), one queued job never started. Returns (account, API key, running id, queued id)."""
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
        running = await jobs.submit(services.db, new)
        queued = await jobs.submit(services.db, new)
        claim = await jobs.claim_job(
            services.db, running.id, "dead-host:1:abc", concurrency=1, lease_seconds=0.01
        )
        assert claim.outcome == "claimed"
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
        engine = env.services.engine
        assert engine is not None
        await engine.maintain()  # further sweeps change nothing
        await engine.maintain()
        assert await ledger.balance(env.services.db, account) == 7
        assert await ledger_kinds(env.services, account) == ["grant", "debit", "debit", "refund"]


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
            dead, alive = await jobs.submit(db, new), await jobs.submit(db, new)
            for job, lease in ((dead, 0.01), (alive, 3600.0)):
                claim = await jobs.claim_job(
                    db, job.id, "other-host:1:abc", concurrency=4, lease_seconds=lease
                )
                assert claim.outcome == "claimed"
            await asyncio.sleep(0.05)  # the dead worker's lease runs out
            engine = env.services.engine
            assert engine is not None
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
