"""HyperealHosted against a real HTTP server speaking the hosted Hypereal API (tests/support)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from typing import Any

import pytest

from hypereal.backends.base import (
    AudioBackend,
    BackendError,
    BackendUnavailable,
    ChatBackend,
    ChatDelta,
    ChatMessage,
    ChatRequest,
    ImageBackend,
    ImageRequest,
    JobRequest,
    MediaBlob,
    MeshBackend,
    VideoBackend,
)
from hypereal.backends.hypereal_hosted import HyperealHosted
from tests.support.hypereal_server import HyperealFake, JobScenario
from tests.support.sample_media import image_bytes
from tests.support.servers import serve_app

CHAT = ChatRequest((ChatMessage("user", "tell me a story"),), temperature=0.8, max_tokens=64)
SOURCE = MediaBlob(image_bytes(8, 8, "png"), "image/png")


@pytest.fixture
def fake() -> HyperealFake:
    return HyperealFake()


@pytest.fixture
def server(fake: HyperealFake) -> Iterator[str]:
    with serve_app(fake.app) as url:
        yield url


@pytest.fixture
async def backend(server: str, fake: HyperealFake) -> AsyncIterator[HyperealHosted]:
    instance = make_backend(server, fake)
    yield instance
    await instance.aclose()


def make_backend(server: str, fake: HyperealFake, **options: Any) -> HyperealHosted:
    return HyperealHosted(
        {
            "api_key": fake.api_key,
            "base_url": server,
            "poll_interval": 0.05,
            "retry_backoff": 0,
            **options,
        }
    )


class Progress:
    """Records the progress callbacks of one job."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str]] = []

    async def __call__(self, fraction: float, message: str) -> None:
        self.calls.append((fraction, message))


async def collect(backend: HyperealHosted, request: ChatRequest) -> list[ChatDelta]:
    async with aclosing(backend.stream(request)) as stream:
        return [delta async for delta in stream]


def data_uri(blob: MediaBlob) -> str:
    return f"data:{blob.content_type};base64,{base64.b64encode(blob.data).decode()}"


# ------------------------------------------------------------------------ options


def test_backend_implements_every_modality(server: str, fake: HyperealFake) -> None:
    backend = make_backend(server, fake)
    for protocol in (ChatBackend, ImageBackend, VideoBackend, AudioBackend, MeshBackend):
        assert isinstance(backend, protocol)


def test_missing_api_key_makes_backend_unavailable() -> None:
    with pytest.raises(BackendUnavailable, match="api_key"):
        HyperealHosted({"base_url": "http://127.0.0.1:9"})


def test_non_positive_poll_interval_makes_backend_unavailable() -> None:
    with pytest.raises(BackendUnavailable, match="poll_interval"):
        HyperealHosted({"api_key": "k", "poll_interval": 0})


# --------------------------------------------------------------------------- chat


async def test_chat_streams_deltas_and_usage_from_spicy_chat(
    backend: HyperealHosted, fake: HyperealFake
) -> None:
    deltas = await collect(backend, CHAT)

    assert [d.text for d in deltas if d.text] == ["Hi", " there", "!"]
    assert deltas[-1].finish_reason == "stop"
    assert (deltas[-1].prompt_tokens, deltas[-1].completion_tokens) == (4, 3)
    sent = fake.submissions[-1]
    assert sent.path == "/v1/spicy-chat"
    assert sent.authorization == f"Bearer {fake.api_key}"
    assert sent.body == {
        "messages": [{"role": "user", "content": "tell me a story"}],
        "temperature": 0.8,
        "max_tokens": 64,
        "stream": True,
    }


async def test_chat_path_option_targets_another_endpoint(server: str, fake: HyperealFake) -> None:
    backend = make_backend(server, fake, chat_path="/api/v1/chat")
    await collect(backend, CHAT)
    await backend.aclose()

    assert fake.submissions[-1].path == "/api/v1/chat"


async def test_closing_chat_early_stops_the_upstream() -> None:
    fake = HyperealFake(tokens=[f"w{i}" for i in range(300)], token_delay=0.02)
    with serve_app(fake.app) as url:
        backend = make_backend(url, fake)
        stream = backend.stream(CHAT)
        [await anext(stream) for _ in range(3)]
        await stream.aclose()
        await fake.stats.wait_for_abort()
        sent = fake.stats.tokens_sent
        await asyncio.sleep(0.3)
        assert fake.stats.tokens_sent == sent < 20
        await backend.aclose()
    assert fake.stats.aborted == 1


async def test_prompt_tokens_are_estimated(backend: HyperealHosted) -> None:
    assert await backend.count_prompt_tokens(CHAT) == 5 + 4 + 3  # ceil(15/3) + template


async def test_rejected_key_maps_to_credentials_error(server: str, fake: HyperealFake) -> None:
    backend = HyperealHosted({"api_key": "wrong", "base_url": server})
    with pytest.raises(BackendError) as caught:
        await collect(backend, CHAT)
    await backend.aclose()

    assert caught.value.client_error is False
    assert "rejected the configured credentials (HTTP 401)" in caught.value.message
    assert "Unauthorized" in caught.value.message


async def test_chat_without_credits_says_upstream_account_is_out_of_credits(
    backend: HyperealHosted, fake: HyperealFake
) -> None:
    fake.credits = 1
    with pytest.raises(BackendError) as caught:
        await collect(backend, CHAT)

    assert caught.value.client_error is False
    assert "account is out of credits (HTTP 402)" in caught.value.message
    assert "(required 2, available 1)" in caught.value.message


# ------------------------------------------------------------------------- images


async def test_image_is_generated_synchronously_and_downloaded(
    backend: HyperealHosted, fake: HyperealFake
) -> None:
    request = ImageRequest(
        prompt="a fox", width=512, height=768, upstream_model="flux-1-schnell", params={"seed": 7}
    )
    images = await backend.generate_images(request)

    assert [i.content_type for i in images] == ["image/png"]
    assert images[0].data.startswith(b"\x89PNG")
    assert fake.submissions[-1].path == "/v1/images/generate"
    assert fake.submissions[-1].body == {
        "prompt": "a fox",
        "model": "flux-1-schnell",
        "size": "512*768",
        "output_format": "png",
        "seed": 7,
    }
    assert fake.media.downloads[-1].authorization is None  # the key never goes to the CDN


async def test_image_edit_sends_sources_as_data_uris(
    backend: HyperealHosted, fake: HyperealFake
) -> None:
    other = MediaBlob(image_bytes(4, 4, "jpeg"), "image/jpeg")
    request = ImageRequest(
        prompt="make it night", images=[SOURCE, other], upstream_model="nano-banana-edit"
    )
    await backend.generate_images(request)

    body = fake.submissions[-1].body
    assert body["image"] == data_uri(SOURCE)
    assert body["images"] == [data_uri(SOURCE), data_uri(other)]


async def test_image_rejected_upstream_is_a_client_error(backend: HyperealHosted) -> None:
    with pytest.raises(BackendError) as caught:
        await backend.generate_images(ImageRequest(prompt="", upstream_model="flux-1-schnell"))
    assert caught.value.client_error is True
    assert caught.value.message == "Prompt is required"


async def test_image_without_upstream_model_is_refused_before_calling(
    backend: HyperealHosted, fake: HyperealFake
) -> None:
    with pytest.raises(BackendError, match="upstream_model"):
        await backend.generate_images(ImageRequest(prompt="fox"))
    assert fake.submissions == []


# --------------------------------------------------------------------------- jobs


async def test_video_job_is_polled_to_completion_with_progress(
    backend: HyperealHosted, fake: HyperealFake
) -> None:
    fake.set_scenario("sora-2-i2v", JobScenario(processing_polls=3))
    progress = Progress()
    request = JobRequest(
        job_id="ours",
        input={"prompt": "pan left", "duration": 5, "image": "https://example.com/a.png"},
        media={"image": SOURCE},
        upstream_model="sora-2-i2v",
    )
    result = await backend.generate_video(request, progress)

    assert result.output.content_type == "video/mp4"
    sent = fake.submissions[-1]
    assert sent.path == "/v1/videos/generate"
    assert sent.body == {
        "model": "sora-2-i2v",
        "input": {"prompt": "pan left", "duration": 5, "image": data_uri(SOURCE)},
    }
    assert fake.polls == [{"model": "sora-2-i2v", "type": "video"}] * 4
    assert progress.calls == [
        (0.0, "Queued upstream"),
        (0.05, "Generating"),
        (0.95, "Fetching output"),
        (1.0, "Completed"),
    ]


async def test_audio_job_returns_wav(backend: HyperealHosted, fake: HyperealFake) -> None:
    request = JobRequest(job_id="a", input={"text": "hello"}, upstream_model="audio-tts")
    result = await backend.generate_audio(request, Progress())

    assert result.output.content_type == "audio/wav"
    assert fake.submissions[-1].path == "/v1/audio/generate"
    assert fake.polls[-1] == {"model": "audio-tts", "type": "audio"}


async def test_mesh_job_returns_glb(backend: HyperealHosted, fake: HyperealFake) -> None:
    request = JobRequest(
        job_id="m", input={}, media={"image": SOURCE}, upstream_model="image-to-3d"
    )
    result = await backend.generate_mesh(request, Progress())

    assert result.output.content_type == "model/gltf-binary"
    assert fake.submissions[-1].path == "/v1/3d/generate"
    assert fake.polls[-1] == {"model": "image-to-3d", "type": "3d"}


async def test_failed_job_raises_with_upstream_error(
    backend: HyperealHosted, fake: HyperealFake
) -> None:
    fake.set_scenario("kling-2-6-t2v-pro", JobScenario(processing_polls=1, error="NSFW content"))
    request = JobRequest(job_id="k", input={"prompt": "x"}, upstream_model="kling-2-6-t2v-pro")
    with pytest.raises(BackendError) as caught:
        await backend.generate_video(request, Progress())

    job_id = fake.submissions[-1].job_id
    assert caught.value.message == f"The upstream Hypereal API job {job_id} failed: NSFW content"
    assert caught.value.client_error is False
    assert fake.media.downloads == []


async def test_job_without_credits_says_upstream_account_is_out_of_credits(
    backend: HyperealHosted, fake: HyperealFake
) -> None:
    fake.credits = 10
    request = JobRequest(job_id="v", input={"prompt": "x"}, upstream_model="sora-2-t2v")
    with pytest.raises(BackendError) as caught:
        await backend.generate_video(request, Progress())

    assert "account is out of credits (HTTP 402): Insufficient credits" in caught.value.message
    assert "(required 69, available 10)" in caught.value.message
    assert fake.polls == []


async def test_job_that_never_finishes_times_out(server: str, fake: HyperealFake) -> None:
    # The shared job driver bounds the whole job (submit and polls) with asyncio.timeout, as
    # for fal.ai and Replicate; the hosted API has no cancel call, and the message says so.
    fake.default = JobScenario(processing_polls=10_000)
    backend = make_backend(server, fake, timeout=0.3)
    request = JobRequest(job_id="t", input={"prompt": "x"}, upstream_model="wan-2-6-t2v")
    with pytest.raises(BackendError, match=r"did not finish within 0\.3 s") as caught:
        await backend.generate_video(request, Progress())
    await backend.aclose()

    assert not caught.value.client_error
    assert "no cancel call" in caught.value.message
    assert 3 <= len(fake.polls) <= 8


async def test_cancelling_the_job_task_stops_polling(
    backend: HyperealHosted, fake: HyperealFake
) -> None:
    fake.default = JobScenario(processing_polls=10_000)
    request = JobRequest(job_id="c", input={"prompt": "x"}, upstream_model="wan-2-6-t2v")
    task = asyncio.create_task(backend.generate_video(request, Progress()))
    async with asyncio.timeout(5):
        while len(fake.polls) < 2:  # noqa: ASYNC110 (the fake runs in its server thread)
            await asyncio.sleep(0.01)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    polled = len(fake.polls)
    await asyncio.sleep(0.2)

    assert len(fake.polls) == polled
