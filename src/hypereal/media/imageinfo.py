"""Image dimensions from the header alone, so a submission can refuse an image too large to
decode (a decompression bomb: a few KiB of PNG that inflate to gigabytes of pixels) before
anything is charged or any backend decodes it. Pillow's ``Image.open`` reads only the header;
no pixel data is decoded here."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from hypereal.backends.base import MediaBlob
from hypereal.domain.errors import BadRequest

# The formats input images may be in (what the local backends decode).
INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) read from the image's header, or None when the bytes are not an
    image Pillow can identify. Never decodes pixels. Raises ``Image.DecompressionBombError``
    for a header over twice Pillow's own pixel cap."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=INPUT_FORMATS) as img:
                return img.size
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
            return None


def check_image_header(blob: MediaBlob, field: str, max_pixels: int) -> None:
    """Refuse an input image whose header cannot be read or whose dimensions exceed
    ``max_pixels`` (BadRequest naming ``field``). Other media pass untouched."""
    if not blob.content_type.startswith("image/"):
        return
    try:
        size = image_size(blob.data)
    except Image.DecompressionBombError:
        raise BadRequest(
            f"Invalid value for '{field}': the image's dimensions are over this server's "
            f"limit of {max_pixels:,} pixels"
        ) from None
    if size is None:
        raise BadRequest(f"Invalid value for '{field}': not a readable image")
    width, height = size
    if width < 1 or height < 1:
        raise BadRequest(f"Invalid value for '{field}': the image is empty ({width}x{height})")
    if width * height > max_pixels:
        raise BadRequest(
            f"Invalid value for '{field}': the image is {width}x{height} = "
            f"{width * height:,} pixels, over this server's limit of {max_pixels:,}"
        )
