"""Storing a backend's image: an asked format is forced, otherwise PNG/JPEG/WEBP is kept
and anything else becomes PNG; the content type comes from the bytes."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from hypereal.backends.base import BackendError, MediaBlob
from hypereal.domain.images import in_format


def encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 4), (10, 200, 30)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("fmt", "content_type"),
    [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")],
)
def test_without_an_asked_format_the_backends_format_is_kept(fmt: str, content_type: str) -> None:
    data = encoded(fmt)
    blob = in_format(MediaBlob(data, "application/octet-stream"), None)  # a lying type
    assert blob == MediaBlob(data, content_type)


def test_without_an_asked_format_other_images_become_png() -> None:
    blob = in_format(MediaBlob(encoded("GIF"), "image/gif"), None)
    assert blob.content_type == "image/png" and blob.data.startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(blob.data)).size == (6, 4)


def test_an_asked_format_is_forced() -> None:
    blob = in_format(MediaBlob(encoded("WEBP"), "image/webp"), "image/jpeg")
    assert blob.content_type == "image/jpeg" and blob.data[:3] == b"\xff\xd8\xff"


def test_bytes_that_are_not_an_image_are_a_backend_error() -> None:
    with pytest.raises(BackendError, match="not an image"):
        in_format(MediaBlob(b'{"error": "x"}', "image/png"), None)
