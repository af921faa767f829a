"""The documented error bodies on real endpoints, on both prefixes (/v1 and /api/v1).

401 for a bad key, 402 exactly ``{"error": "Insufficient credits", "required": N,
"available": M}`` with nothing charged and no job, 404 for an unknown route, 400 for a missing
model and for an unsupported one.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import MakeKey, auth

PREFIXES = ["/v1", "/api/v1"]


def png_uri() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (40, 90, 200)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(
    "request_",
    [
        ("GET", "credits"),
        ("GET", "usage"),
        ("GET", "models"),
        ("GET", "jobs"),
        ("POST", "images/generate"),
        ("POST", "videos/generate"),
        ("POST", "chat/completions"),
    ],
    ids=lambda r: r[1],
)
@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer", "Basic Y2tfeDp4", "Bearer ck_unknown"],
    ids=["missing", "empty-bearer", "basic", "unknown"],
)
async def test_401_body_on_both_prefixes(
    client: httpx.AsyncClient, prefix: str, request_: tuple[str, str], authorization: str | None
) -> None:
    method, path = request_
    headers = {"Authorization": authorization} if authorization is not None else {}
    response = await client.request(method, f"{prefix}/{path}", headers=headers, json={})
    assert response.status_code == 401
    body = response.json()
    assert list(body) == ["error"]
    if path.startswith("chat/completions"):  # an OpenAI-shaped route: OpenAI's error object
        assert body["error"]["type"] == "authentication_error"
        assert body["error"]["code"] == "invalid_api_key"
        assert body["error"]["message"].startswith("Unauthorized. ")
    else:
        assert body["error"].startswith("Unauthorized. ")


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(
    ("path", "body", "required"),
    [
        ("audio/generate", {"model": "audio-tts", "input": {"text": "hello"}}, 3),
        (
            "images/generate",
            {"model": "image-transform", "prompt": "upscale 2x", "image": "PNG"},
            2,
        ),
        (
            "videos/generate",
            {"model": "camera-motion-i2v", "input": {"image": "PNG", "duration": 5}},
            13,
        ),
        ("3d/generate", {"model": "relief-3d", "input": {"image": "PNG"}}, 5),
    ],
    ids=["audio", "image-edit", "video", "3d"],
)
async def test_402_body_is_exact_and_nothing_is_charged_on_both_prefixes(
    client: httpx.AsyncClient,
    make_key: MakeKey,
    prefix: str,
    path: str,
    body: dict[str, Any],
    required: int,
) -> None:
    key = auth(await make_key(credits=1))
    image = png_uri()

    def fill(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return image if value == "PNG" else value

    response = await client.post(f"{prefix}/{path}", headers=key, json=fill(body))
    assert response.status_code == 402, response.text
    assert response.json() == {
        "error": "Insufficient credits",
        "required": required,
        "available": 1,
    }
    assert (await client.get(f"{prefix}/credits", headers=key)).json()["balance"] == 1
    usage = (await client.get(f"{prefix}/usage", headers=key)).json()["data"]
    assert [entry["amount"] for entry in usage] == [1]  # only the grant
    assert (await client.get(f"{prefix}/jobs", headers=key)).json()["data"] == []


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "no-such-thing"), ("POST", "videos/nope"), ("GET", "jobs/job_doesnotexist")],
)
async def test_404_body_on_both_prefixes(
    client: httpx.AsyncClient, make_key: MakeKey, prefix: str, method: str, path: str
) -> None:
    response = await client.request(
        method, f"{prefix}/{path}", headers=auth(await make_key()), json={}
    )
    assert response.status_code == 404
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("path", ["videos/generate", "audio/generate", "3d/generate"])
@pytest.mark.parametrize("model", [None, ""], ids=["absent", "empty"])
async def test_missing_model_is_400_on_both_prefixes_and_charges_nothing(
    client: httpx.AsyncClient, make_key: MakeKey, prefix: str, path: str, model: str | None
) -> None:
    key = auth(await make_key(credits=1000))
    body: dict[str, Any] = {"input": {"text": "x", "prompt": "x"}}
    if model is not None:
        body["model"] = model
    response = await client.post(f"{prefix}/{path}", headers=key, json=body)
    assert response.status_code == 400
    assert response.json() == {"error": "Model is required"}
    assert (await client.get(f"{prefix}/credits", headers=key)).json()["balance"] == 1000


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(
    ("path", "modality", "slug"),
    [
        ("videos/generate", "video", "no-such-video"),
        ("videos/generate", "video", "audio-tts"),  # a model of another modality
        ("audio/generate", "audio", "sora-2-i2v"),
        ("3d/generate", "3d", "nano-banana-t2i"),
        ("images/generate", "image", "kling-2-6-i2v-pro"),
        ("chat/completions", "chat", "gpt-nope"),
    ],
)
async def test_unsupported_model_is_400_on_both_prefixes_and_charges_nothing(
    client: httpx.AsyncClient,
    make_key: MakeKey,
    prefix: str,
    path: str,
    modality: str,
    slug: str,
) -> None:
    key = auth(await make_key(credits=1000))
    body = {
        "model": slug,
        "prompt": "x",
        "input": {"prompt": "x", "text": "x"},
        "messages": [{"role": "user", "content": "hi"}],
    }
    response = await client.post(f"{prefix}/{path}", headers=key, json=body)
    assert response.status_code == 400
    message = f"Unsupported {modality} model: {slug}"
    if path == "chat/completions":  # an OpenAI-shaped route: OpenAI's error object
        assert response.json() == {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        }
    else:
        assert response.json() == {"error": message}
    assert (await client.get(f"{prefix}/credits", headers=key)).json()["balance"] == 1000
