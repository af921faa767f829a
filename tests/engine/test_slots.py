"""The engine's slot accounting on its own (a JobRunner on a real SQLite database, no HTTP, no
queue): a model runs at most its slot count of jobs at once, the jobs over it wait queued,
and each job that ends hands its slot to the oldest queued job of its model, which the
ending job's run claims in the end's transaction and runs next."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hypereal.domain import jobs, keys, ledger
from hypereal.engine.engine import Engine
from hypereal.engine.runner import JobRunner
from hypereal.services import Services
from tests.support.jobs import CALLS, job_services, job_settings
from tests.support.polling import eventually


@pytest.fixture
async def services(tmp_path: Path) -> AsyncIterator[Services]:
    built = job_services(job_settings(tmp_path))
    await built.migrate()
    CALLS.calls.clear()
    CALLS.running = CALLS.max_running = 0
    CALLS.gate = asyncio.Event()
    yield built
    CALLS.gate.set()
    await built.close()


async def submit(services: Services, account_id: str, model: str) -> str:
    submitted = await jobs.submit(
        services.db,
        jobs.NewJob(
            account_id=account_id,
            type="video",
            model=model,
            input={"prompt": "x"},
            credits=1,
            media={},
        ),
    )
    return submitted.job.id


async def test_slots_come_from_the_catalogue_else_the_backend(services: Services) -> None:
    runner = JobRunner(services, on_end=lambda ended: asyncio.sleep(0))
    catalogue = services.catalogue
    assert runner.concurrency(catalogue.models["test-gated"]) == 1  # the catalogue's
    assert runner.concurrency(catalogue.models["test-gated-wide"]) == 3  # its backend's


async def test_a_model_runs_at_most_its_slots_and_an_end_hands_its_slot_on(
    services: Services,
) -> None:
    ended: list[jobs.Ended] = []

    async def on_end(end: jobs.Ended) -> None:
        ended.append(end)

    runner = JobRunner(services, on_end, worker_id="w-slots")
    account = await keys.create_account(services.db, "slots")
    await ledger.grant(services.db, account, 10)
    ids = [await submit(services, account, "test-gated-wide") for _ in range(5)]

    runs = [asyncio.create_task(runner.run(job_id, "test-gated-wide")) for job_id in ids]

    async def three_running_two_waiting() -> bool:
        return CALLS.running == 3 and sum(run.done() for run in runs) == 2

    await eventually(three_running_two_waiting)
    states = {job_id: (await jobs.load_job(services.db, job_id)) for job_id in ids}
    running = [i for i, job in states.items() if job is not None and job.state == "processing"]
    waiting = [i for i, job in states.items() if job is not None and job.state == "queued"]
    assert len(running) == 3 and len(waiting) == 2

    CALLS.gate.set()  # the three running jobs finish, and their runs take the waiting two
    await asyncio.gather(*runs)
    assert sorted(e.job.id for e in ended) == sorted(ids)
    assert [e.next_job_id for e in ended] == [None] * 5  # no message: the enders took them
    taken = [e.taken for e in ended if e.taken is not None]
    # Each waiting job was claimed once, by an ending job's run, in the slot it freed.
    assert sorted(job.id for job in taken) == sorted(waiting)
    assert all((job.state, job.worker_id) == ("processing", "w-slots") for job in taken)
    for job_id in ids:
        job = await jobs.load_job(services.db, job_id)
        assert job is not None and job.state == "completed" and job.attempts == 1
    assert CALLS.max_running == 3
    assert await ledger.balance(services.db, account) == 5  # five jobs charged, none twice


async def test_in_process_the_message_of_a_job_an_end_took_claims_nothing(
    services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process, every queue message is the engine's: the message of a job that an end
    took (it ran in the freed slot) is dropped with no claim, while a job sent again (a
    re-queue) is forgotten as taken, so its message runs."""
    engine = Engine(services, consume=False)  # the in-process queue, no consumers started
    runner = engine.runner
    assert runner.taken is not None
    claims: list[str] = []
    claim_job = jobs.claim_job

    async def counted(db: Any, job_id: str, *args: Any, **kwargs: Any) -> Any:
        claims.append(job_id)
        return await claim_job(db, job_id, *args, **kwargs)

    monkeypatch.setattr(jobs, "claim_job", counted)
    account = await keys.create_account(services.db, "taken")
    await ledger.grant(services.db, account, 10)
    ids = [await submit(services, account, "test-gated") for _ in range(3)]  # one slot
    first = asyncio.create_task(runner.run(ids[0], "test-gated"))
    await eventually(lambda: CALLS.running == 1)
    for job_id in ids[1:]:
        await runner.run(job_id, "test-gated")  # the model is busy: both wait queued
    CALLS.gate.set()
    await first  # its run took and ran the other two
    assert list(runner.taken) == ids[1:]
    for job_id in ids[1:]:
        await runner.run(job_id, "test-gated")  # their messages, late
    assert claims == ids  # one claim each, none for the late messages
    assert not runner.taken
    runner.taken[ids[0]] = None
    await engine.kick(ids[0], "test-gated")  # sent again: no longer known as taken
    assert ids[0] not in runner.taken
    assert engine.queue is not None and engine.queue.get_nowait() == (ids[0], "test-gated")
