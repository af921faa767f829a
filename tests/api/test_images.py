"""Images over HTTP: the spec's response shape, stored media served with the right type,
local edits, upstreams (fal and OpenAI protocols) end to end, size/aspect_ratio/format
handling, results recorded as jobs, refunds, 402, 503 and input guards (fetch timeout)."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from hypereal.app import create_app
from hypereal.domain import keys, ledger
from hypereal.services import Services, build_services
from hypereal.settings import Settings
from tests.support.fal_server import FalFake, FalScenario
from tests.support.openai_server import OpenAIFake
from tests.support.servers import serve_app, silent_server


def png_uri(width: int = 40, height: int = 30) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def fal() -> Iterator[tuple[FalFake, str]]:
    fake = FalFake()
    with serve_app(fake.app) as url:
        yield fake, url


@pytest.fixture
def openai() -> Iterator[tuple[OpenAIFake, str]]:
    fake = OpenAIFake()
    with serve_app(fake.app) as url:
        yield fake, url


@pytest.fixture
async def image_services(
    tmp_path: Path, fal: tuple[FalFake, str], openai: tuple[OpenAIFake, str]
) -> AsyncIterator[Services]:
    settings = Settings(
        data_dir=tmp_path / "data",
        bootstrap_admin=False,
        public_url="http://testserver",
        backends={
            "fal": {
                "type": "fal",
                "api_key": "fal-test-key",
                "base_url": fal[1],
                "poll_interval": 0.01,
            },
            "openai": {"type": "openai", "api_key": "sk-test", "base_url": openai[1] + "/v1"},
        },
    )
    services = build_services(settings)
    await services.migrate()
    yield services
    await services.close()


@pytest.fixture
async def client(image_services: Services) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(image_services.settings, services=image_services)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            yield c


async def user(services: Services, credits: int) -> tuple[dict[str, str], str]:
    account = await keys.create_account(services.db, "images")
    if credits:
        await ledger.grant(services.db, account, credits)
    key = (await keys.create_key(services.db, account)).secret
    return {"Authorization": f"Bearer {key}"}, account


async def download(client: httpx.AsyncClient, url: str) -> httpx.Response:
    response = await client.get(url)  # media URLs need no auth
    assert response.status_code == 200
    return response


@pytest.mark.parametrize("prefix", ["/v1", "/api/v1"])
async def test_local_edit_has_the_spec_shape_and_a_downloadable_result(
    client: httpx.AsyncClient, image_services: Services, prefix: str
) -> None:
    headers, account = await user(image_services, 10)
    response = await client.post(
        f"{prefix}/images/generate",
        headers=headers,
        json={"prompt": "upscale 2x", "model": "image-transform", "image": png_uri(), "extra": 1},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"created", "data", "resultId", "creditsUsed"}
    assert body["creditsUsed"] == 2 and body["resultId"].startswith("res_")
    assert body["data"][0]["model"] == "image-transform"
    url = body["data"][0]["url"]
    assert url.startswith("http://testserver/files/image/")
    file = await download(client, url)
    assert file.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(file.content)).size == (80, 60)
    assert await ledger.balance(image_services.db, account) == 8


async def test_edit_endpoint_accepts_images_list_and_output_format(
    client: httpx.AsyncClient, image_services: Services
) -> None:
    headers, _ = await user(image_services, 10)
    response = await client.post(
        "/v1/images/edit",
        headers=headers,
        json={
            "prompt": "make it black and white",
            "model": "image-transform",
            "images": [png_uri()],
            "output_format": "webp",
        },
    )
    assert response.status_code == 200, response.text
    file = await download(client, response.json()["data"][0]["url"])
    assert file.headers["content-type"] == "image/webp"
    assert file.content[8:12] == b"WEBP"


async def test_edit_endpoint_without_model_uses_the_default_edit_model(
    client: httpx.AsyncClient, image_services: Services
) -> None:
    headers, account = await user(image_services, 10)
    response = await client.post(
        "/v1/images/edit", headers=headers, json={"prompt": "add a hat", "image": png_uri()}
    )
    # nano-banana-edit is served by the hosted or fal backend; fal is configured here.
    assert response.status_code == 200, response.text
    assert response.json()["data"][0]["model"] == "nano-banana-edit"
    assert response.json()["creditsUsed"] == 6
    assert await ledger.balance(image_services.db, account) == 4


async def test_upstream_text_to_image_is_stored_and_converted_to_the_asked_format(
    client: httpx.AsyncClient, image_services: Services, fal: tuple[FalFake, str]
) -> None:
    headers, account = await user(image_services, 10)
    response = await client.post(
        "/v1/images/generate",
        headers=headers,
        json={
            "prompt": "a city",
            "model": "flux-1-schnell",
            "size": "512x512",
            "output_format": "jpeg",
        },
    )
    assert response.status_code == 200, response.text
    submission = fal[0].submissions[-1]
    assert submission.model_id == "fal-ai/flux/schnell"
    assert submission.payload["prompt"] == "a city"
    file = await download(client, response.json()["data"][0]["url"])
    assert file.headers["content-type"] == "image/jpeg" and file.content[:3] == b"\xff\xd8\xff"
    assert await ledger.balance(image_services.db, account) == 5


async def test_backend_failure_is_refunded_and_reported_as_json(
    client: httpx.AsyncClient, image_services: Services, fal: tuple[FalFake, str]
) -> None:
    fal[0].set_scenario(
        "fal-ai/flux/dev", FalScenario(result_error=500, error_detail="GPU fell over")
    )
    headers, account = await user(image_services, 10)
    response = await client.post(
        "/v1/images/generate", headers=headers, json={"prompt": "x", "model": "flux-1-dev"}
    )
    assert response.status_code >= 500
    assert response.json()["error"].startswith("Image generation failed")
    assert await ledger.balance(image_services.db, account) == 10
    kinds = [e.kind for e in await ledger.entries(image_services.db, account)]
    assert kinds == ["refund", "debit", "grant"]


async def test_upstream_rejection_of_the_request_is_a_refunded_400(
    client: httpx.AsyncClient, image_services: Services, fal: tuple[FalFake, str]
) -> None:
    fal[0].set_scenario("fal-ai/flux/dev", FalScenario(submit_error=422, error_detail="bad prompt"))
    headers, account = await user(image_services, 10)
    response = await client.post(
        "/v1/images/generate", headers=headers, json={"prompt": "x", "model": "flux-1-dev"}
    )
    assert response.status_code == 400
    assert await ledger.balance(image_services.db, account) == 10


async def test_402_when_the_balance_is_short(
    client: httpx.AsyncClient, image_services: Services
) -> None:
    headers, _ = await user(image_services, 1)
    response = await client.post(
        "/v1/images/generate",
        headers=headers,
        json={"prompt": "upscale 2x", "model": "image-transform", "image": png_uri()},
    )
    assert response.status_code == 402
    assert response.json() == {"error": "Insufficient credits", "required": 2, "available": 1}


async def test_402_without_inputs_comes_from_the_reservation_and_calls_no_backend(
    client: httpx.AsyncClient, image_services: Services, fal: tuple[FalFake, str]
) -> None:
    headers, account = await user(image_services, 4)
    submitted = len(fal[0].submissions)
    response = await client.post(
        "/v1/images/generate", headers=headers, json={"prompt": "x", "model": "flux-1-schnell"}
    )
    assert response.status_code == 402
    assert response.json() == {"error": "Insufficient credits", "required": 5, "available": 4}
    assert len(fal[0].submissions) == submitted  # the upstream was never asked
    assert await ledger.balance(image_services.db, account) == 4


async def test_model_without_backend_is_503_and_charges_nothing(
    client: httpx.AsyncClient, image_services: Services
) -> None:
    headers, account = await user(image_services, 10)
    response = await client.post(
        "/v1/images/generate",
        headers=headers,
        json={"prompt": "x", "model": "gemini-3-1-flash-t2i"},
    )
    assert response.status_code == 503
    assert "gemini-3-1-flash-t2i" in response.json()["error"]
    assert "README" in response.json()["error"]
    assert await ledger.balance(image_services.db, account) == 10


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"model": "flux-1-schnell"}, 400, "Missing required field 'prompt'"),
        ({"prompt": "x", "model": "flux-1-schnell", "size": "huge"}, 400, "'size'"),
        ({"prompt": "x", "model": "flux-1-schnell", "size": "10*10"}, 400, "'size'"),
        (
            {"prompt": "x", "model": "flux-1-schnell", "output_format": "bmp"},
            400,
            "'output_format'",
        ),
        ({"prompt": "x", "model": "no-such-model"}, 400, "Unsupported image model: no-such-model"),
        ({"prompt": "x", "model": "sora-2-i2v"}, 400, "Unsupported image model: sora-2-i2v"),
        ({"prompt": "x", "model": "image-transform"}, 400, "Missing required field 'images'"),
        (
            {"prompt": "x", "model": "image-transform", "image": "http://127.0.0.1/a.png"},
            400,
            "not a public address",
        ),
        (
            {"prompt": "x", "model": "image-transform", "image": "http://169.254.169.254/x"},
            400,
            "not a public address",
        ),
        (
            {"prompt": "x", "model": "image-transform", "image": "data:text/plain,hi"},
            400,
            "not a supported image",
        ),
        ({"prompt": "dance", "model": "image-transform", "image": png_uri()}, 400, ""),
    ],
)
async def test_bad_requests_are_400_and_charge_nothing(
    client: httpx.AsyncClient,
    image_services: Services,
    body: dict[str, Any],
    status: int,
    message: str,
) -> None:
    headers, account = await user(image_services, 10)
    response = await client.post("/v1/images/generate", headers=headers, json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert await ledger.balance(image_services.db, account) == 10


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"prompt":"\\ud800","model":"image-transform","image":"%s"}', "prompt"),
        (b'{"prompt":"upscale 2x","model":"image-transform","images":["\\udfff"]}', "images[0]"),
        (b'{"prompt":"x","model":"\\ud800"}', "model"),
    ],
)
async def test_a_lone_surrogate_is_a_400_and_charges_nothing(
    client: httpx.AsyncClient, image_services: Services, body: bytes, field: str
) -> None:
    headers, account = await user(image_services, 10)
    if b"%s" in body:
        body = body % png_uri().encode()
    response = await client.post(
        "/v1/images/generate",
        headers={**headers, "Content-Type": "application/json"},
        content=body,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(f"Invalid value for '{field}': ")
    assert await ledger.balance(image_services.db, account) == 10


@pytest.mark.parametrize("url", ["http://0177.0.0.1:8690/k0", "http://01.02.03.04/x.png"])
@pytest.mark.parametrize("field", ["image", "images"])
async def test_a_leading_zero_ipv4_image_url_is_a_400_and_charges_nothing(
    client: httpx.AsyncClient, image_services: Services, url: str, field: str
) -> None:
    headers, account = await user(image_services, 10)
    body = {"prompt": "upscale 2x", "model": "image-transform", field: url}
    response = await client.post("/v1/images/edit", headers=headers, json=body)
    assert response.status_code == 400, response.text
    assert "'images[0]'" in response.json()["error"]
    assert await ledger.balance(image_services.db, account) == 10


async def test_aspect_ratio_reaches_the_backend_as_a_wide_request(
    client: httpx.AsyncClient,
    image_services: Services,
    fal: tuple[FalFake, str],
    openai: tuple[OpenAIFake, str],
) -> None:
    headers, _ = await user(image_services, 100)
    wide = {"prompt": "a beach", "aspect_ratio": "16:9"}
    response = await client.post(
        "/v1/images/generate", headers=headers, json={**wide, "model": "gpt-image-1"}
    )
    assert response.status_code == 200, response.text
    assert openai[0].requests[-1].body["size"] == "1536x1024"  # GPT image's landscape size

    response = await client.post(
        "/v1/images/generate", headers=headers, json={**wide, "model": "flux-1-schnell"}
    )
    assert response.status_code == 200, response.text
    payload = fal[0].submissions[-1].payload
    assert payload["aspect_ratio"] == "16:9"
    assert "image_size" not in payload  # no square size contradicting the ratio


async def test_size_is_sent_only_when_the_client_names_one(
    client: httpx.AsyncClient,
    image_services: Services,
    fal: tuple[FalFake, str],
    openai: tuple[OpenAIFake, str],
) -> None:
    headers, _ = await user(image_services, 100)
    response = await client.post(
        "/v1/images/generate", headers=headers, json={"prompt": "x", "model": "gpt-image-1"}
    )
    assert response.status_code == 200, response.text
    assert "size" not in openai[0].requests[-1].body  # the model's own default

    response = await client.post(
        "/v1/images/generate",
        headers=headers,
        json={"prompt": "x", "model": "flux-1-schnell", "size": "640*480"},
    )
    assert response.status_code == 200, response.text
    assert fal[0].submissions[-1].payload["image_size"] == {"width": 640, "height": 480}


@pytest.mark.parametrize(
    ("extra", "content_type"),
    [
        ({}, "image/webp"),  # the prompt's format is kept
        ({"output_format": "png"}, "image/png"),  # an explicit output_format wins
    ],
)
async def test_a_format_named_in_the_prompt_is_kept_unless_output_format_is_sent(
    client: httpx.AsyncClient,
    image_services: Services,
    extra: dict[str, str],
    content_type: str,
) -> None:
    headers, _ = await user(image_services, 10)
    response = await client.post(
        "/v1/images/generate",
        headers=headers,
        json={"prompt": "convert to webp", "model": "image-transform", "image": png_uri(), **extra},
    )
    assert response.status_code == 200, response.text
    url = response.json()["data"][0]["url"]
    assert url.endswith("." + content_type.split("/")[1])
    file = await download(client, url)
    assert file.headers["content-type"] == content_type
    assert Image.open(io.BytesIO(file.content)).format == content_type.split("/")[1].upper()


@pytest.mark.parametrize("path", ["/v1/images/generate", "/v1/images/edit"])
async def test_a_result_is_recorded_as_a_completed_image_job(
    client: httpx.AsyncClient, image_services: Services, path: str
) -> None:
    headers, _ = await user(image_services, 10)
    response = await client.post(
        path,
        headers=headers,
        json={"prompt": "rotate 90", "model": "image-transform", "image": png_uri()},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    job = await client.get(f"/v1/jobs/{body['resultId']}?type=image", headers=headers)
    assert job.status_code == 200, job.text
    assert job.json()["status"] == "completed"
    assert job.json()["type"] == "image" and job.json()["model"] == "image-transform"
    assert job.json()["outputUrl"] == body["data"][0]["url"]
    assert job.json()["creditsUsed"] == 2
    other, _ = await user(image_services, 0)
    hidden = await client.get(f"/v1/jobs/{body['resultId']}?type=image", headers=other)
    assert hidden.status_code == 404


async def test_a_result_that_cannot_be_recorded_is_refunded(
    client: httpx.AsyncClient, image_services: Services
) -> None:
    headers, account = await user(image_services, 10)
    async with image_services.db.engine.begin() as connection:
        await connection.exec_driver_sql("DROP TABLE jobs")  # recording now fails for real
    response = await client.post(
        "/v1/images/generate",
        headers=headers,
        json={"prompt": "upscale 2x", "model": "image-transform", "image": png_uri()},
    )
    assert response.status_code == 500
    assert await ledger.balance(image_services.db, account) == 10
    kinds = [e.kind for e in await ledger.entries(image_services.db, account)]
    assert kinds == ["refund", "debit", "grant"]


async def test_an_input_url_that_never_answers_is_a_400_after_the_fetch_timeout(
    tmp_path: Path,
) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        bootstrap_admin=False,
        public_url="http://testserver",
        allowed_private_networks=["127.0.0.0/8"],
        fetch_timeout_seconds=0.3,
    )
    services = build_services(settings)
    await services.migrate()
    app = create_app(settings, services=services)
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://testserver"
            ) as http,
            silent_server() as base,
        ):
            headers, account = await user(services, 10)
            # The default fetch timeout is 30 s: returning at all within 10 s shows the
            # setting is used.
            response = await asyncio.wait_for(
                http.post(
                    "/v1/images/generate",
                    headers=headers,
                    json={"prompt": "upscale 2x", "model": "image-transform", "image": base},
                ),
                10,
            )
            assert response.status_code == 400, response.text
            assert response.json()["error"].startswith("Timed out fetching 'images[0]'")
            assert await ledger.balance(services.db, account) == 10
    finally:
        await services.close()
