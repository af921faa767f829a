"""Async models whose only backends are upstream providers with no key configured (the
embedded defaults): a 503 with a JSON error, nothing charged, no job left behind."""

from __future__ import annotations

import base64

import httpx
import pytest

from hypereal.domain import keys, ledger
from hypereal.services import Services
from tests.support.sample_media import wav_bytes

WAV = "data:audio/wav;base64," + base64.b64encode(wav_bytes()).decode()


@pytest.mark.parametrize("prefix", ["/v1", "/api/v1"])
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("videos/generate", {"model": "sora-2-t2v", "input": {"prompt": "a fox"}}),
        (
            "audio/generate",
            {"model": "audio-voice-clone", "input": {"text": "hello", "audio": WAV}},
        ),
    ],
)
async def test_model_without_a_backend_is_503_and_charges_nothing(
    client: httpx.AsyncClient, services: Services, prefix: str, path: str, body: dict[str, object]
) -> None:
    account = await keys.create_account(services.db, "test")
    await ledger.grant(services.db, account, 500, "test grant")
    headers = {"Authorization": f"Bearer {(await keys.create_key(services.db, account)).secret}"}
    response = await client.post(f"{prefix}/{path}", headers=headers, json=body)
    assert response.status_code == 503
    error = response.json()["error"]
    assert str(body["model"]) in error
    assert await ledger.balance(services.db, account) == 500
    assert [e.kind for e in await ledger.entries(services.db, account)] == ["grant"]
    listed = await client.get(f"{prefix}/jobs", headers=headers)
    assert listed.json()["data"] == []
