"""The one image codec: safe decoding (format allow-list, pixel cap checked from the header
before any pixel is decoded, EXIF orientation), encoding whose MIME type always matches the
bytes, the one table of output formats, and reading an image's size from its header alone.

Every refusal is an :class:`ImageRejected` (the input or the asked-for output is at fault: a
client error) carrying a message for the client.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from hypereal.media.blob import MediaBlob

__all__ = [
    "CONTENT_TYPES",
    "DEFAULT_MAX_INPUT_PIXELS",
    "DEFAULT_MAX_OUTPUT_PIXELS",
    "INPUT_FORMATS",
    "ImageRejected",
    "check_pixels",
    "check_size",
    "decode_image",
    "encode_image",
    "flatten",
    "format_of",
    "has_alpha",
    "header_size",
    "normalise_format",
]


class ImageRejected(ValueError):
    """An image this server will not decode or cannot write; ``message`` says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# 40 megapixels: a 50 MP camera frame is refused, everything a phone or a generator makes is
# accepted. Pillow's own bomb limit (~89 MP warning, ~179 MP error) stays in force on top.
DEFAULT_MAX_INPUT_PIXELS = 40_000_000
DEFAULT_MAX_OUTPUT_PIXELS = 40_000_000

CONTENT_TYPES: Mapping[str, str] = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
}
_PIL_FORMATS: Mapping[str, str] = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
_FORMAT_ALIASES: Mapping[str, str] = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "webp": "webp"}

# Only raster formats people actually upload. Restricting the decoders keeps exotic plugins
# (EPS would shell out to Ghostscript, FITS/HDF5/GRIB etc.) off the attack surface.
INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")

# Largest side each encoder can write; checked up front for a clear client error instead of
# an encoder exception.
_MAX_SIDE: Mapping[str, int] = {"png": 2**31 - 1, "jpeg": 65_500, "webp": 16_383}

_DEFAULT_QUALITY = 90


def normalise_format(value: str | None) -> str:
    """Map an output format name (``png``, ``jpeg``/``jpg``, ``webp``) to its canonical form.

    Raises ImageRejected for any other value.
    """
    fmt = _FORMAT_ALIASES.get((value or "png").strip().lower())
    if fmt is None:
        raise ImageRejected(f"Unsupported output_format {value!r}: use png, jpeg or webp")
    return fmt


def check_size(width: int, height: int, max_pixels: int, subject: str) -> None:
    """Refuse (ImageRejected) an image of ``width`` x ``height`` that is empty or above
    ``max_pixels``; the message goes on from ``subject`` (``"the image is"``)."""
    if width < 1 or height < 1:
        raise ImageRejected(f"{subject} empty ({width}x{height})")
    if width * height > max_pixels:
        raise ImageRejected(
            f"{subject} {width}x{height} = {width * height:,} pixels, over this server's "
            f"limit of {max_pixels:,}"
        )


def check_pixels(width: int, height: int, max_pixels: int, what: str) -> None:
    """Refuse a planned image of ``width`` x ``height`` above ``max_pixels`` before it is made."""
    check_size(width, height, max_pixels, f"{what} would be")


def _to_working_mode(img: Image.Image) -> Image.Image:
    """Convert any decoded mode to one of L, LA, RGB, RGBA, keeping transparency."""
    mode = img.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return img
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        return img.convert("RGBA" if has_alpha else "RGB")
    if mode == "1":
        return img.convert("L")
    if mode == "La":
        return img.convert("LA")
    if mode == "RGBa":
        return img.convert("RGBA")
    if mode.startswith("I") or mode == "F":
        # 16-bit greyscale (PNG/TIFF): plain convert("L") clips everything above 255 to
        # white, so scale the range down first.
        wide = img.convert("I") if mode != "F" else img
        extrema = wide.getextrema()
        high = extrema[1] if isinstance(extrema[1], int | float) else 255
        if high > 255:
            wide = wide.point(lambda v: v * (255.0 / 65535.0))
        return wide.convert("L")
    return img.convert("RGB")


def decode_image(blob: MediaBlob, *, max_pixels: int, what: str = "source image") -> Image.Image:
    """Decode ``blob`` into an L/LA/RGB/RGBA image, upright per its EXIF orientation.

    The pixel cap is checked from the header, before any pixel data is decoded, so a
    decompression bomb costs nothing. Animated images give their first frame. Raises
    ImageRejected for anything undecodable or too large.
    """
    if not blob.data:
        raise ImageRejected(f"The {what} is empty")
    formats = [f for f in INPUT_FORMATS if f in _registered_formats()]
    try:
        img = Image.open(io.BytesIO(blob.data), formats=formats)
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"The {what} is too large: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageRejected(
            f"The {what} is not a decodable image (png, jpeg, webp, gif, bmp, tiff or avif)"
        ) from exc
    width, height = img.size
    check_pixels(width, height, max_pixels, f"The {what}")
    try:
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"The {what} is too large: {exc}") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageRejected(f"The {what} could not be decoded (truncated or corrupt)") from exc
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError):
        # A broken EXIF block should not cost the user their edit: keep stored orientation.
        pass
    return _to_working_mode(img)


def _registered_formats() -> set[str]:
    Image.init()
    return set(Image.OPEN)


def has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA")


def flatten(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Composite an image with alpha over a solid colour (RGB, or L for greyscale input)."""
    if not has_alpha(img):
        return img
    grey = img.mode == "LA"
    base = Image.new("RGBA", img.size, (*background, 255))
    out = Image.alpha_composite(base, img.convert("RGBA")).convert("RGB")
    return out.convert("L") if grey else out


def encode_image(
    img: Image.Image,
    output_format: str,
    *,
    quality: int | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
) -> MediaBlob:
    """Encode to png, jpeg or webp; the blob's content type names what was written.

    JPEG has no alpha, so transparent pixels are composited over ``background`` (white by
    default). Raises ImageRejected when the format cannot hold the size.
    """
    fmt = normalise_format(output_format)
    width, height = img.size
    if max(width, height) > _MAX_SIDE[fmt]:
        raise ImageRejected(
            f"{fmt} cannot store a {width}x{height} image (largest side {_MAX_SIDE[fmt]}); "
            "choose another output_format or a smaller size"
        )
    save_args: dict[str, Any] = {}
    if fmt == "jpeg":
        img = flatten(img, background)
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        save_args = {"quality": quality or _DEFAULT_QUALITY, "optimize": True}
    elif fmt == "webp":
        # The WebP encoder takes RGB/RGBA only.
        if img.mode not in ("RGB", "RGBA"):
            img = img.convert("RGBA" if has_alpha(img) else "RGB")
        save_args = {"quality": quality or _DEFAULT_QUALITY, "method": 4}
    else:
        if img.mode not in ("L", "LA", "RGB", "RGBA"):
            img = img.convert("RGBA" if has_alpha(img) else "RGB")
        save_args = {"compress_level": 6}
    out = io.BytesIO()
    img.save(out, format=_PIL_FORMATS[fmt], **save_args)
    return MediaBlob(data=out.getvalue(), content_type=CONTENT_TYPES[fmt])


# ------------------------------------------------------------------------ the plan


def format_of(content_type: str) -> str | None:
    """The output format (``png``, ``jpeg``, ``webp``) whose MIME type is ``content_type``."""
    return _FORMAT_OF_TYPE.get(content_type)


_FORMAT_OF_TYPE: Mapping[str, str] = {ctype: fmt for fmt, ctype in CONTENT_TYPES.items()}


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) read from an image's header, or None when the bytes are not an image
    in one of :data:`INPUT_FORMATS`. Never decodes pixel data; a header Pillow itself calls a
    decompression bomb still gives its size."""
    formats = [f for f in INPUT_FORMATS if f in _registered_formats()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=formats) as img:
                return img.size
        except Image.DecompressionBombError:
            # Pillow refuses after reading the header; its message holds no size, so read
            # the size fields again without its check.
            return _size_without_bomb_check(data, formats)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
            return None


def _size_without_bomb_check(data: bytes, formats: list[str]) -> tuple[int, int] | None:
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(io.BytesIO(data), formats=formats) as img:
            return img.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
