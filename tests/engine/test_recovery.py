"""What a restarted in-process server does with the jobs an earlier process left behind: a
job whose worker's lease ran out is re-run while attempts remain and failed + refunded once
when they are used up; a job still queued is run."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hypereal.domain import jobs, keys, ledger
from tests.fakes_jobs import job_app, job_services, job_settings, ledger_kinds


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
