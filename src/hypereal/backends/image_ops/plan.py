"""What an edit request asks for, as a plan of steps: from ``params.operation`` (explicit
names and values) or, through :mod:`.instructions`, from the prompt; plus the request's own
size and aspect ratio. Every refusal is a client BackendError naming what this backend does."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import ImageColor

from hypereal.backends.base import BackendError, ImageRequest
from hypereal.backends.image_codec import normalise_format

UPSCALE_FACTORS = (2, 3, 4)

CAPABILITIES = (
    "crop (params.crop 'x,y,w,h', or centred to an aspect ratio: 'crop to 16:9', 'crop to "
    "square'), resize ('resize to 800x600', 'resize to 50%', 'resize to 1024px', width/height "
    "or scale), upscale 2x/3x/4x (Lanczos resampling plus unsharp mask, not generative "
    "super-resolution), rotate by degrees ('rotate 90', 'rotate 45 counterclockwise'), flip "
    "horizontal/vertical, grayscale ('make it black and white'), and format conversion "
    "('convert to webp', 'quality 80') to png, jpeg or webp"
)


@dataclass(frozen=True)
class Step:
    op: str  # crop | resize | upscale | rotate | flip | grayscale
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    steps: list[Step]
    output_format: str
    quality: int | None = None
    # False when the prompt named no edit, format or quality: nothing to do is refused
    # rather than answered with an unchanged copy.
    instructed: bool = True


def refuse(message: str) -> BackendError:
    return BackendError(message, client_error=True)


def cannot(instruction: str) -> BackendError:
    return refuse(
        f"This model cannot do {instruction!r}. It only does deterministic edits: {CAPABILITIES}."
    )


def parse_ratio(value: Any) -> float | None:
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


def parse_box(value: Any) -> tuple[int, int, int, int] | None:
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


def positive_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise refuse(f"Invalid value for {name!r}: must be a whole number of pixels")
    if value < 1:
        raise refuse(f"Invalid value for {name!r}: must be at least 1")
    return int(value)


def positive_number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip().rstrip("xX"))
        except ValueError as exc:
            raise refuse(f"Invalid value for {name!r}: must be a number") from exc
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise refuse(f"Invalid value for {name!r}: must be a positive number")
    return float(value)


def quality_value(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
        raise refuse("Invalid value for 'quality': must be an integer from 1 to 100")
    return value


def upscale_factor(value: float) -> int:
    if value not in UPSCALE_FACTORS:
        raise refuse("upscale supports factors 2x, 3x and 4x; use resize for other scales")
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


def plan_from_params(operation: Any, request: ImageRequest) -> Plan:
    params = request.params
    if isinstance(operation, str):
        names = [n for n in re.split(r"[,+]", operation) if n.strip()]
    elif isinstance(operation, Sequence) and all(isinstance(n, str) for n in operation):
        names = list(operation)
    else:
        raise refuse("Invalid value for 'operation': must be a name or a list of names")
    plan = Plan(steps=[], output_format=normalise_format(request.output_format))
    plan.quality = quality_value(params.get("quality"))
    for raw in names:
        key = re.sub(r"[\s-]+", "_", raw.strip().lower())
        op = _OP_ALIASES.get(key)
        if op is None:
            raise cannot(raw)
        if op == "convert":
            continue
        if op == "crop":
            plan.steps.append(crop_step_from(params.get("crop"), params, request))
        elif op == "resize":
            plan.steps.append(resize_step_from({}, params, request))
        elif op == "upscale":
            factor = positive_number(params.get("scale", params.get("factor", 2)), "scale")
            plan.steps.append(Step("upscale", {"factor": upscale_factor(factor or 2)}))
        elif op == "rotate":
            angle = _number(params.get("angle"), "angle")
            if angle is None:
                raise refuse("rotate needs params.angle (degrees, clockwise)")
            plan.steps.append(Step("rotate", {"angle": angle}))
        elif op == "flip":
            direction = str(params.get("direction", "horizontal")).lower()
            if key == "mirror":
                direction = "horizontal"
            if direction not in ("horizontal", "vertical"):
                raise refuse("Invalid value for 'direction': use horizontal or vertical")
            plan.steps.append(Step("flip", {"direction": direction}))
        else:
            plan.steps.append(Step("grayscale"))
    return plan


def _number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise refuse(f"Invalid value for {name!r}: must be a number")
    return float(value)


def crop_step_from(explicit: Any, params: Mapping[str, Any], request: ImageRequest) -> Step:
    """A crop from an explicit box/ratio, else params.aspect_ratio, else the request's."""
    for source in (explicit, params.get("aspect_ratio"), request.aspect_ratio):
        if source is None:
            continue
        box = parse_box(source)
        if box is not None:
            return Step("crop", {"box": box})
        ratio = parse_ratio(source)
        if ratio is not None:
            return Step("crop", {"ratio": ratio})
        raise refuse(f"Invalid crop {source!r}: use 'x,y,w,h' or an aspect ratio like '16:9'")
    raise refuse("crop needs a box 'x,y,w,h' (params.crop) or an aspect ratio like '16:9'")


def resize_step_from(
    found: Mapping[str, Any], params: Mapping[str, Any], request: ImageRequest
) -> Step:
    """A resize from what the prompt said, else params width/height/scale, else the
    request's width/height."""
    fit = str(params.get("fit", "cover")).lower()
    if fit not in ("cover", "contain", "stretch"):
        raise refuse("Invalid value for 'fit': use cover, contain or stretch")
    if found:
        return Step("resize", {**found, "fit": fit})
    width = positive_int(params.get("width", request.width), "width")
    height = positive_int(params.get("height", request.height), "height")
    scale = positive_number(params.get("scale"), "scale")
    if width is not None or height is not None:
        return Step("resize", {"width": width, "height": height, "fit": fit})
    if scale is not None:
        return Step("resize", {"scale": scale})
    raise refuse(
        "resize needs a size: 'resize to 800x600', 'resize to 50%', 'resize to 1024px', "
        "or width/height/scale"
    )


def add_request_geometry(plan: Plan, request: ImageRequest) -> None:
    """Honour the request's own size/aspect_ratio fields when no step already used them, so
    the output never silently ignores a requested geometry."""
    ops = {s.op for s in plan.steps}
    has_size = request.width is not None or request.height is not None
    if request.aspect_ratio and "crop" not in ops and not (request.width and request.height):
        ratio = parse_ratio(request.aspect_ratio)
        if ratio is None:
            raise refuse(f"Invalid aspect_ratio {request.aspect_ratio!r}: use e.g. '16:9'")
        plan.steps.append(Step("crop", {"ratio": ratio}))
    if has_size and not ops & {"resize", "upscale"}:
        plan.steps.append(
            Step("resize", {"width": request.width, "height": request.height, "fit": "cover"})
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
