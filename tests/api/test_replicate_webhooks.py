"""Replicate's webhooks, received by hypereal itself at ``POST /webhooks/upstream/<backend>``.

End to end over real HTTP on 127.0.0.1: our server (in-process jobs) and the fake Replicate,
whose predictions finish by themselves and then POST their signed webhook to us. The backend
polls only once an hour here, so a job that completes at all was woken by the webhook.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from hypereal.app import create_app
from hypereal.backends.base import BackendUnavailable
from hypereal.backends.replicate import ReplicatePredictions
from hypereal.domain import keys, ledger
from hypereal.services import build_services
from hypereal.settings import Settings
from tests.support.jobs import wav_data_uri
from tests.support.replicate_server import ReplicateFake, ReplicateScenario
from tests.support.servers import free_port, serve_app

TOKEN = "r8_test_token"
HOUR = 3600.0


@pytest.fixture
def fake() -> Iterator[tuple[ReplicateFake, str]]:
    replicate = ReplicateFake(api_key=TOKEN)
    replicate.set_scenario("x-lance/f5-tts", ReplicateScenario(output="audio", finish_after=0.3))
    with serve_app(replicate.app) as url:
        yield replicate, url


def settings_for(tmp_path: Path, replicate_url: str, port: int, **options: Any) -> Settings:
    public = f"http://127.0.0.1:{port}"
    backend = {
        "type": "replicate",
        "api_key": TOKEN,
        "base_url": f"{replicate_url}/v1",
        "poll_interval": HOUR,
        "retry_backoff": 0,
        "webhook_url": f"{public}/webhooks/upstream/replicate",
        **options,
    }
    return Settings(
        data_dir=tmp_path / "data",
        bootstrap_admin=False,
        public_url=public,
        allowed_private_networks=["127.0.0.0/8"],  # the voice sample is a data: URI anyway
        backends={"replicate": backend},
    )


def signed(secret: str, body: str, message_id: str) -> dict[str, str]:
    """Standard Webhooks headers for ``body``, as Replicate sends them."""
    now = datetime.now(UTC)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(message_id, now, body),
    }


async def new_key(settings: Settings, credits: int) -> tuple[dict[str, str], str]:
    """An account and key, made before the server starts (its own loop owns its engine)."""
    services = build_services(settings)
    try:
        await services.migrate()
        account = await keys.create_account(services.db, "replicate-webhooks")
        await ledger.grant(services.db, account, credits)
        secret = (await keys.create_key(services.db, account)).secret
    finally:
        await services.close()
    return {"Authorization": f"Bearer {secret}"}, account


async def wait_job(client: httpx.AsyncClient, job_id: str, headers: dict[str, str]) -> Any:
    async with asyncio.timeout(30):
        while True:
            job = (await client.get(f"/v1/jobs/{job_id}", headers=headers)).json()
            if job["status"] != "processing":
                return job
            await asyncio.sleep(0.05)


async def test_a_signed_webhook_ends_the_poll_wait_and_the_job_completes(
    tmp_path: Path, fake: tuple[ReplicateFake, str]
) -> None:
    replicate, replicate_url = fake
    port = free_port()
    settings = settings_for(tmp_path, replicate_url, port, webhook_secret=replicate.webhook_secret)
    headers, account = await new_key(settings, credits=200)
    with serve_app(create_app(settings), port=port) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            submitted = await client.post(
                "/v1/audio/generate",
                headers=headers,
                json={
                    "model": "audio-voice-clone",
                    "input": {"text": "hello there", "audio": wav_data_uri()},
                },
            )
            assert submitted.status_code == 202, submitted.text
            job = await wait_job(client, submitted.json()["jobId"], headers)
            assert job["status"] == "completed", job
            audio = await client.get(job["outputUrl"])
            assert audio.headers["content-type"] == "audio/wav"
            assert audio.content[:4] == b"RIFF"
    created = replicate.creations[0].body
    assert created["webhook"] == f"http://127.0.0.1:{port}/webhooks/upstream/replicate"
    assert created["webhook_events_filter"] == ["completed"]
    assert [d.status_code for d in replicate.deliveries] == [200]
    assert replicate.polls == 1  # woken once, read once: the webhook, not the hourly poll
    services = build_services(settings)
    try:
        assert await ledger.balance(services.db, account) == 200 - 107  # charged once
    finally:
        await services.close()


async def test_the_receiver_refuses_unsigned_deliveries_and_unknown_backends(
    tmp_path: Path, fake: tuple[ReplicateFake, str]
) -> None:
    replicate, replicate_url = fake
    settings = settings_for(tmp_path, replicate_url, 9, webhook_secret=replicate.webhook_secret)
    app = create_app(settings)
    body = json.dumps({"id": "p1", "status": "succeeded"})
    headers = signed(replicate.webhook_secret, body, "msg_1")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            ok = await client.post("/webhooks/upstream/replicate", content=body, headers=headers)
            assert ok.status_code == 200
            assert ok.json() == {"received": True, "waiting": False}  # no poll of ours

            tampered = await client.post(
                "/webhooks/upstream/replicate",
                content=body.replace("succeeded", "failed"),
                headers=headers,
            )
            assert tampered.status_code == 400
            assert tampered.json()["error"].startswith("Webhook rejected")

            unsigned = await client.post("/webhooks/upstream/replicate", content=body)
            assert unsigned.status_code == 400

            for name in ("nope", "local-tts"):  # unknown; a backend that takes no webhooks
                missing = await client.post(f"/webhooks/upstream/{name}", content=body)
                assert missing.status_code == 404
                assert missing.json() == {"error": f"No backend named '{name}' receives webhooks"}


async def test_a_replicate_backend_without_a_secret_does_not_receive(
    tmp_path: Path, fake: tuple[ReplicateFake, str]
) -> None:
    _, replicate_url = fake
    app = create_app(settings_for(tmp_path, replicate_url, 9))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            response = await client.post("/webhooks/upstream/replicate", content=b"{}")
    assert response.status_code == 404
    assert "has no `webhook_secret`" in response.json()["error"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"webhook_secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}, "needs `webhook_url`"),
        (
            {"webhook_secret": "whsec_%%%", "webhook_url": "http://127.0.0.1:9/w"},
            "not a valid whsec_",
        ),
        ({"webhook_secret": 5, "webhook_url": "http://127.0.0.1:9/w"}, "must be a whsec_"),
    ],
)
def test_webhook_secret_misconfiguration_is_explained(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(BackendUnavailable, match=message):
        ReplicatePredictions({"api_key": TOKEN, **options})


def test_a_webhook_before_the_first_poll_is_not_lost() -> None:
    """The webhook lands before the poll loop starts waiting (a fast prediction): the early
    delivery still wakes it, instead of leaving it for the hourly poll."""
    secret = ReplicateFake().webhook_secret
    backend = ReplicatePredictions(
        {
            "api_key": TOKEN,
            "poll_interval": HOUR,
            "webhook_url": "http://127.0.0.1:9/unused",
            "webhook_secret": secret,
        }
    )
    body = json.dumps({"id": "early", "status": "succeeded"})
    headers = signed(secret, body, "msg_early")
    assert backend.accept_webhook(headers, body.encode()) is False
    assert backend._nudge_for("early").is_set()
    assert not backend._nudge_for("later").is_set()
    assert backend.accept_webhook(headers, body.encode()) is True  # now it is polled
