"""FalQueue against a fake fal.ai queue served over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from PIL import Image

from hypereal.backends.base import (
    BackendError,
    BackendUnavailable,
    ImageRequest,
    JobRequest,
    MediaBlob,
)
from hypereal.backends.fal import FalQueue
from tests.support.fal_server import FalFake, FalScenario
from tests.support.observe import ProgressRecorder
from tests.support.polling import eventually
from tests.support.sample_media import image_bytes
from tests.support.servers import free_port, serve_app

MODEL = "fal-ai/flux/schnell"
KEY = "fal-test-key"


@pytest.fixture
def fake() -> FalFake:
    return FalFake(api_key=KEY)


@pytest.fixture
def fal_url(fake: FalFake) -> Iterator[str]:
    with serve_app(fake.app) as url:
        yield url


def make_backend(url: str, **options: Any) -> FalQueue:
    return FalQueue(
        {"api_key": KEY, "base_url": url, "poll_interval": 0.01, "retry_backoff": 0, **options}
    )


@pytest.fixture
async def fal(fal_url: str) -> AsyncIterator[FalQueue]:
    backend = make_backend(fal_url)
    yield backend
    await backend.aclose()


# ------------------------------------------------------------------------- success


async def test_generate_images_downloads_every_image_at_the_requested_size(
    fal: FalQueue, fake: FalFake
) -> None:
    request = ImageRequest(
        prompt="a lighthouse", width=32, height=48, upstream_model=MODEL, params={"num_images": 2}
    )

    images = await fal.generate_images(request)

    assert [image.content_type for image in images] == ["image/png", "image/png"]
    assert Image.open(io.BytesIO(images[0].data)).size == (32, 48)
    sent = fake.submissions[0]
    assert sent.model_id == MODEL
    assert sent.authorization == f"Key {KEY}"
    assert sent.payload["prompt"] == "a lighthouse"
    assert sent.payload["image_size"] == {"width": 32, "height": 48}
    assert sent.payload["num_images"] == 2
    # The CDN download must not carry the fal key.
    assert [d.authorization for d in fake.media.downloads] == [None, None]


async def test_output_type_is_sniffed_from_bytes_not_from_headers(
    fal: FalQueue, fake: FalFake
) -> None:
    fake.set_scenario(MODEL, FalScenario(served_content_type="image/png"))

    images = await fal.generate_images(
        ImageRequest(prompt="x", output_format="jpeg", upstream_model=MODEL)
    )

    assert images[0].content_type == "image/jpeg"
    assert images[0].data.startswith(b"\xff\xd8\xff")


async def test_edit_sends_source_images_to_fal_as_data_uris(fal: FalQueue, fake: FalFake) -> None:
    source = image_bytes(8, 8)
    request = ImageRequest(
        prompt="make it blue",
        images=[MediaBlob(source, "image/png")],
        upstream_model="fal-ai/flux-pro/kontext",
    )

    await fal.generate_images(request)

    payload = fake.submissions[0].payload
    prefix = "data:image/png;base64,"
    assert payload["image_url"].startswith(prefix)
    assert base64.b64decode(payload["image_url"][len(prefix) :]) == source
    assert payload["image_urls"] == [payload["image_url"]]


async def test_video_job_reports_queue_position_then_generation_progress(
    fal: FalQueue, fake: FalFake
) -> None:
    fake.set_scenario("fal-ai/kling", FalScenario(output="video", queue_polls=2, progress_polls=4))
    progress = ProgressRecorder()
    request = JobRequest(
        job_id="job_1",
        input={"prompt": "waves", "duration": 5},
        upstream_model="fal-ai/kling-video/v2/master/text-to-video",
    )

    result = await fal.generate_video(request, progress)

    assert result.output.content_type == "video/mp4"
    assert result.output.data[4:8] == b"ftyp"
    assert fake.submissions[0].payload == {"prompt": "waves", "duration": 5}
    messages = progress.messages
    assert messages[:2] == ["Queued upstream (position 1)", "Queued upstream (position 0)"]
    assert "Generating (50%)" in messages
    assert progress.calls[-1] == (1.0, "Completed")
    assert progress.fractions == sorted(progress.fractions)


@pytest.mark.parametrize(
    ("kind", "content_type", "magic"),
    [("audio", "audio/wav", b"RIFF"), ("mesh", "model/gltf-binary", b"glTF")],
)
async def test_audio_and_mesh_jobs_return_their_media(
    fal: FalQueue, fake: FalFake, kind: str, content_type: str, magic: bytes
) -> None:
    fake.set_scenario("fal-ai/", FalScenario(output=kind))  # type: ignore[arg-type]
    source = image_bytes(8, 8)
    request = JobRequest(
        job_id="job_2",
        input={"text": "hello"},
        media={"image": MediaBlob(source, "image/png")},
        upstream_model="fal-ai/trellis",
    )

    run = fal.generate_audio if kind == "audio" else fal.generate_mesh
    result = await run(request, ProgressRecorder())

    assert result.output.content_type == content_type
    assert result.output.data.startswith(magic)
    assert fake.submissions[0].payload["image_url"].startswith("data:image/png;base64,")


async def test_input_map_renames_and_drops_fields(fal_url: str, fake: FalFake) -> None:
    backend = make_backend(fal_url, input_map={"prompt": "text", "output_format": None})
    try:
        await backend.generate_images(ImageRequest(prompt="hi", upstream_model=MODEL))
    finally:
        await backend.aclose()

    payload = fake.submissions[0].payload
    assert payload["text"] == "hi"
    assert "prompt" not in payload and "output_format" not in payload


async def test_transient_gateway_errors_on_status_polls_are_retried(
    fal: FalQueue, fake: FalFake
) -> None:
    fake.set_scenario(MODEL, FalScenario(transient_status_errors=2))

    images = await fal.generate_images(ImageRequest(prompt="x", upstream_model=MODEL))

    assert len(images) == 1


# ------------------------------------------------------------------------ failures


def test_missing_api_key_makes_the_backend_unavailable() -> None:
    with pytest.raises(BackendUnavailable, match="api_key"):
        FalQueue({"base_url": "http://127.0.0.1:9"})


async def test_rejected_key_is_reported_as_a_server_side_failure(fal_url: str) -> None:
    backend = make_backend(fal_url, api_key="wrong")
    try:
        with pytest.raises(BackendError) as caught:
            await backend.generate_images(ImageRequest(prompt="x", upstream_model=MODEL))
    finally:
        await backend.aclose()

    assert not caught.value.client_error
    assert "rejected the configured credentials (HTTP 401)" in caught.value.message


async def test_validation_error_at_submit_is_a_client_error_with_fal_message(
    fal: FalQueue, fake: FalFake
) -> None:
    fake.set_scenario(MODEL, FalScenario(submit_error=422, error_detail="prompt is too long"))

    with pytest.raises(BackendError) as caught:
        await fal.generate_images(ImageRequest(prompt="x" * 5000, upstream_model=MODEL))

    assert caught.value.client_error
    assert caught.value.message == "prompt: prompt is too long"


async def test_model_rejecting_the_input_after_queueing_is_a_client_error(
    fal: FalQueue, fake: FalFake
) -> None:
    fake.set_scenario(MODEL, FalScenario(result_error=422, error_detail="NSFW content detected"))

    with pytest.raises(BackendError) as caught:
        await fal.generate_images(ImageRequest(prompt="x", upstream_model=MODEL))

    assert caught.value.client_error
    assert "NSFW content detected" in caught.value.message


async def test_runner_failure_is_a_server_error_with_fal_detail(
    fal: FalQueue, fake: FalFake
) -> None:
    fake.set_scenario(MODEL, FalScenario(result_error=500, error_detail="runner crashed"))

    with pytest.raises(BackendError) as caught:
        await fal.generate_video(
            JobRequest(job_id="j", input={"prompt": "x"}, upstream_model=MODEL), ProgressRecorder()
        )

    assert not caught.value.client_error
    assert "HTTP 500" in caught.value.message and "runner crashed" in caught.value.message


async def test_unreachable_fal_is_a_clear_server_error() -> None:
    backend = make_backend(f"http://127.0.0.1:{free_port()}", retries=1)
    try:
        with pytest.raises(BackendError) as caught:
            await backend.generate_images(ImageRequest(prompt="x", upstream_model=MODEL))
    finally:
        await backend.aclose()

    assert not caught.value.client_error
    assert "Could not reach fal.ai" in caught.value.message


# -------------------------------------------------------------------- cancellation


async def test_cancelling_the_job_task_cancels_the_fal_request(
    fal: FalQueue, fake: FalFake
) -> None:
    fake.set_scenario(MODEL, FalScenario(output="video", progress_polls=100_000))
    request = JobRequest(job_id="j", input={"prompt": "x"}, upstream_model=MODEL)
    task = asyncio.create_task(fal.generate_video(request, ProgressRecorder()))
    await eventually(lambda: fake.status_polls >= 3)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert fake.cancelled == [fake.submissions[0].request_id]


async def test_cancel_while_submitting_still_cancels_the_created_request(
    fal: FalQueue, fake: FalFake
) -> None:
    fake.set_scenario(MODEL, FalScenario(submit_delay=0.3, progress_polls=100_000))
    task = asyncio.create_task(fal.generate_images(ImageRequest(prompt="x", upstream_model=MODEL)))
    await asyncio.sleep(0.1)  # the submit is in flight, no request id known yet

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert fake.cancelled == [fake.submissions[0].request_id]
    assert fake.status_polls == 0


async def test_overall_timeout_cancels_the_fal_request_and_fails(
    fal_url: str, fake: FalFake
) -> None:
    fake.set_scenario(MODEL, FalScenario(progress_polls=100_000))
    backend = make_backend(fal_url, timeout=0.3)
    try:
        with pytest.raises(BackendError, match="did not finish") as caught:
            await backend.generate_images(ImageRequest(prompt="x", upstream_model=MODEL))
    finally:
        await backend.aclose()

    assert not caught.value.client_error
    assert fake.cancelled == [fake.submissions[0].request_id]
