"""Deterministic image edits with Pillow: crop, resize, upscale, rotate, flip, grayscale and
format conversion.

:class:`ImageOperations` is the offline ``image-edit`` backend for the edits that need no
model. It does exactly what it names and nothing else: upscaling is Lanczos resampling plus
an unsharp mask (no generative super-resolution), and an instruction it cannot carry out is
answered with a client error that lists what it can do, never with a look-alike edit.

The module also holds the decode/encode helpers the other local image backends share: safe
decoding (format allow-list, pixel cap checked before any pixel is decoded, EXIF
orientation) and encoding whose MIME type always matches the bytes.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
from PIL import Image, ImageColor, ImageFilter, ImageOps, UnidentifiedImageError

from hypereal.backends.base import BackendError, BackendUnavailable, ImageRequest, MediaBlob

__all__ = [
    "CONTENT_TYPES",
    "DEFAULT_MAX_INPUT_PIXELS",
    "DEFAULT_MAX_OUTPUT_PIXELS",
    "ImageOperations",
    "apply_request_geometry",
    "check_pixels",
    "decode_image",
    "encode_image",
    "normalise_format",
    "parse_colour",
    "pixel_cap_option",
]

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
_ALLOWED_INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")

# Largest side each encoder can write; checked up front for a clear client error instead of
# an encoder exception.
_MAX_SIDE: Mapping[str, int] = {"png": 2**31 - 1, "jpeg": 65_500, "webp": 16_383}

_DEFAULT_QUALITY = 90
_UPSCALE_FACTORS = (2, 3, 4)

CAPABILITIES = (
    "crop (params.crop 'x,y,w,h', or centred to an aspect ratio: 'crop to 16:9', 'crop to "
    "square'), resize ('resize to 800x600', 'resize to 50%', 'resize to 1024px', width/height "
    "or scale), upscale 2x/3x/4x (Lanczos resampling plus unsharp mask, not generative "
    "super-resolution), rotate by degrees ('rotate 90', 'rotate 45 counterclockwise'), flip "
    "horizontal/vertical, grayscale ('make it black and white'), and format conversion "
    "('convert to webp', 'quality 80') to png, jpeg or webp"
)


# --------------------------------------------------------------------- shared helpers


def pixel_cap_option(options: Mapping[str, Any], name: str, default: int) -> int:
    """Read a positive integer pixel cap from backend options.

    Raises BackendUnavailable (a configuration error) when the value is not a positive int.
    """
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BackendUnavailable(f"option {name!r} must be a positive integer, got {value!r}")
    return value


def normalise_format(value: str | None) -> str:
    """Map an output format name (``png``, ``jpeg``/``jpg``, ``webp``) to its canonical form.

    Raises BackendError(client_error=True) for any other value.
    """
    fmt = _FORMAT_ALIASES.get((value or "png").strip().lower())
    if fmt is None:
        raise BackendError(
            f"Unsupported output_format {value!r}: use png, jpeg or webp", client_error=True
        )
    return fmt


def check_pixels(width: int, height: int, max_pixels: int, what: str) -> None:
    """Refuse a planned image of ``width`` x ``height`` above ``max_pixels`` before it is made."""
    if width < 1 or height < 1:
        raise BackendError(f"{what} would be empty ({width}x{height})", client_error=True)
    if width * height > max_pixels:
        raise BackendError(
            f"{what} would be {width}x{height} = {width * height:,} pixels, over this server's "
            f"limit of {max_pixels:,}",
            client_error=True,
        )


def parse_colour(text: str) -> tuple[int, int, int] | None:
    """Parse a CSS colour name (``"light blue"`` / ``"lightblue"``), ``#hex``, bare 6-digit
    hex with a digit in it, or ``rgb(...)`` into an RGB triple; None when it is not one."""
    candidate = text.strip().lower()
    if not candidate:
        return None
    # Bare hex needs a digit, or words like "facade" would read as colours.
    if re.fullmatch(r"[0-9a-f]{6}", candidate) and re.search(r"\d", candidate):
        candidate = "#" + candidate
    # CSS names have no spaces, people write them with one ("light blue").
    for attempt in (candidate, candidate.replace(" ", "").replace("-", "")):
        try:
            rgb = ImageColor.getrgb(attempt)
        except ValueError:
            continue
        return rgb[0], rgb[1], rgb[2]
    return None


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
    BackendError(client_error=True) for anything undecodable or too large.
    """
    if not blob.data:
        raise BackendError(f"The {what} is empty", client_error=True)
    formats = [f for f in _ALLOWED_INPUT_FORMATS if f in _registered_formats()]
    try:
        img = Image.open(io.BytesIO(blob.data), formats=formats)
    except Image.DecompressionBombError as exc:
        raise BackendError(f"The {what} is too large: {exc}", client_error=True) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise BackendError(
            f"The {what} is not a decodable image (png, jpeg, webp, gif, bmp, tiff or avif)",
            client_error=True,
        ) from exc
    width, height = img.size
    check_pixels(width, height, max_pixels, f"The {what}")
    try:
        img.load()
    except Image.DecompressionBombError as exc:
        raise BackendError(f"The {what} is too large: {exc}", client_error=True) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise BackendError(
            f"The {what} could not be decoded (truncated or corrupt)", client_error=True
        ) from exc
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError):
        # A broken EXIF block should not cost the user their edit: keep stored orientation.
        pass
    return _to_working_mode(img)


def _registered_formats() -> set[str]:
    Image.init()
    return set(Image.OPEN)


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA")


def flatten(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Composite an image with alpha over a solid colour (RGB, or L for greyscale input)."""
    if not _has_alpha(img):
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
    default). Raises BackendError(client_error=True) when the format cannot hold the size.
    """
    fmt = normalise_format(output_format)
    width, height = img.size
    if max(width, height) > _MAX_SIDE[fmt]:
        raise BackendError(
            f"{fmt} cannot store a {width}x{height} image (largest side {_MAX_SIDE[fmt]}); "
            "choose another output_format or a smaller size",
            client_error=True,
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
            img = img.convert("RGBA" if _has_alpha(img) else "RGB")
        save_args = {"quality": quality or _DEFAULT_QUALITY, "method": 4}
    else:
        if img.mode not in ("L", "LA", "RGB", "RGBA"):
            img = img.convert("RGBA" if _has_alpha(img) else "RGB")
        save_args = {"compress_level": 6}
    out = io.BytesIO()
    img.save(out, format=_PIL_FORMATS[fmt], **save_args)
    return MediaBlob(data=out.getvalue(), content_type=CONTENT_TYPES[fmt])


# ------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class _Step:
    op: str  # crop | resize | upscale | rotate | flip | grayscale
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class _Plan:
    steps: list[_Step]
    output_format: str
    quality: int | None = None
    # False when the prompt named no edit, format or quality: nothing to do is refused
    # rather than answered with an unchanged copy.
    instructed: bool = True


def _client(message: str) -> BackendError:
    return BackendError(message, client_error=True)


def _cannot(instruction: str) -> BackendError:
    return _client(
        f"This model cannot do {instruction!r}. It only does deterministic edits: {CAPABILITIES}."
    )


def _parse_ratio(value: Any) -> float | None:
    """'16:9', '16/9', 'square' or a positive number -> width/height; None if not a ratio."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if value > 0 else None
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    if text == "square":
        return 1.0
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*[:/x]\s*(\d+(?:\.\d+)?)", text)
    if match is None:
        return None
    num, den = float(match.group(1)), float(match.group(2))
    if num <= 0 or den <= 0:
        return None
    return num / den


def _parse_box(value: Any) -> tuple[int, int, int, int] | None:
    """'x,y,w,h' (or a 4-sequence of ints) -> tuple; None when it is not one."""
    parts: Sequence[Any]
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,\s]+", value.strip()) if p]
    elif isinstance(value, Sequence):
        parts = value
    else:
        return None
    if len(parts) != 4:
        return None
    try:
        numbers = [int(str(p)) for p in parts]
    except ValueError:
        return None
    return numbers[0], numbers[1], numbers[2], numbers[3]


def _positive_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise _client(f"Invalid value for {name!r}: must be a whole number of pixels")
    if value < 1:
        raise _client(f"Invalid value for {name!r}: must be at least 1")
    return int(value)


def _positive_number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip().rstrip("xX"))
        except ValueError as exc:
            raise _client(f"Invalid value for {name!r}: must be a number") from exc
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise _client(f"Invalid value for {name!r}: must be a positive number")
    return float(value)


def _quality(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
        raise _client("Invalid value for 'quality': must be an integer from 1 to 100")
    return value


def _upscale_factor(value: float) -> int:
    if value not in _UPSCALE_FACTORS:
        raise _client("upscale supports factors 2x, 3x and 4x; use resize for other scales")
    return int(value)


# ------------------------------------------------------------ explicit params.operation

_OP_ALIASES: Mapping[str, str] = {
    "crop": "crop",
    "resize": "resize",
    "scale": "resize",
    "upscale": "upscale",
    "rotate": "rotate",
    "flip": "flip",
    "mirror": "flip",
    "grayscale": "grayscale",
    "greyscale": "grayscale",
    "black_and_white": "grayscale",
    "convert": "convert",
    "format": "convert",
}


def _plan_from_params(operation: Any, request: ImageRequest) -> _Plan:
    params = request.params
    if isinstance(operation, str):
        names = [n for n in re.split(r"[,+]", operation) if n.strip()]
    elif isinstance(operation, Sequence) and all(isinstance(n, str) for n in operation):
        names = list(operation)
    else:
        raise _client("Invalid value for 'operation': must be a name or a list of names")
    plan = _Plan(steps=[], output_format=normalise_format(request.output_format))
    plan.quality = _quality(params.get("quality"))
    for raw in names:
        key = re.sub(r"[\s-]+", "_", raw.strip().lower())
        op = _OP_ALIASES.get(key)
        if op is None:
            raise _cannot(raw)
        if op == "convert":
            continue
        if op == "crop":
            plan.steps.append(_crop_step_from(params.get("crop"), params, request))
        elif op == "resize":
            plan.steps.append(_resize_step_from({}, params, request))
        elif op == "upscale":
            factor = _positive_number(params.get("scale", params.get("factor", 2)), "scale")
            plan.steps.append(_Step("upscale", {"factor": _upscale_factor(factor or 2)}))
        elif op == "rotate":
            angle = _number(params.get("angle"), "angle")
            if angle is None:
                raise _client("rotate needs params.angle (degrees, clockwise)")
            plan.steps.append(_Step("rotate", {"angle": angle}))
        elif op == "flip":
            direction = str(params.get("direction", "horizontal")).lower()
            if key == "mirror":
                direction = "horizontal"
            if direction not in ("horizontal", "vertical"):
                raise _client("Invalid value for 'direction': use horizontal or vertical")
            plan.steps.append(_Step("flip", {"direction": direction}))
        else:
            plan.steps.append(_Step("grayscale"))
    return plan


def _number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _client(f"Invalid value for {name!r}: must be a number")
    return float(value)


def _crop_step_from(explicit: Any, params: Mapping[str, Any], request: ImageRequest) -> _Step:
    """A crop from an explicit box/ratio, else params.aspect_ratio, else the request's."""
    for source in (explicit, params.get("aspect_ratio"), request.aspect_ratio):
        if source is None:
            continue
        box = _parse_box(source)
        if box is not None:
            return _Step("crop", {"box": box})
        ratio = _parse_ratio(source)
        if ratio is not None:
            return _Step("crop", {"ratio": ratio})
        raise _client(f"Invalid crop {source!r}: use 'x,y,w,h' or an aspect ratio like '16:9'")
    raise _client("crop needs a box 'x,y,w,h' (params.crop) or an aspect ratio like '16:9'")


def _resize_step_from(
    found: Mapping[str, Any], params: Mapping[str, Any], request: ImageRequest
) -> _Step:
    """A resize from what the prompt said, else params width/height/scale, else the
    request's width/height."""
    fit = str(params.get("fit", "cover")).lower()
    if fit not in ("cover", "contain", "stretch"):
        raise _client("Invalid value for 'fit': use cover, contain or stretch")
    if found:
        return _Step("resize", {**found, "fit": fit})
    width = _positive_int(params.get("width", request.width), "width")
    height = _positive_int(params.get("height", request.height), "height")
    scale = _positive_number(params.get("scale"), "scale")
    if width is not None or height is not None:
        return _Step("resize", {"width": width, "height": height, "fit": fit})
    if scale is not None:
        return _Step("resize", {"scale": scale})
    raise _client(
        "resize needs a size: 'resize to 800x600', 'resize to 50%', 'resize to 1024px', "
        "or width/height/scale"
    )


# -------------------------------------------------------------------- prompt parsing

_NUMBER = r"(\d+(?:\.\d+)?)"
_FILLER = {
    "a", "all", "also", "an", "can", "could", "do", "for", "i", "image", "it", "just",
    "kindly", "me", "my", "now", "of", "photo", "pic", "picture", "please", "thank",
    "thanks", "that", "the", "this", "to", "want", "would", "you", "need", "like", "make",
    "file", "output", "result", "version", "give",
}  # fmt: skip
_RE_FORMAT = re.compile(r"\b(png|jpe?g|webp)\b")
_RE_QUALITY = re.compile(
    r"\bquality\s*(?:of|=|:|to|at)?\s*(\d{1,3})\b|\b(\d{1,3})\s*%?\s*quality\b"
)
_RE_UPSCALE = re.compile(
    r"\b(up-?scale[sd]?|upsample|up-?res|enlarge|super[- ]?res(?:olution)?|"
    r"(?:increase|boost|raise|improve|enhance) (?:the )?resolution|higher resolution)\b"
)
_RE_RESIZE = re.compile(
    r"\b(resize[sd]?|re-?scale|scale|shrink|down-?scale|down-?size|downsample|"
    r"(?:smaller|larger|bigger))\b"
)
_RE_CROP = re.compile(r"\bcrop(?:ped)?\b")
_RE_SHAPE = re.compile(r"\b(aspect(?: ratio)?|square)\b")
_RE_FLIP = re.compile(r"\b(flip(?:ped)?|mirror(?:ed)?)\b")
_RE_ROTATE = re.compile(r"\b(rotate[sd]?|rotation|upside[- ]down)\b")
_RE_GREY = re.compile(
    r"\b(gr[ae]y\s*-?scale[d]?|monochrome|desaturated?|colou?rless|"
    r"(?:remove|drop|strip) (?:the |all )?colou?rs?|no colou?rs?)\b"
)
_RE_DIMS = re.compile(r"\b(\d+)\s*[x\u00d7*]\s*(\d+)\b")
_RE_FACTOR = re.compile(
    r"\b(\d+(?:\.\d+)?)\s*x\b|\bx\s*(\d+(?:\.\d+)?)\b|"
    r"\bby (?:a factor of )?(\d+(?:\.\d+)?)\b|\b(\d+(?:\.\d+)?)\s*times\b"
)


def _factor_in(clause: str) -> float | None:
    match = _RE_FACTOR.search(clause)
    if match is not None:
        return float(next(g for g in match.groups() if g is not None))
    for word, factor in (("double", 2.0), ("triple", 3.0), ("quadruple", 4.0)):
        if word in clause:
            return factor
    return None


def _resize_args(clause: str) -> dict[str, Any]:
    """Sizes said in a resize clause: WxH, width/height, N px (longest side), N% or factor."""
    dims = _RE_DIMS.search(clause)
    if dims is not None:
        return {"width": int(dims.group(1)), "height": int(dims.group(2))}
    width = re.search(r"\bwidth\s*(?:of|to|=|:)?\s*(\d+)|\b(\d+)\s*(?:px|pixels)?\s*wide\b", clause)
    height = re.search(
        r"\bheight\s*(?:of|to|=|:)?\s*(\d+)|\b(\d+)\s*(?:px|pixels)?\s*(?:tall|high)\b", clause
    )
    if width is not None or height is not None:
        return {
            "width": int(next(g for g in width.groups() if g)) if width else None,
            "height": int(next(g for g in height.groups() if g)) if height else None,
        }
    side = re.search(r"\b(\d+)\s*(?:px|pixels)\b", clause)
    if side is not None:
        return {"max_side": int(side.group(1))}
    percent = re.search(_NUMBER + r"\s*%", clause)
    if percent is not None:
        return {"scale": float(percent.group(1)) / 100.0}
    factor = _factor_in(clause)
    if factor is not None:
        return {"scale": factor}
    for word, scale in (("half", 0.5), ("quarter", 0.25)):
        if word in clause:
            return {"scale": scale}
    return {}


def _rotate_args(clause: str) -> dict[str, Any]:
    if "upside" in clause and "rotat" not in clause:
        return {"angle": 180.0}
    ccw = re.search(r"counter[- ]?clockwise|anti[- ]?clockwise|\bccw\b|\bleft\b", clause)
    angle_match = re.search(r"(-?\d+(?:\.\d+)?)\s*(?:°|deg\b|degrees?\b)?", clause)
    if angle_match is not None:
        angle = float(angle_match.group(1))
    elif "upside" in clause:
        angle = 180.0
    elif ccw is not None or re.search(r"\bclockwise\b|\bcw\b|\bright\b", clause):
        angle = 90.0
    else:
        raise _client("rotate needs an angle, e.g. 'rotate 90' (clockwise) or 'rotate left'")
    # Clockwise is what "rotate 90" means in photo editors; Pillow's sign is the reverse,
    # handled when the step runs.
    return {"angle": -angle if ccw is not None else angle}


def _only_filler(clause: str) -> bool:
    words = re.findall(r"[a-z0-9]+", clause)
    return all(w in _FILLER for w in words)


def _plan_from_prompt(prompt: str, request: ImageRequest) -> _Plan:
    params = request.params
    text = prompt.lower().strip()
    # "black and white" must survive the split on "and" below.
    text = re.sub(r"black\s*(?:and|&|-|/)\s*white|\bb\s*&\s*w\b|\bb/w\b", " grayscale ", text)
    plan = _Plan(steps=[], output_format=normalise_format(request.output_format))
    plan.quality = _quality(params.get("quality"))
    plan.instructed = False
    # Commas between digits belong to a crop box ("crop 0,0,100,100"), dots to decimals.
    clauses = re.split(r",(?!\s*-?\d)|;|\.(?!\d)|\bthen\b|\band\b|&|\+|\n", text)
    for clause in (c.strip() for c in clauses):
        if not clause:
            continue
        fmt = _RE_FORMAT.search(clause)
        if fmt is not None:
            plan.output_format = normalise_format(fmt.group(1))
        quality = _RE_QUALITY.search(clause)
        if quality is not None:
            plan.quality = _quality(int(next(g for g in quality.groups() if g)))
        step = _step_from_clause(clause, params, request)
        if step is not None:
            plan.steps.append(step)
        elif fmt is None and quality is None:
            if not _only_filler(clause):
                raise _cannot(clause)
            continue
        plan.instructed = True
    return plan


def _step_from_clause(
    clause: str, params: Mapping[str, Any], request: ImageRequest
) -> _Step | None:
    if _RE_UPSCALE.search(clause):
        sized = _resize_args(clause)
        if "width" in sized or "height" in sized or "max_side" in sized:
            # "upscale to 1920x1080" names a size, not a factor.
            return _resize_step_from(sized, params, request)
        factor = _factor_in(clause) or 2.0
        return _Step("upscale", {"factor": _upscale_factor(factor)})
    if _RE_FLIP.search(clause):
        vertical = re.search(r"vertical|upside|top[- ]to[- ]bottom|up[- ]down", clause)
        return _Step("flip", {"direction": "vertical" if vertical else "horizontal"})
    if _RE_ROTATE.search(clause):
        return _Step("rotate", _rotate_args(clause))
    # An explicit "crop" wins over a size; "square"/"aspect" alone only when no resize word.
    if _RE_CROP.search(clause) or (_RE_SHAPE.search(clause) and not _RE_RESIZE.search(clause)):
        box = re.search(r"(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)", clause)
        if box is not None:
            return _Step("crop", {"box": tuple(int(g) for g in box.groups())})
        ratio = re.search(_NUMBER + r"\s*[:/]\s*" + _NUMBER, clause)
        if ratio is not None:
            return _crop_step_from(f"{ratio.group(1)}:{ratio.group(2)}", params, request)
        if "square" in clause:
            return _Step("crop", {"ratio": 1.0})
        return _crop_step_from(params.get("crop"), params, request)
    if _RE_RESIZE.search(clause):
        return _resize_step_from(_resize_args(clause), params, request)
    if _RE_GREY.search(clause):
        return _Step("grayscale")
    return None


def _add_request_geometry(plan: _Plan, request: ImageRequest) -> None:
    """Honour the request's own size/aspect_ratio fields when no step already used them, so
    the output never silently ignores a requested geometry."""
    ops = {s.op for s in plan.steps}
    has_size = request.width is not None or request.height is not None
    if request.aspect_ratio and "crop" not in ops and not (request.width and request.height):
        ratio = _parse_ratio(request.aspect_ratio)
        if ratio is None:
            raise _client(f"Invalid aspect_ratio {request.aspect_ratio!r}: use e.g. '16:9'")
        plan.steps.append(_Step("crop", {"ratio": ratio}))
    if has_size and not ops & {"resize", "upscale"}:
        plan.steps.append(
            _Step("resize", {"width": request.width, "height": request.height, "fit": "cover"})
        )


# ------------------------------------------------------------------------- the steps


def _resample_size(
    img: Image.Image, size: tuple[int, int], max_pixels: int, what: str
) -> Image.Image:
    check_pixels(size[0], size[1], max_pixels, what)
    if size == img.size:
        return img
    # reducing_gap makes large downscales fast (a box pre-reduction) at no visible cost.
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _crop(img: Image.Image, args: Mapping[str, Any]) -> Image.Image:
    width, height = img.size
    if "box" in args:
        x, y, w, h = args["box"]
        if w < 1 or h < 1 or x < 0 or y < 0 or x + w > width or y + h > height:
            raise _client(
                f"crop box x={x}, y={y}, w={w}, h={h} is not inside the {width}x{height} image"
            )
        return img.crop((x, y, x + w, y + h))
    ratio = float(args["ratio"])
    if width / height > ratio:
        new_w, new_h = max(1, round(height * ratio)), height
    else:
        new_w, new_h = width, max(1, round(width / ratio))
    left, top = (width - new_w) // 2, (height - new_h) // 2
    return img.crop((left, top, left + new_w, top + new_h))


def _resize(img: Image.Image, args: Mapping[str, Any], max_pixels: int) -> Image.Image:
    width, height = img.size
    what = "The resized image"
    if args.get("scale") is not None:
        scale = float(args["scale"])
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        return _resample_size(img, size, max_pixels, what)
    if args.get("max_side") is not None:
        scale = int(args["max_side"]) / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        return _resample_size(img, size, max_pixels, what)
    target_w, target_h = args.get("width"), args.get("height")
    if target_w is None and target_h is None:
        raise _client("resize needs a width, a height or a scale")
    if target_w is None or target_h is None:
        scale = (target_w / width) if target_w is not None else (target_h or 1) / height
        size = (target_w or max(1, round(width * scale)), target_h or max(1, round(height * scale)))
        return _resample_size(img, size, max_pixels, what)
    fit = args.get("fit", "cover")
    if fit == "stretch":
        return _resample_size(img, (target_w, target_h), max_pixels, what)
    if fit == "contain":
        scale = min(target_w / width, target_h / height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        return _resample_size(img, size, max_pixels, what)
    # cover: exactly the requested size, no distortion; the overflow is cropped centred
    # (ImageOps.fit crops before it resamples, so nothing larger than the target is made).
    check_pixels(target_w, target_h, max_pixels, what)
    return ImageOps.fit(img, (target_w, target_h), Image.Resampling.LANCZOS)


def _sharpen(img: Image.Image, factor: int) -> Image.Image:
    # Lanczos upscales look soft; a mild unsharp mask scaled to the factor restores edge
    # contrast without the halos a strong one gives. Alpha is left untouched.
    mask = ImageFilter.UnsharpMask(radius=0.8 * factor, percent=70, threshold=2)
    if not _has_alpha(img):
        return img.filter(mask)
    colour_mode = "RGB" if img.mode == "RGBA" else "L"
    alpha = img.getchannel("A")
    sharpened = img.convert(colour_mode).filter(mask).convert(img.mode)
    sharpened.putalpha(alpha)
    return sharpened


def _upscale(img: Image.Image, factor: int, max_pixels: int) -> Image.Image:
    size = (img.width * factor, img.height * factor)
    check_pixels(size[0], size[1], max_pixels, f"The {factor}x upscaled image")
    return _sharpen(img.resize(size, Image.Resampling.LANCZOS), factor)


def _rotate(img: Image.Image, angle: float, max_pixels: int) -> Image.Image:
    clockwise = angle % 360
    if clockwise == 0:
        return img
    lossless = {
        90: Image.Transpose.ROTATE_270,
        180: Image.Transpose.ROTATE_180,
        270: Image.Transpose.ROTATE_90,
    }
    if clockwise in lossless:
        return img.transpose(lossless[int(clockwise)])
    radians = math.radians(clockwise)
    cos, sin = abs(math.cos(radians)), abs(math.sin(radians))
    out_w = math.ceil(img.width * cos + img.height * sin)
    out_h = math.ceil(img.width * sin + img.height * cos)
    check_pixels(out_w, out_h, max_pixels, "The rotated image")
    # The corners a free rotation uncovers are transparent (white once saved as JPEG).
    rgba = img.convert("LA" if img.mode in ("L", "LA") else "RGBA")
    fill = (0, 0) if rgba.mode == "LA" else (0, 0, 0, 0)
    return rgba.rotate(-clockwise, Image.Resampling.BICUBIC, expand=True, fillcolor=fill)


def _apply(img: Image.Image, plan: _Plan, max_output_pixels: int) -> Image.Image:
    for step in plan.steps:
        if step.op == "crop":
            img = _crop(img, step.args)
        elif step.op == "resize":
            img = _resize(img, step.args, max_output_pixels)
        elif step.op == "upscale":
            img = _upscale(img, int(step.args["factor"]), max_output_pixels)
        elif step.op == "rotate":
            img = _rotate(img, float(step.args["angle"]), max_output_pixels)
        elif step.op == "flip":
            method = (
                Image.Transpose.FLIP_TOP_BOTTOM
                if step.args["direction"] == "vertical"
                else Image.Transpose.FLIP_LEFT_RIGHT
            )
            img = img.transpose(method)
        elif step.op == "grayscale":
            img = img.convert("LA" if _has_alpha(img) else "L")
        else:  # pragma: no cover - the parsers only make the ops above
            raise AssertionError(step.op)
    return img


def apply_request_geometry(
    img: Image.Image, request: ImageRequest, max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS
) -> Image.Image:
    """Apply the request's ``aspect_ratio`` (centred crop) and ``width``/``height`` (exact
    size, centre-cropped, no distortion) to an edited image; unchanged when none is set.

    For backends whose edit keeps the frame (e.g. background removal) so they honour the
    requested geometry too. Raises BackendError(client_error=True) on a bad value.
    """
    plan = _Plan(steps=[], output_format="png")
    _add_request_geometry(plan, request)
    return _apply(img, plan, max_output_pixels)


# ----------------------------------------------------------------------- the backend


class ImageOperations:
    """Offline ``image-edit`` backend: deterministic Pillow edits chosen by
    ``params.operation`` or parsed from the prompt.

    Options (all optional): ``max_input_pixels`` and ``max_output_pixels`` (pixel caps,
    default 40 MP each), ``max_images`` (source images edited per request, default 4).
    Every source image in the request is edited the same way; one output per source.
    """

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        """Read the options; raises BackendUnavailable when one is malformed."""
        options = options or {}
        self.max_input_pixels = pixel_cap_option(
            options, "max_input_pixels", DEFAULT_MAX_INPUT_PIXELS
        )
        self.max_output_pixels = pixel_cap_option(
            options, "max_output_pixels", DEFAULT_MAX_OUTPUT_PIXELS
        )
        self.max_images = pixel_cap_option(options, "max_images", 4)

    def describe(self, request: ImageRequest) -> list[str]:
        """The steps a request would run, e.g. ``["crop(ratio=1.77)", "encode(webp)"]``,
        or the same client error :meth:`generate_images` would raise. Cheap and pure, so a
        caller can validate an instruction before charging for it."""
        plan = self._plan(request)
        steps = [f"{s.op}({', '.join(f'{k}={v}' for k, v in s.args.items())})" for s in plan.steps]
        return [*steps, f"encode({plan.output_format})"]

    def _plan(self, request: ImageRequest) -> _Plan:
        operation = request.params.get("operation")
        if operation:
            plan = _plan_from_params(operation, request)
        else:
            plan = _plan_from_prompt(request.prompt or "", request)
        _add_request_geometry(plan, request)
        if not plan.instructed and not plan.steps:
            raise _client(f"Say what to do with the image. This model does: {CAPABILITIES}.")
        return plan

    async def generate_images(self, request: ImageRequest) -> list[MediaBlob]:
        """Edit each source image in ``request.images`` per the plan; one output each."""
        if not request.images:
            raise _client("This model edits an image: pass the source image in 'images'")
        if len(request.images) > self.max_images:
            raise _client(f"At most {self.max_images} source images per request")
        plan = self._plan(request)
        return await anyio.to_thread.run_sync(self._run, plan, list(request.images))

    def _run(self, plan: _Plan, sources: list[MediaBlob]) -> list[MediaBlob]:
        outputs = []
        for index, blob in enumerate(sources):
            what = "source image" if len(sources) == 1 else f"source image #{index + 1}"
            img = decode_image(blob, max_pixels=self.max_input_pixels, what=what)
            img = _apply(img, plan, self.max_output_pixels)
            outputs.append(encode_image(img, plan.output_format, quality=plan.quality))
        return outputs
