"""Cancel, failure, timeout and per-model concurrency, seen through the API and the ledger."""

from __future__ import annotations

from pathlib import Path

from hypereal.domain import ledger
from tests.support.jobs import CALLS, JobEnv, job_app, ledger_kinds
from tests.support.polling import eventually


async def _submit(env: JobEnv, headers: dict[str, str], model: str) -> str:
    response = await env.client.post(
        "/v1/videos/generate", json={"model": model, "input": {"prompt": "p"}}, headers=headers
    )
    assert response.status_code == 202, response.text
    job_id: str = response.json()["jobId"]
    return job_id


async def test_cancel_stops_running_work_and_refunds_once(tmp_path: Path) -> None:
    async with job_app(tmp_path) as env:
        account, headers = await env.new_key(credits=50)
        job_id = await _submit(env, headers, "test-hang")
        running = await env.wait_for(job_id, headers, stage="running")
        assert running["status"] == "processing"
        assert await ledger.balance(env.services.db, account) == 40

        canceled = await env.client.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
        assert canceled.status_code == 200
        assert canceled.json()["status"] == "canceled" and canceled.json()["creditsUsed"] == 0

        async def work_cancelled() -> bool:
            return CALLS.calls[0].cancelled

        await eventually(work_cancelled)
        again = await env.client.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
        assert again.status_code == 200 and again.json()["status"] == "canceled"

        assert await ledger.balance(env.services.db, account) == 50
        assert await ledger_kinds(env.services, account) == ["grant", "debit", "refund"]
        assert await ledger.ledger_sum(env.services.db, account) == 50
        job = (await env.client.get(f"/v1/jobs/{job_id}", headers=headers)).json()
        assert job["stage"] == "canceled" and job["outputUrl"] is None


async def test_cancel_of_a_queued_job_refunds_and_a_finished_job_is_409(tmp_path: Path) -> None:
    async with job_app(tmp_path) as env:
        account, headers = await env.new_key(credits=10)
        # concurrency 1, and the first runs until the gate opens: the second stays queued.
        first = await _submit(env, headers, "test-gated")
        second = await _submit(env, headers, "test-gated")
        await env.wait_for(first, headers, stage="running")
        queued = (await env.client.get(f"/v1/jobs/{second}", headers=headers)).json()
        assert queued["stage"] == "queued" and queued["status"] == "processing"
        canceled = await env.client.post(f"/v1/jobs/{second}/cancel", headers=headers)
        assert canceled.json()["status"] == "canceled"
        CALLS.gate.set()
        assert (await env.wait_for(first, headers))["status"] == "completed"
        finished = await env.client.post(f"/v1/jobs/{first}/cancel", headers=headers)
        assert finished.status_code == 409
        assert finished.json() == {"error": "Job is already completed and cannot be canceled"}
        assert await ledger.balance(env.services.db, account) == 9
        assert len(CALLS.calls) == 1  # the canceled job never ran


async def test_a_model_without_its_own_limit_runs_as_many_as_its_backend_allows(
    tmp_path: Path,
) -> None:
    async with job_app(tmp_path) as env:
        _, headers = await env.new_key(credits=10)
        ids = [await _submit(env, headers, "test-gated-wide") for _ in range(4)]  # backend: 3

        async def three_running() -> bool:
            return CALLS.running == 3

        await eventually(three_running)

        async def stages() -> list[str]:
            return [
                (await env.client.get(f"/v1/jobs/{i}", headers=headers)).json()["stage"]
                for i in ids
            ]

        assert sorted(await stages()) == ["queued", "running", "running", "running"]
        CALLS.gate.set()
        for job_id in ids:
            assert (await env.wait_for(job_id, headers))["status"] == "completed"
        assert CALLS.max_running == 3 and len(CALLS.calls) == 4


async def test_backend_failure_fails_the_job_and_refunds_exactly_once(tmp_path: Path) -> None:
    async with job_app(tmp_path) as env:
        account, headers = await env.new_key(credits=30)
        failing = await _submit(env, headers, "test-fail")
        crashing = await _submit(env, headers, "test-crash")
        failed = await env.wait_for(failing, headers)
        assert failed["status"] == "failed" and failed["creditsUsed"] == 0
        assert failed["error"] == "Generation failed: the fake backend was told to fail"
        crashed = await env.wait_for(crashing, headers)
        assert crashed["error"] == "Generation failed: internal error (RuntimeError)"
        # A maintenance pass (the refund reconciler) must not refund again.
        await env.engine.maintain()
        assert await ledger.balance(env.services.db, account) == 30
        kinds = await ledger_kinds(env.services, account)
        assert kinds.count("refund") == 2 and kinds.count("debit") == 2


async def test_a_job_past_its_timeout_fails_and_is_refunded(tmp_path: Path) -> None:
    async with job_app(tmp_path) as env:
        account, headers = await env.new_key(credits=10)
        job_id = await _submit(env, headers, "test-timeout")  # timeout_seconds = 1
        job = await env.wait_for(job_id, headers)
        assert job["status"] == "failed"
        assert job["error"] == "Generation timed out after 1 seconds"
        assert CALLS.calls[0].cancelled
        assert await ledger.balance(env.services.db, account) == 10


async def test_model_concurrency_limit_holds_and_every_job_completes(tmp_path: Path) -> None:
    async with job_app(tmp_path) as env:
        _, headers = await env.new_key(credits=10)
        ids = [await _submit(env, headers, "test-slow") for _ in range(3)]
        for job_id in ids:
            assert (await env.wait_for(job_id, headers))["status"] == "completed"
        assert CALLS.max_running == 1 and len(CALLS.calls) == 3
