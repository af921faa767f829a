"""Output sizes: multiples of 16 (FLUX and Wan work on 16x16 pixel patches), at most
``max_pixels``, shaped by an aspect ratio, one side or the source image."""

from __future__ import annotations

import math
from typing import Any

from PIL import Image

from hypereal.backends.base import BackendError, ImageRequest
from hypereal.backends.diffusers.options import (
    DEFAULT_IMAGE_AREA,
    SIZE_MULTIPLE,
    VIDEO_SHORT_SIDES,
)


def round16(value: float) -> int:
    # Half up (not Python's round-half-even), so 1000 -> 1008 like 1080 -> 1088.
    return max(SIZE_MULTIPLE, math.floor(value / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE)


def parse_ratio(text: str) -> float:
    try:
        w, _, h = text.replace("/", ":").partition(":")
        ratio = float(w) / float(h)
    except (ValueError, ZeroDivisionError):
        raise BackendError(
            f"aspect_ratio must look like '16:9', not {text!r}", client_error=True
        ) from None
    if not 1 / 8 <= ratio <= 8:
        raise BackendError(f"aspect_ratio {text!r} is too extreme", client_error=True)
    return ratio


def fit(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """Scale down (keeping the aspect ratio) until width * height <= max_pixels."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))

    def down(value: int) -> int:
        return max(SIZE_MULTIPLE, int(value * scale) // SIZE_MULTIPLE * SIZE_MULTIPLE)

    return down(width), down(height)


def image_size(
    request: ImageRequest, source: Image.Image | None, max_pixels: int
) -> tuple[int, int, str | None]:
    """(width, height, note) for an image request; the note says how the size was changed."""
    width, height = request.width, request.height
    if width is None and height is None:
        size = request.params.get("size")
        if isinstance(size, str) and size.strip():
            parts = size.lower().replace("*", "x").split("x")
            try:
                width, height = (int(p) for p in parts)
            except ValueError:
                raise BackendError(
                    f"size must be WIDTHxHEIGHT, not {size!r}", client_error=True
                ) from None
    for name, value in (("width", width), ("height", height)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value <= 0
        ):
            raise BackendError(f"{name} must be a positive integer", client_error=True)

    ratio: float | None = None
    if request.aspect_ratio:
        ratio = parse_ratio(request.aspect_ratio)
    elif source is not None and (width is None or height is None):
        ratio = source.width / source.height  # edits keep their source's shape by default
    if width is not None and height is not None:
        w, h = float(width), float(height)
    elif width is not None:
        w, h = float(width), width / (ratio or 1.0)
    elif height is not None:
        w, h = height * (ratio or 1.0), float(height)
    else:
        r = ratio or 1.0
        w, h = math.sqrt(DEFAULT_IMAGE_AREA * r), math.sqrt(DEFAULT_IMAGE_AREA / r)
    out_w, out_h = fit(round16(w), round16(h), max_pixels)
    note = None
    if width is not None and height is not None and (out_w, out_h) != (width, height):
        note = (
            f"requested {width}x{height}, generating {out_w}x{out_h} (multiples of "
            f"{SIZE_MULTIPLE}, at most {max_pixels} pixels)"
        )
    return out_w, out_h, note


def video_size(
    resolution: Any, aspect_ratio: Any, width: Any, height: Any, source: Image.Image | None
) -> tuple[int, int]:
    if width is not None or height is not None:
        if not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height)
        ):
            raise BackendError("width and height must both be positive integers", client_error=True)
        return round16(width), round16(height)
    short = VIDEO_SHORT_SIDES.get(str(resolution or "720p"))
    if short is None:
        raise BackendError(
            f"resolution must be one of {', '.join(VIDEO_SHORT_SIDES)}, not {resolution!r}",
            client_error=True,
        )
    if aspect_ratio:
        ratio = parse_ratio(str(aspect_ratio))
    elif source is not None:
        ratio = source.width / source.height
    else:
        ratio = 16 / 9
    if ratio >= 1:
        return round16(short * ratio), round16(short)
    return round16(short), round16(short / ratio)
