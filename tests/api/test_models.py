"""The catalogue over HTTP, and its rules: defaults, unknown models, unavailable models."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest

from hypereal.domain.catalogue import load_catalogue
from hypereal.domain.errors import ModelRequired, ModelUnavailable, UnsupportedModel
from hypereal.domain.pricing import price
from hypereal.services import Services
from tests.conftest import MakeKey, auth


@pytest.mark.parametrize("prefix", ["/v1", "/api/v1"])
async def test_models_lists_every_model_with_price_and_availability(
    client: httpx.AsyncClient, make_key: MakeKey, prefix: str
) -> None:
    body = (await client.get(f"{prefix}/models", headers=auth(await make_key()))).json()
    counts = Counter(m["modality"] for m in body["data"])
    assert counts["video"] >= 14 and counts["image"] >= 6 and counts["image-edit"] >= 5
    assert counts["audio"] >= 3 and counts["3d"] >= 1 and counts["chat"] >= 1
    sora = next(m for m in body["data"] if m["id"] == "sora-2-i2v")
    assert sora["price"] == {"kind": "per_second", "credits_per_second": 13.8, "minimum": 13}
    assert {p["name"] for p in sora["params"]} >= {"prompt", "image", "duration"}
    assert sora["available"] is False and "not available" in sora["unavailableReason"]
    assert body["defaults"]["image"] == "nano-banana-t2i"


def test_catalogue_prices_match_the_spec() -> None:
    catalogue = load_catalogue()
    assert price(catalogue.models["sora-2-i2v"], {"duration": 5}) == 69
    assert price(catalogue.models["audio-voice-clone"], {}) == 107
    assert price(catalogue.models["image-to-3d"], {}) == 45
    for spec in catalogue.of_modality("video"):
        if spec.price.kind != "per_second":  # ai-avatar-i2v: priced per video (audio-long)
            continue
        duration = spec.param("duration")
        assert duration is not None
        values = list(duration.choices or [duration.minimum, duration.maximum])
        for seconds in values:
            assert 13 <= price(spec, {"duration": seconds}) <= 206, spec.slug
    for spec in catalogue.of_modality("image"):
        assert 4 <= price(spec, {}) <= 8
    for spec in catalogue.of_modality("image-edit"):
        assert 2 <= price(spec, {}) <= 24


def test_unknown_and_missing_models_have_the_spec_errors() -> None:
    catalogue = load_catalogue()
    assert catalogue.get(None, "image").slug == "nano-banana-t2i"
    with pytest.raises(ModelRequired) as missing:
        catalogue.get(None, "video")
    assert missing.value.body() == {"error": "Model is required"}
    with pytest.raises(UnsupportedModel) as unknown:
        catalogue.get("nope-9", "video")
    assert unknown.value.body() == {"error": "Unsupported video model: nope-9"}
    with pytest.raises(UnsupportedModel):
        catalogue.get("flux-1-schnell", "video")  # exists, but is not a video model


def test_model_without_backend_is_503_with_a_clear_reason(services: Services) -> None:
    spec = services.catalogue.models["veo-3-1-i2v"]
    with pytest.raises(ModelUnavailable) as caught:
        services.backends.resolve(spec)
    assert caught.value.status == 503
    assert "veo-3-1-i2v" in caught.value.message and "README" in caught.value.message


def test_operator_file_overrides_and_extends(tmp_path) -> None:  # type: ignore[no-untyped-def]
    override = tmp_path / "catalogue.toml"
    override.write_text(
        """
[[models]]
slug = "flux-1-schnell"
price = { credits = 4 }
bindings = [{ backend = "my-fal", upstream_model = "fal-ai/flux/schnell" }]

[[models]]
slug = "my-video"
template = "video-i2v"
name = "House video model"
price = { credits_per_second = 3, minimum = 15 }
bindings = [{ backend = "hypereal", upstream_model = "kling-3-0-std-i2v" }]
"""
    )
    catalogue = load_catalogue(override)
    assert catalogue.models["flux-1-schnell"].price.credits == 4
    assert catalogue.models["flux-1-schnell"].bindings[0].backend == "my-fal"
    assert catalogue.models["flux-1-schnell"].modality == "image"
    assert price(catalogue.models["my-video"], {"duration": 10}) == 30
    assert catalogue.models["sora-2-i2v"].price.credits_per_second == 13.8


PREFIXES = ["/v1", "/api/v1"]
IMAGE = "http://127.0.0.1/in.png"


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("path", ["videos/generate", "audio/generate", "3d/generate"])
async def test_missing_model_is_400_on_both_prefixes(
    client: httpx.AsyncClient, make_key: MakeKey, prefix: str, path: str
) -> None:
    key = auth(await make_key(credits=1000))
    response = await client.post(f"{prefix}/{path}", headers=key, json={"input": {"text": "x"}})
    assert response.status_code == 400
    assert response.json() == {"error": "Model is required"}


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(
    ("path", "modality"),
    [
        ("videos/generate", "video"),
        ("audio/generate", "audio"),
        ("3d/generate", "3d"),
        ("images/generate", "image"),
    ],
)
async def test_unsupported_model_is_400_on_both_prefixes(
    client: httpx.AsyncClient, make_key: MakeKey, prefix: str, path: str, modality: str
) -> None:
    key = auth(await make_key(credits=1000))
    body = {"model": "x", "prompt": "x", "input": {"prompt": "x"}}
    response = await client.post(f"{prefix}/{path}", headers=key, json=body)
    assert response.status_code == 400
    assert response.json() == {"error": f"Unsupported {modality} model: x"}


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (
            "videos/generate",
            f'{{"model": "camera-motion-i2v", "input": {{"image": "{IMAGE}", "duration": 1e400}}}}',
            "input.duration",
        ),
        (
            "videos/generate",
            f'{{"model": "camera-motion-i2v", "input": {{"image": "{IMAGE}", "duration": NaN}}}}',
            "input.duration",
        ),
        (
            "videos/generate",
            f'{{"model": "camera-motion-i2v", "input": {{"image": "{IMAGE}", "fps": -Infinity}}}}',
            "input.fps",
        ),
        (
            "videos/generate",
            f'{{"model": "camera-motion-i2v", "input": {{"image": "{IMAGE}", '
            f'"duration": 1{"0" * 400}}}}}',
            "input.duration",
        ),
        (
            "audio/generate",
            '{"model": "audio-tts", "input": {"text": "hi", "speed": NaN}}',
            "input.speed",
        ),
        (
            "audio/generate",
            '{"model": "audio-tts", "input": {"text": "hi", "speed": Infinity}}',
            "input.speed",
        ),
    ],
    ids=["int-1e400", "int-nan", "int-neg-inf", "int-huge", "number-nan", "number-inf"],
)
async def test_non_finite_numbers_are_400_naming_the_field_and_charge_nothing(
    client: httpx.AsyncClient, make_key: MakeKey, path: str, body: str, field: str
) -> None:
    key = auth(await make_key(credits=1000))
    response = await client.post(
        f"/v1/{path}",
        headers={**key, "content-type": "application/json"},
        content=body.encode(),
    )
    assert response.status_code == 400, response.text
    assert response.json() == {"error": f"Invalid value for '{field}': must be a finite number"}
    assert (await client.get("/v1/credits", headers=key)).json()["balance"] == 1000
    assert (await client.get("/v1/jobs", headers=key)).json()["data"] == []
