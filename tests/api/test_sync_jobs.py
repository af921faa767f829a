"""Synchronous answers (catalogue ``response = "sync"``) and ``Prefer: wait=N`` on job routes:
the submission waits for the job and answers 200 with the result; past the window, 202."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from hypereal.domain import jobs, ledger
from hypereal.domain.catalogue import parse_catalogue
from hypereal.engine.waiters import JobWaiters
from tests.support.jobs import CALLS, TEST_CATALOGUE, job_app
from tests.support.polling import eventually
from tests.support.servers import serve_app

SYNC_MODELS = """
[[models]]
slug = "sync-tts"
name = "Synchronous speech"
modality = "audio"
response = "sync"
sync_seconds = 30
price = { credits = 3 }
concurrency = 4
params = [{ name = "text", type = "string", required = true }]
bindings = [{ backend = "fake-ok" }]

[[models]]
slug = "sync-gated"
name = "Synchronous, runs until the gate opens"
modality = "3d"
response = "sync"
sync_seconds = 0.3
price = { credits = 2 }
params = [{ name = "prompt", type = "string" }]
bindings = [{ backend = "fake-gated" }]

[[models]]
slug = "sync-fail"
name = "Synchronous, fails"
modality = "audio"
response = "sync"
price = { credits = 4 }
params = [{ name = "text", type = "string" }]
bindings = [{ backend = "fake-fail" }]
"""


async def until_waiting(waiters: JobWaiters) -> None:
    """Until a request waits for its job (checked every 10 ms, 20 s at most)."""
    async with asyncio.timeout(20):
        while not waiters.waiting:  # noqa: ASYNC110 - nothing to wait on but the count
            await asyncio.sleep(0.01)


def catalogue(tmp_path: Path) -> Path:
    path = tmp_path / "sync-catalogue.toml"
    path.write_text(TEST_CATALOGUE + SYNC_MODELS)
    return path


async def test_a_sync_model_answers_200_with_the_result_everywhere_clients_read_it(
    tmp_path: Path,
) -> None:
    async with job_app(tmp_path, catalogue_file=catalogue(tmp_path)) as env:
        account, headers = await env.new_key(credits=10)
        body = {"model": "sync-tts", "input": {"text": "hello there"}}
        response = await env.client.post("/v1/audio/generate", json=body, headers=headers)
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        url = answer["outputUrl"]
        assert url.startswith("http://testserver/files/")
        assert answer["success"] is True and answer["status"] == "completed"
        assert answer["url"] == url and answer["output"] == {"url": url}
        assert answer["data"] == [{"url": url, "model": "sync-tts"}]
        assert answer["creditsUsed"] == 3 and answer["type"] == "audio"
        assert answer["text"] == "hello there"  # a transcript-like result is inline
        assert await ledger.balance(env.services.db, account) == 7
        download = await env.client.get(url.removeprefix("http://testserver"))
        assert download.headers["content-type"] == "audio/wav"

        # Still a job: pollable and listed.
        job = (await env.client.get(f"/v1/jobs/{answer['jobId']}", headers=headers)).json()
        assert job["status"] == "completed" and job["outputUrl"] == url
        listed = (await env.client.get("/v1/jobs", headers=headers)).json()["data"]
        assert [j["jobId"] for j in listed] == [answer["jobId"]]
        # The catalogue says which models answer synchronously.
        model = (await env.client.get("/v1/models/sync-tts", headers=headers)).json()
        assert model["response"] == {"mode": "sync", "syncSeconds": 30.0}
        video = (await env.client.get("/v1/models/test-video", headers=headers)).json()
        assert "response" not in video


async def test_past_the_sync_window_the_answer_is_202_and_the_job_goes_on(tmp_path: Path) -> None:
    async with job_app(tmp_path, catalogue_file=catalogue(tmp_path)) as env:
        _, headers = await env.new_key(credits=10)
        body = {"model": "sync-gated", "input": {"prompt": "a cube"}}
        response = await env.client.post("/v1/3d/generate", json=body, headers=headers)
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "processing"
        assert env.engine.waiters.waiting == 0  # nobody left waiting
        CALLS.gate.set()
        job = await env.wait_for(response.json()["jobId"], headers)
        assert job["status"] == "completed"


async def test_a_failed_sync_job_answers_its_error_and_is_refunded(tmp_path: Path) -> None:
    async with job_app(tmp_path, catalogue_file=catalogue(tmp_path)) as env:
        account, headers = await env.new_key(credits=10)
        body = {"model": "sync-fail", "input": {"text": "x"}}
        response = await env.client.post("/api/v1/audio/generate", json=body, headers=headers)
        assert response.status_code == 500, response.text
        answer = response.json()
        assert answer["error"] == "Generation failed: the fake backend was told to fail"
        assert answer["status"] == "failed" and answer["success"] is False
        assert answer["creditsUsed"] == 0
        assert await ledger.balance(env.services.db, account) == 10
        job = (await env.client.get(f"/v1/jobs/{answer['jobId']}", headers=headers)).json()
        assert job["status"] == "failed"


async def test_prefer_wait_makes_any_job_route_wait(tmp_path: Path) -> None:
    async with job_app(tmp_path, catalogue_file=catalogue(tmp_path)) as env:
        _, headers = await env.new_key(credits=100)
        body = {"model": "test-video", "input": {"prompt": "pan", "duration": 2}}
        response = await env.client.post(
            "/v1/videos/generate", json=body, headers={**headers, "Prefer": "wait=30"}
        )
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "completed" and response.json()["success"] is True

        # Past N seconds: the usual 202.
        gated = {"model": "test-gated", "input": {"prompt": "x"}}
        response = await env.client.post(
            "/v1/videos/generate", json=gated, headers={**headers, "Prefer": "wait=0.2"}
        )
        assert response.status_code == 202, response.text
        CALLS.gate.set()
        assert (await env.wait_for(response.json()["jobId"], headers))["status"] == "completed"

        # wait=0 on a sync model: no wait at all.
        response = await env.client.post(
            "/v1/audio/generate",
            json={"model": "sync-tts", "input": {"text": "hi"}},
            headers={**headers, "Prefer": "respond-async, wait=0"},
        )
        assert response.status_code == 202, response.text


async def test_the_waiter_is_woken_by_the_engine_not_by_polling(tmp_path: Path) -> None:
    """With the database re-check an hour apart, only the engine's notice can answer."""
    async with job_app(tmp_path, catalogue_file=catalogue(tmp_path)) as env:
        _, headers = await env.new_key(credits=10)
        waiters = env.engine.waiters
        waiters.recheck_seconds = 3600
        body = {"model": "test-gated", "input": {"prompt": "x"}}
        request = asyncio.ensure_future(
            env.client.post(
                "/v1/videos/generate", json=body, headers={**headers, "Prefer": "wait=60"}
            )
        )
        await until_waiting(waiters)
        CALLS.gate.set()
        response = await request
        assert response.status_code == 200 and response.json()["status"] == "completed"


async def test_a_job_ended_elsewhere_is_seen_by_the_slow_recheck(tmp_path: Path) -> None:
    """A job ended by another process (no notice here) is found by re-reading its row."""
    async with job_app(tmp_path, catalogue_file=catalogue(tmp_path)) as env:
        _, headers = await env.new_key(credits=10)
        waiters = env.engine.waiters
        waiters.recheck_seconds = 0.05
        body = {"model": "test-gated", "input": {"prompt": "x"}}
        request = asyncio.ensure_future(
            env.client.post(
                "/v1/videos/generate", json=body, headers={**headers, "Prefer": "wait=60"}
            )
        )
        await until_waiting(waiters)
        (job_id,) = list(waiters._waiting)
        # Ended straight in the database, as another process would: the engine is not told.
        assert await jobs.fail_job(env.services.db, job_id, "ended elsewhere") is not None
        response = await request
        assert response.status_code == 500 and response.json()["error"] == "ended elsewhere"
        CALLS.gate.set()


async def test_a_poll_with_prefer_wait_is_held_until_the_job_ends(tmp_path: Path) -> None:
    async with job_app(tmp_path, catalogue_file=catalogue(tmp_path)) as env:
        _, headers = await env.new_key(credits=10)
        body = {"model": "test-gated", "input": {"prompt": "x"}}
        response = await env.client.post("/v1/videos/generate", json=body, headers=headers)
        assert response.status_code == 202
        job_id = response.json()["jobId"]
        waiters = env.engine.waiters
        waiters.recheck_seconds = 3600  # only the engine's notice can answer the poll
        poll = asyncio.ensure_future(
            env.client.get(f"/v1/jobs/{job_id}", headers={**headers, "Prefer": "wait=60"})
        )
        await until_waiting(waiters)
        CALLS.gate.set()
        assert (await poll).json()["status"] == "completed"
        # Without the header a poll answers at once, as before.
        gated = await env.client.post("/v1/videos/generate", json=body, headers=headers)
        CALLS.gate.clear()
        job = await env.client.get(f"/v1/jobs/{gated.json()['jobId']}", headers=headers)
        assert job.status_code == 200


async def test_a_sync_job_still_sends_its_webhook(tmp_path: Path) -> None:
    received: list[dict[str, Any]] = []

    async def hook(request: Request) -> Response:
        received.append(await request.json())
        return Response(status_code=204)

    receiver = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    with serve_app(receiver) as url:
        async with job_app(
            tmp_path,
            catalogue_file=catalogue(tmp_path),
            allowed_private_networks=["127.0.0.0/8"],
        ) as env:
            _, headers = await env.new_key(credits=10)
            body = {"model": "sync-tts", "input": {"text": "hi"}, "webhook_url": f"{url}/hook"}
            response = await env.client.post("/v1/audio/generate", json=body, headers=headers)
            assert response.status_code == 200, response.text
            job_id = response.json()["jobId"]
            await eventually(lambda: _delivered(received))
            assert received[0]["jobId"] == job_id and received[0]["status"] == "completed"


async def _delivered(received: list[dict[str, Any]]) -> bool:
    return bool(received)


def test_the_catalogue_refuses_a_bad_response_setting() -> None:
    base = {"modality": "audio", "price": {"credits": 1}}
    with pytest.raises(ValueError, match="response must be one of"):
        parse_catalogue({"models": [{"slug": "x", **base, "response": "soon"}]})
    with pytest.raises(ValueError, match="sync_seconds"):
        parse_catalogue({"models": [{"slug": "x", **base, "response": "sync", "sync_seconds": -1}]})
    with pytest.raises(ValueError, match="job models only"):
        chat = {"slug": "c", "modality": "chat", "price": {"credits": 1}, "response": "sync"}
        parse_catalogue({"models": [chat]})
    spec = parse_catalogue({"models": [{"slug": "x", **base, "response": "sync"}]}).models["x"]
    assert spec.sync and spec.sync_seconds == 120.0
