"""The one image codec (:mod:`hypereal.media.images`) as backends use it: its refusals
become client :class:`~hypereal.backends.base.BackendError`\\ s (the request's image or its
asked-for output is at fault), and pixel caps read from backend options."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from PIL import Image

from hypereal.backends.base import BackendError, BackendUnavailable
from hypereal.media import images
from hypereal.media.blob import MediaBlob
from hypereal.media.images import (
    CONTENT_TYPES,
    DEFAULT_MAX_INPUT_PIXELS,
    DEFAULT_MAX_OUTPUT_PIXELS,
    flatten,
    has_alpha,
)

__all__ = [
    "CONTENT_TYPES",
    "DEFAULT_MAX_INPUT_PIXELS",
    "DEFAULT_MAX_OUTPUT_PIXELS",
    "check_pixels",
    "decode_image",
    "encode_image",
    "flatten",
    "has_alpha",
    "input_pixel_cap",
    "normalise_format",
    "pixel_cap_option",
]


@contextmanager
def _as_client_errors() -> Iterator[None]:
    try:
        yield
    except images.ImageRejected as exc:
        raise BackendError(exc.message, client_error=True) from exc


def decode_image(blob: MediaBlob, *, max_pixels: int, what: str = "source image") -> Image.Image:
    """:func:`hypereal.media.images.decode_image`; a refusal is a client BackendError."""
    with _as_client_errors():
        return images.decode_image(blob, max_pixels=max_pixels, what=what)


def encode_image(
    img: Image.Image,
    output_format: str,
    *,
    quality: int | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
) -> MediaBlob:
    """:func:`hypereal.media.images.encode_image`; a refusal is a client BackendError."""
    with _as_client_errors():
        return images.encode_image(img, output_format, quality=quality, background=background)


def normalise_format(value: str | None) -> str:
    """:func:`hypereal.media.images.normalise_format`; a refusal is a client BackendError."""
    with _as_client_errors():
        return images.normalise_format(value)


def check_pixels(width: int, height: int, max_pixels: int, what: str) -> None:
    """:func:`hypereal.media.images.check_pixels`; a refusal is a client BackendError."""
    with _as_client_errors():
        images.check_pixels(width, height, max_pixels, what)


def pixel_cap_option(options: Mapping[str, Any], name: str, default: int) -> int:
    """Read a positive integer pixel cap from backend options.

    Raises BackendUnavailable (a configuration error) when the value is not a positive int.
    """
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BackendUnavailable(f"option {name!r} must be a positive integer, got {value!r}")
    return value


def input_pixel_cap(options: Mapping[str, Any]) -> int:
    """The ``max_input_pixels`` option: the largest input image a backend decodes."""
    return pixel_cap_option(options, "max_input_pixels", DEFAULT_MAX_INPUT_PIXELS)
