"""The hosted service's current model slugs (spec/hosted-today.md) end to end: each one served
by a fake hosted Hypereal account over real HTTP under its own slug (chat, images with
``mode``, video jobs, ``ai-avatar-i2v`` with an image and an audio track, synchronous speech,
music and text-to-3D), the avatar through fal as ``image_url`` + ``audio_url``; a slug that
does not exist is a 400, and without a configured backend a slug is listed unavailable and
answers 503 with the reason."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hypereal.domain.catalogue import load_catalogue
from hypereal.services import Services, build_services
from hypereal.settings import Settings
from tests.support.app import app_client, bearer, funded_key
from tests.support.fal_server import FalFake, FalScenario
from tests.support.hypereal_server import HyperealFake
from tests.support.sample_media import image_bytes, wav_bytes
from tests.support.servers import serve_app

CHAT = ("gpt-5.5", "gpt-5.5-instant", "claude-sonnet-4-6", "claude-opus-4-7")
CHAT_MORE = ("gemini-3.1-pro", "gemini-3.1-fast")
IMAGES = ("gemini-3-1-flash-t2i", "gpt-image-2", "gpt-4o-image", "nano-banana-t2i")
EDITS = ("nano-banana-edit", "nano-banana-pro-edit")
I2V = (
    "veo-3-1-i2v",
    "kling-3-0-pro-i2v",
    "kling-3-0-std-i2v",
    "seedance-1-5-i2v",
    "seedance-2-0-fast-i2v",
    "sora-2-i2v",
    "wan-2-6-i2v",
)
SYNC = {"audio-tts", "minimax-speech-02", "lyria-3-pro", "audio-asr", "meshy6-text-to-3d"}
TODAY = {
    "chat": CHAT + CHAT_MORE,
    "image": IMAGES,
    "image-edit": EDITS,
    "video": (*I2V, "kling-3-0-std-t2v", "ai-avatar-i2v"),
    "audio": ("audio-tts", "minimax-speech-02", "lyria-3-pro", "audio-asr"),
    "3d": ("meshy6-text-to-3d", "image-to-3d"),
}


def png_uri() -> str:
    return "data:image/png;base64," + base64.b64encode(image_bytes(16, 16, "png")).decode()


def wav_uri() -> str:
    return "data:audio/wav;base64," + base64.b64encode(wav_bytes(0.2)).decode()


def test_every_slug_of_today_is_in_the_shipped_catalogue_with_hosted_hypereal() -> None:
    catalogue = load_catalogue()
    for modality, slugs in TODAY.items():
        for slug in slugs:
            spec = catalogue.models[slug]
            assert spec.modality == modality, slug
            assert any(b.backend == "hypereal" for b in spec.bindings), slug
            assert spec.sync == (slug in SYNC), slug
    avatar = catalogue.models["ai-avatar-i2v"]
    assert {p.name: p.type for p in avatar.params if p.required} == {
        "image": "media",
        "audio": "media",
    }


@pytest.fixture
def hosted() -> Iterator[tuple[HyperealFake, str]]:
    fake = HyperealFake()
    with serve_app(fake.app) as url:
        yield fake, url


@pytest.fixture
def fal() -> Iterator[tuple[FalFake, str]]:
    fake = FalFake()
    with serve_app(fake.app) as url:
        yield fake, url


def _services(tmp_path: Path, backends: dict[str, dict[str, Any]]) -> Services:
    settings = Settings(
        data_dir=tmp_path / "data",
        bootstrap_admin=False,
        public_url="http://testserver",
        backends=backends,
    )
    return build_services(settings)


@pytest.fixture
async def client(
    tmp_path: Path, hosted: tuple[HyperealFake, str]
) -> AsyncIterator[tuple[httpx.AsyncClient, Services]]:
    fake, url = hosted
    backend = {"type": "hypereal", "api_key": fake.api_key, "base_url": url}
    services = _services(tmp_path, {"hypereal": {**backend, "poll_interval": 0.01}})
    await services.migrate()
    async with app_client(services) as c:
        yield c, services
    await services.close()


async def headers(services: Services, credits: int = 10_000) -> dict[str, str]:
    return bearer((await funded_key(services, credits, "today"))[0])


async def finished(client: httpx.AsyncClient, job_id: str, auth: dict[str, str]) -> dict[str, Any]:
    async with asyncio.timeout(30):
        while True:
            job: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}", headers=auth)).json()
            if job["status"] != "processing":
                return job
            await asyncio.sleep(0.02)


async def test_chat_slugs_reach_the_hosted_account_under_their_own_names(
    client: tuple[httpx.AsyncClient, Services], hosted: tuple[HyperealFake, str]
) -> None:
    http, services = client
    auth = await headers(services)
    for slug in CHAT + CHAT_MORE:
        body = {"model": slug, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        answer = await http.post("/v1/chat/completions", json=body, headers=auth)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "Hi there!"
        assert hosted[0].submissions[-1].body["model"] == slug


async def test_image_slugs_forward_mode_and_edits_send_their_sources(
    client: tuple[httpx.AsyncClient, Services], hosted: tuple[HyperealFake, str]
) -> None:
    http, services = client
    auth = await headers(services)
    for slug in IMAGES:
        body = {"model": slug, "prompt": "a fox", "mode": "fast", "unknown_field": 1}
        answer = await http.post("/api/v1/images/generate", json=body, headers=auth)
        assert answer.status_code == 200, answer.text
        assert answer.json()["data"][0]["url"].startswith("http://testserver/")
        sent = hosted[0].submissions[-1].body
        assert (sent["model"], sent["mode"]) == (slug, "fast")
        assert "unknown_field" not in sent
    for slug in EDITS:
        body = {"model": slug, "prompt": "make it blue", "images": [png_uri()]}
        answer = await http.post("/v1/images/generate", json=body, headers=auth)
        assert answer.status_code == 200, answer.text
        assert hosted[0].submissions[-1].body["image"].startswith("data:image/png;base64,")


async def test_video_slugs_run_as_jobs_upstream(
    client: tuple[httpx.AsyncClient, Services], hosted: tuple[HyperealFake, str]
) -> None:
    http, services = client
    auth = await headers(services)
    requests = [(slug, {"image": png_uri(), "prompt": "waves", "mode": "fast"}) for slug in I2V]
    requests.append(("kling-3-0-std-t2v", {"prompt": "waves", "duration": 5}))
    for slug, job_input in requests:
        body = {"model": slug, "input": job_input}
        accepted = await http.post("/v1/videos/generate", json=body, headers=auth)
        assert accepted.status_code == 202, accepted.text
        job = await finished(http, accepted.json()["jobId"], auth)
        assert job["status"] == "completed", job
        sent = next(s for s in hosted[0].submissions if s.job_id and s.body["model"] == slug)
        assert sent.body["input"]["prompt"] == "waves"
    assert sent.body["input"]["duration"] == 5


async def test_ai_avatar_takes_an_image_and_an_audio_track(
    client: tuple[httpx.AsyncClient, Services], hosted: tuple[HyperealFake, str]
) -> None:
    http, services = client
    auth = await headers(services)
    missing = {"model": "ai-avatar-i2v", "input": {"image": png_uri()}}
    refused = await http.post("/v1/videos/generate", json=missing, headers=auth)
    assert refused.status_code == 400
    assert "input.audio" in refused.json()["error"]
    body = {"model": "ai-avatar-i2v", "input": {"image": png_uri(), "audio": wav_uri()}}
    accepted = await http.post("/v1/videos/generate", json=body, headers=auth)
    assert accepted.status_code == 202, accepted.text
    job = await finished(http, accepted.json()["jobId"], auth)
    assert job["status"] == "completed", job
    sent = hosted[0].submissions[-1].body["input"]
    assert sent["image"].startswith("data:image/png;base64,")
    assert sent["audio"].startswith("data:audio/")


async def test_speech_music_and_text_to_3d_answer_synchronously(
    client: tuple[httpx.AsyncClient, Services], hosted: tuple[HyperealFake, str]
) -> None:
    http, services = client
    auth = await headers(services)
    for path, slug, job_input in (
        ("/v1/audio/generate", "minimax-speech-02", {"text": "hello there"}),
        ("/v1/audio/generate", "lyria-3-pro", {"prompt": "calm piano", "mode": "fast"}),
        ("/v1/3d/generate", "meshy6-text-to-3d", {"prompt": "a teapot"}),
    ):
        answer = await http.post(path, json={"model": slug, "input": job_input}, headers=auth)
        assert answer.status_code == 200, answer.text
        result = answer.json()
        assert result["success"] is True and result["status"] == "completed"
        assert result["outputUrl"] == result["data"][0]["url"] == result["output"]["url"]
        assert result["creditsUsed"] > 0
        download = await http.get(result["outputUrl"].removeprefix("http://testserver"))
        assert download.status_code == 200
        assert hosted[0].submissions[-1].body["model"] == slug
    assert download.content[:4] == b"glTF"


async def test_a_slug_that_does_not_exist_is_a_400(
    client: tuple[httpx.AsyncClient, Services],
) -> None:
    http, services = client
    auth = await headers(services)
    body = {"model": "kling-3-0-i2v-pro", "input": {"image": png_uri()}}
    answer = await http.post("/v1/videos/generate", json=body, headers=auth)
    assert answer.status_code == 400
    assert "kling-3-0-i2v-pro" in answer.json()["error"]


async def test_without_a_backend_the_new_slugs_are_unavailable_not_faked(tmp_path: Path) -> None:
    services = _services(tmp_path, {})
    await services.migrate()
    try:
        async with app_client(services) as c:
            auth = await headers(services)
            listed = (await c.get("/v1/models", headers=auth)).json()["data"]
            by_id = {m["id"]: m for m in listed}
            for slug in ("gpt-5.5", "gpt-image-2", "ai-avatar-i2v", "meshy6-text-to-3d"):
                assert by_id[slug]["available"] is False, by_id[slug]
            chat = {
                "model": "claude-sonnet-4-6",
                "messages": [{"role": "user", "content": "x"}],
            }
            answer = await c.post("/v1/chat/completions", json=chat, headers=auth)
            assert answer.status_code == 503
            assert "hypereal" in answer.json()["error"]["message"]
            body = {"model": "meshy6-text-to-3d", "input": {"prompt": "a teapot"}}
            answer = await c.post("/v1/3d/generate", json=body, headers=auth)
            assert answer.status_code == 503
            assert "meshy6-text-to-3d" in answer.json()["error"]
    finally:
        await services.close()


async def test_the_avatar_through_fal_sends_image_url_and_audio_url(
    tmp_path: Path, fal: tuple[FalFake, str]
) -> None:
    fake, url = fal
    fake.set_scenario("fal-ai/ai-avatar", FalScenario(output="video"))
    backend = {"type": "fal", "api_key": "fal-test-key", "base_url": url, "poll_interval": 0.01}
    services = _services(tmp_path, {"fal": backend})
    await services.migrate()
    try:
        async with app_client(services) as c:
            auth = await headers(services)
            body = {"model": "ai-avatar-i2v", "input": {"image": png_uri(), "audio": wav_uri()}}
            accepted = await c.post("/v1/videos/generate", json=body, headers=auth)
            assert accepted.status_code == 202, accepted.text
            job = await finished(c, accepted.json()["jobId"], auth)
            assert job["status"] == "completed", job
    finally:
        await services.close()
    (submission,) = fake.submissions
    assert submission.model_id == "fal-ai/ai-avatar"
    assert submission.payload["image_url"].startswith("data:image/png;base64,")
    assert submission.payload["audio_url"].startswith("data:audio/")
