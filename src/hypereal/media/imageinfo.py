"""Refusing an input image too large to decode (a decompression bomb: a few KiB of PNG that
inflate to gigabytes of pixels) at submission, before anything is charged or any backend
decodes it: its dimensions come from its header alone (``media/images.header_size``)."""

from __future__ import annotations

from hypereal.media.blob import MediaBlob
from hypereal.media.images import ImageRejected, check_size, header_size


def check_image_header(blob: MediaBlob, field: str, max_pixels: int) -> None:
    """Refuse an input image whose header cannot be read or whose dimensions exceed
    ``max_pixels`` (ImageRejected naming ``field``: a 400 for the caller). Other media pass
    untouched."""
    if not blob.content_type.startswith("image/"):
        return
    size = header_size(blob.data)
    if size is None:
        raise ImageRejected(f"Invalid value for '{field}': not a readable image")
    check_size(*size, max_pixels, f"Invalid value for '{field}': the image is")
