"""Refusing an input image too large to decode (a decompression bomb: a few KiB of PNG that
inflate to gigabytes of pixels) at submission, before anything is charged or any backend
decodes it: its dimensions come from its header alone (``media/images.header_size``)."""

from __future__ import annotations

from hypereal.media.blob import MediaBlob
from hypereal.media.images import ImageRejected, header_size


def check_image_header(blob: MediaBlob, field: str, max_pixels: int) -> None:
    """Refuse an input image whose header cannot be read or whose dimensions exceed
    ``max_pixels`` (ImageRejected naming ``field``: a 400 for the caller). Other media pass
    untouched."""
    if not blob.content_type.startswith("image/"):
        return
    size = header_size(blob.data)
    if size is None:
        raise ImageRejected(f"Invalid value for '{field}': not a readable image")
    width, height = size
    if width < 1 or height < 1:
        raise ImageRejected(f"Invalid value for '{field}': the image is empty ({width}x{height})")
    if width * height > max_pixels:
        raise ImageRejected(
            f"Invalid value for '{field}': the image is {width}x{height} = "
            f"{width * height:,} pixels, over this server's limit of {max_pixels:,}"
        )
