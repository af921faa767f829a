"""ReplicatePredictions against a fake Replicate API served over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from standardwebhooks.webhooks import Webhook

from hypereal.backends.base import (
    BackendError,
    BackendUnavailable,
    ImageRequest,
    JobRequest,
    MediaBlob,
)
from hypereal.backends.replicate import (
    ReplicatePredictions,
    ReplicateWebhookError,
    verify_replicate_webhook,
)
from tests.support.observe import ProgressRecorder
from tests.support.polling import eventually
from tests.support.replicate_server import ReplicateFake, ReplicateScenario
from tests.support.sample_media import image_bytes
from tests.support.servers import serve_app

MODEL = "black-forest-labs/flux-schnell"
VERSION = "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa"
TOKEN = "r8_test_token"


@pytest.fixture
def fake() -> ReplicateFake:
    return ReplicateFake(api_key=TOKEN)


@pytest.fixture
def api_url(fake: ReplicateFake) -> Iterator[str]:
    with serve_app(fake.app) as url:
        yield f"{url}/v1"


def make_backend(url: str, **options: Any) -> ReplicatePredictions:
    return ReplicatePredictions(
        {"api_key": TOKEN, "base_url": url, "poll_interval": 0.01, "retry_backoff": 0, **options}
    )


@pytest.fixture
async def replicate(api_url: str) -> AsyncIterator[ReplicatePredictions]:
    backend = make_backend(api_url)
    yield backend
    await backend.aclose()


def job(model: str = "minimax/video-01", **fields: Any) -> JobRequest:
    return JobRequest(job_id="job_1", input={"prompt": "waves"}, upstream_model=model, **fields)


# ------------------------------------------------------------------------- success


async def test_image_with_prefer_wait_comes_back_from_the_create_call(
    replicate: ReplicatePredictions, fake: ReplicateFake
) -> None:
    request = ImageRequest(prompt="a fox", width=64, height=32, upstream_model=MODEL)

    images = await replicate.generate_images(request)

    assert [image.content_type for image in images] == ["image/png"]
    created = fake.creations[0]
    assert created.path == f"/v1/models/{MODEL}/predictions"
    assert created.prefer == "wait=10"
    assert created.authorization == f"Bearer {TOKEN}"
    assert created.body["input"] == {
        "prompt": "a fox",
        "width": 64,
        "height": 32,
        "output_format": "png",
    }
    assert fake.polls == 0
    assert [d.authorization for d in fake.media.downloads] == [None]


async def test_image_not_ready_within_the_wait_is_polled_to_completion(
    replicate: ReplicatePredictions, fake: ReplicateFake
) -> None:
    fake.set_scenario(MODEL, ReplicateScenario(output="images", finishes_within_wait=False))
    request = ImageRequest(prompt="x", upstream_model=MODEL, params={"num_outputs": 3})

    images = await replicate.generate_images(request)

    assert len(images) == 3
    assert fake.polls == 3  # starting, processing, succeeded


async def test_pinned_version_uses_the_predictions_endpoint(
    replicate: ReplicatePredictions, fake: ReplicateFake
) -> None:
    await replicate.generate_images(ImageRequest(prompt="x", upstream_model=f"{MODEL}:{VERSION}"))

    created = fake.creations[0]
    assert created.path == "/v1/predictions"
    assert created.body["version"] == VERSION


async def test_edit_sends_the_source_image_as_a_data_uri(
    replicate: ReplicatePredictions, fake: ReplicateFake
) -> None:
    source = image_bytes(8, 8)
    request = ImageRequest(
        prompt="x", images=[MediaBlob(source, "image/png")], upstream_model="owner/editor"
    )

    await replicate.generate_images(request)

    sent = fake.creations[0].body["input"]["image"]
    prefix = "data:image/png;base64,"
    assert sent.startswith(prefix)
    assert base64.b64decode(sent[len(prefix) :]) == source


async def test_video_job_reports_progress_from_prediction_logs(
    replicate: ReplicatePredictions, fake: ReplicateFake
) -> None:
    fake.set_scenario("minimax/video-01", ReplicateScenario(output="video", processing_polls=4))
    progress = ProgressRecorder()

    result = await replicate.generate_video(job(), progress)

    assert result.output.content_type == "video/mp4"
    assert result.output.data[4:8] == b"ftyp"
    assert fake.creations[0].prefer is None  # jobs never hold the create call open
    messages = progress.messages
    assert messages[0] == "Queued upstream"
    assert "Generating (50%)" in messages
    assert progress.calls[-1] == (1.0, "Completed")
    assert progress.fractions == sorted(progress.fractions)


@pytest.mark.parametrize(
    ("kind", "content_type", "magic"),
    [("audio", "audio/wav", b"RIFF"), ("mesh", "model/gltf-binary", b"glTF")],
)
async def test_audio_and_mesh_jobs_send_media_inputs_and_return_output(
    replicate: ReplicatePredictions, fake: ReplicateFake, kind: str, content_type: str, magic: bytes
) -> None:
    fake.default = ReplicateScenario(output=kind)  # type: ignore[arg-type]
    request = job("owner/model", media={"image": MediaBlob(image_bytes(8, 8), "image/png")})

    run = replicate.generate_audio if kind == "audio" else replicate.generate_mesh
    result = await run(request, ProgressRecorder())

    assert result.output.content_type == content_type
    assert result.output.data.startswith(magic)
    assert fake.creations[0].body["input"]["image"].startswith("data:image/png;base64,")


async def test_data_uri_outputs_are_decoded(
    replicate: ReplicatePredictions, fake: ReplicateFake
) -> None:
    fake.default = ReplicateScenario(output_as_data_uri=True)

    images = await replicate.generate_images(
        ImageRequest(prompt="x", output_format="webp", upstream_model=MODEL)
    )

    assert images[0].content_type == "image/webp"
    assert fake.media.downloads == []


async def test_throttled_create_is_retried_after_retry_after(
    replicate: ReplicatePredictions, fake: ReplicateFake
) -> None:
    fake.default = ReplicateScenario(throttled_creates=2)

    await replicate.generate_images(ImageRequest(prompt="x", upstream_model=MODEL))

    assert len(fake.creations) == 3


async def test_transient_errors_while_polling_are_retried(
    replicate: ReplicatePredictions, fake: ReplicateFake
) -> None:
    fake.default = ReplicateScenario(output="video", transient_get_errors=2)

    result = await replicate.generate_video(job(), ProgressRecorder())

    assert result.output.content_type == "video/mp4"


# ------------------------------------------------------------------------ failures


def test_missing_api_key_makes_the_backend_unavailable() -> None:
    with pytest.raises(BackendUnavailable, match="api_key"):
        ReplicatePredictions({"api_key": " "})


async def test_rejected_token_is_reported_as_a_server_side_failure(api_url: str) -> None:
    backend = make_backend(api_url, api_key="r8_wrong")
    try:
        with pytest.raises(BackendError) as caught:
            await backend.generate_images(ImageRequest(prompt="x", upstream_model=MODEL))
    finally:
        await backend.aclose()

    assert not caught.value.client_error
    assert "HTTP 401" in caught.value.message
    assert "valid authentication token" in caught.value.message


@pytest.mark.parametrize(
    ("status", "client_error", "text"),
    [
        (422, True, "- input.prompt: prompt is too long"),
        (402, False, "HTTP 402"),
        (404, False, "HTTP 404"),
        (500, False, "Replicate failed (HTTP 500)"),
    ],
)
async def test_create_errors_map_to_backend_errors(
    replicate: ReplicatePredictions,
    fake: ReplicateFake,
    status: int,
    client_error: bool,
    text: str,
) -> None:
    fake.default = ReplicateScenario(create_error=status)

    with pytest.raises(BackendError) as caught:
        await replicate.generate_video(job(), ProgressRecorder())

    assert caught.value.client_error is client_error
    assert text in caught.value.message


async def test_failed_prediction_raises_with_replicate_error_text(
    replicate: ReplicatePredictions, fake: ReplicateFake
) -> None:
    fake.default = ReplicateScenario(outcome="failed", error="CUDA out of memory")

    with pytest.raises(BackendError, match="CUDA out of memory") as caught:
        await replicate.generate_video(job(), ProgressRecorder())

    assert not caught.value.client_error


async def test_prediction_canceled_upstream_raises(
    replicate: ReplicatePredictions, fake: ReplicateFake
) -> None:
    fake.default = ReplicateScenario(outcome="canceled")

    with pytest.raises(BackendError, match="canceled upstream"):
        await replicate.generate_images(ImageRequest(prompt="x", upstream_model=MODEL))


# -------------------------------------------------------------------- cancellation


async def test_cancelling_the_job_task_cancels_the_prediction(
    replicate: ReplicatePredictions, fake: ReplicateFake
) -> None:
    fake.default = ReplicateScenario(output="video", processing_polls=100_000)
    task = asyncio.create_task(replicate.generate_video(job(), ProgressRecorder()))
    await eventually(lambda: fake.polls >= 3)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert fake.cancelled == [fake.creations[0].prediction_id]


async def test_overall_timeout_cancels_the_prediction_and_fails(
    api_url: str, fake: ReplicateFake
) -> None:
    fake.default = ReplicateScenario(processing_polls=100_000, finishes_within_wait=False)
    backend = make_backend(api_url, timeout=0.3)
    try:
        with pytest.raises(BackendError, match="did not finish"):
            await backend.generate_images(ImageRequest(prompt="x", upstream_model=MODEL))
    finally:
        await backend.aclose()

    assert fake.cancelled == [fake.creations[0].prediction_id]


# ------------------------------------------------------------------------ webhooks


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    """A webhook receiver that stores each delivery's headers and raw body."""
    received: list[tuple[dict[str, str], bytes]] = []
    app = FastAPI()

    @app.post("/hooks/replicate")
    async def hook(request: Request) -> Response:
        received.append((dict(request.headers), await request.body()))
        return Response(status_code=204)

    with serve_app(app) as url:
        yield f"{url}/hooks/replicate", received


async def signed_delivery(
    api_url: str, fake: ReplicateFake, hook_url: str, received: list[Any]
) -> tuple[str, dict[str, str], bytes]:
    """Run a prediction with a webhook and return (secret, headers, body) of its delivery."""
    backend = make_backend(api_url, webhook_url=hook_url)
    try:
        await backend.generate_images(ImageRequest(prompt="x", upstream_model=MODEL))
    finally:
        await backend.aclose()
    await eventually(lambda: len(received) == 1)
    async with httpx.AsyncClient() as client:
        response = await client.get(
            f"{api_url}/webhooks/default/secret", headers={"Authorization": f"Bearer {TOKEN}"}
        )
    headers, body = received[0]
    return response.json()["key"], headers, body


async def test_webhook_delivery_verifies_with_the_account_secret(
    api_url: str, fake: ReplicateFake, receiver: tuple[str, list[Any]]
) -> None:
    hook_url, received = receiver
    secret, headers, body = await signed_delivery(api_url, fake, hook_url, received)

    prediction = verify_replicate_webhook(secret, headers, body)

    assert prediction["id"] == fake.creations[0].prediction_id
    assert prediction["status"] == "succeeded"
    assert fake.creations[0].body["webhook"] == hook_url
    assert fake.creations[0].body["webhook_events_filter"] == ["completed"]


async def test_tampered_webhook_body_is_rejected(
    api_url: str, fake: ReplicateFake, receiver: tuple[str, list[Any]]
) -> None:
    hook_url, received = receiver
    secret, headers, body = await signed_delivery(api_url, fake, hook_url, received)
    tampered = json.dumps({**json.loads(body), "status": "failed"}).encode()

    with pytest.raises(ReplicateWebhookError, match="No matching signature"):
        verify_replicate_webhook(secret, headers, tampered)


async def test_webhook_signed_with_another_secret_is_rejected(
    api_url: str, fake: ReplicateFake, receiver: tuple[str, list[Any]]
) -> None:
    hook_url, received = receiver
    _, headers, body = await signed_delivery(api_url, fake, hook_url, received)
    other_secret = "whsec_" + base64.b64encode(b"another account's secret key!!").decode()

    with pytest.raises(ReplicateWebhookError):
        verify_replicate_webhook(other_secret, headers, body)


def test_stale_or_unsigned_webhooks_are_rejected() -> None:
    secret = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
    body = json.dumps({"id": "p1", "status": "succeeded"})
    old = datetime.now(UTC) - timedelta(minutes=10)
    stale = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(int(old.timestamp())),
        "webhook-signature": Webhook(secret).sign("msg_1", old, body),
    }

    with pytest.raises(ReplicateWebhookError, match="too old"):
        verify_replicate_webhook(secret, stale, body)
    with pytest.raises(ReplicateWebhookError, match="Missing required headers"):
        verify_replicate_webhook(secret, {"webhook-id": "msg_1"}, body)
    fresh = {**stale, "webhook-timestamp": str(int(datetime.now(UTC).timestamp()))}
    with pytest.raises(ReplicateWebhookError, match="malformed"):
        verify_replicate_webhook(secret, {**fresh, "webhook-signature": "garbage"}, body)
