"""Synchronous image generation and editing on the generation pipeline
(``domain/generation.py``): validate, resolve the backend, fetch inputs, reserve, generate,
store, record; refund when generation, storing or recording fails.

Everything that can be refused (bad field, unknown model, no backend, unreachable input
image) is refused before any credit is taken.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hypereal.backends.base import BackendError, ImageRequest, MediaBlob
from hypereal.domain import jobs, keys, ledger
from hypereal.domain.catalogue import ModelSpec, validate_params
from hypereal.domain.errors import BadRequest, InsufficientCredits
from hypereal.domain.generation import Pipeline, client_error, has_inputs
from hypereal.domain.ids import new_id
from hypereal.domain.pricing import price
from hypereal.media.images import (
    CONTENT_TYPES,
    DEFAULT_MAX_OUTPUT_PIXELS,
    ImageRejected,
    decode_image,
    encode_image,
    format_of,
    normalise_format,
)
from hypereal.media.sniff import sniff_content_type

MIN_SIDE, MAX_SIDE = 64, 4096
SIZE_PATTERN = re.compile(r"^\s*(\d{1,5})\s*[*xX×]\s*(\d{1,5})\s*$")  # noqa: RUF001


@dataclass(frozen=True)
class ImageResult:
    result_id: str
    created: int
    urls: list[str]
    credits: int
    model: str
    keys: list[str] = field(default_factory=list)  # media store keys of ``urls``


def parse_size(value: object) -> tuple[int, int] | None:
    """``"1024*1024"`` or ``"1024x1024"`` -> (1024, 1024). Raises BadRequest naming 'size'."""
    if value is None or value == "":
        return None
    match = SIZE_PATTERN.match(str(value))
    if not match:
        raise BadRequest(
            "Invalid value for 'size': expected WIDTHxHEIGHT or WIDTH*HEIGHT, e.g. 1024*1024"
        )
    width, height = int(match.group(1)), int(match.group(2))
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise BadRequest(
            f"Invalid value for 'size': each side must be between {MIN_SIDE} and {MAX_SIDE}"
        )
    return width, height


def source_urls(image: object, images: object) -> list[str] | None:
    """Merge the ``image`` and ``images`` fields (clients send either)."""
    urls: list[Any] = []
    for value in (images, image):
        if value is None:
            continue
        urls.extend(value if isinstance(value, list) else [value])
    if not urls:
        return None
    if not all(isinstance(u, str) and u for u in urls):
        raise BadRequest("Invalid value for 'images': must be URLs or data: URIs")
    return urls


def in_format(blob: MediaBlob, wanted: str | None) -> MediaBlob:
    """The blob as ``wanted`` (a MIME type), converting when a backend answered otherwise.

    With ``wanted`` None (the client named no ``output_format``) the backend's PNG, JPEG or
    WEBP is kept as it is (a local edit may pick the format from the prompt, e.g. "convert
    to webp"); any other image type is converted to PNG. The content type always comes
    from the bytes. Raises BackendError when the bytes are not an image.
    """
    actual = sniff_content_type(blob.data)
    if actual is None or not actual.startswith("image/"):
        raise BackendError(f"backend returned {actual or 'unrecognised data'}, not an image")
    if wanted is None:
        wanted = actual if format_of(actual) else "image/png"
    if actual == wanted:
        return MediaBlob(blob.data, wanted)
    try:
        image = decode_image(blob, max_pixels=DEFAULT_MAX_OUTPUT_PIXELS, what="backend's image")
        return encode_image(image, format_of(wanted) or "png")
    except ImageRejected as exc:
        raise BackendError(f"backend returned an image that cannot be converted: {exc}") from exc


def request_size(params: Mapping[str, Any], values: Mapping[str, Any]) -> tuple[int, int] | None:
    """Width and height to ask the backend for: the ``size`` the client sent, else a
    catalogue default for ``size`` unless the client sent ``aspect_ratio`` (then the
    backend picks a size of that shape). None leaves the size to the backend."""
    sent_size = values.get("size") not in (None, "")
    if not sent_size and params.get("aspect_ratio"):
        return None
    return parse_size(params.get("size"))


async def generate(
    pipeline: Pipeline, account_id: str, spec: ModelSpec, values: Mapping[str, Any]
) -> ImageResult:
    """Run one image request. Raises BadRequest/UnsupportedModel (400), ModelUnavailable
    (503), InsufficientCredits (402) before charging; GenerationFailed (500, refunded) or
    BadRequest (400, refunded) when the backend fails."""
    keys.check_model(spec.slug)  # the key's allow-list first (403)
    params = validate_params(spec, values)
    size = request_size(params, values)
    resolved = pipeline.resolve(spec)
    credits = price(spec, params)
    if has_inputs(spec, params):
        # The balance before any fetch: a short one is a 402 before network traffic (the
        # reservation below re-checks atomically, and alone answers the 402 when nothing
        # is fetched).
        available = await ledger.balance(pipeline.db, account_id)
        if available < credits:
            raise InsufficientCredits(required=credits, available=available)
    sources = await pipeline.fetch_inputs(spec, params)
    # Only an output_format the request (or the model's catalogue default) names is forced.
    named_format = params.get("output_format")
    wanted = CONTENT_TYPES[normalise_format(str(named_format))] if named_format else None
    request = ImageRequest(
        prompt=str(params.get("prompt") or ""),
        width=size[0] if size else None,
        height=size[1] if size else None,
        aspect_ratio=params.get("aspect_ratio"),
        output_format=(wanted or "image/png").split("/")[1],
        images=tuple(sources.values()),
        upstream_model=resolved.upstream_model,
        params={k: v for k, v in params.items() if k not in ("prompt", "images", "size")},
        upstream_bill={} if spec.pass_through is not None else None,
    )
    result_id = new_id("res")
    charge = await pipeline.reserve(
        account_id, credits, reference=result_id, label=f"image {spec.slug}", model=spec.slug
    )
    try:
        blobs = await asyncio.wait_for(
            resolved.backend.generate_images(request), spec.timeout_seconds
        )
        if not blobs:
            raise BackendError("the backend returned no images")
        stored = [await pipeline.store(in_format(blob, wanted), "image") for blob in blobs]
        if spec.pass_through is not None:  # the upstream's bill x markup, settled below
            credits = spec.pass_through.charge((request.upstream_bill or {}).get("credits_used"))
        # Inside the refunded section: a result that cannot be recorded is not charged.
        await jobs.record_completed(
            pipeline.db,
            job_id=result_id,
            account_id=account_id,
            type="image",
            model=spec.slug,
            input={k: v for k, v in params.items() if k != "images"},
            credits=credits,
            debit_entry_id=charge.entry_id,
            output_url=stored[0].url,
            output_key=stored[0].key,
            result={"urls": [media.url for media in stored]},
        )
    except BaseException as exc:
        await charge.refund()
        if isinstance(exc, Exception):
            raise client_error(
                exc, what="Image generation", timeout_seconds=spec.timeout_seconds
            ) from exc
        raise
    if spec.pass_through is not None:
        await charge.settle(credits, note=f"image {spec.slug}: upstream bill x markup")
    return ImageResult(
        result_id=result_id,
        created=int(time.time()),
        urls=[media.url for media in stored],
        credits=credits,
        model=spec.slug,
        keys=[media.key for media in stored],
    )
