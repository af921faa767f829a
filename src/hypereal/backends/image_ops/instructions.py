"""The natural-language instruction parser: "crop to 16:9 and convert to webp" -> a plan of
steps. A clause it cannot read is refused (a client error), never guessed at."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from hypereal.backends.base import ImageRequest
from hypereal.backends.image_codec import normalise_format
from hypereal.backends.image_ops.plan import (
    CAPABILITIES,
    Plan,
    Step,
    add_request_geometry,
    cannot,
    crop_step_from,
    plan_from_params,
    quality_value,
    refuse,
    resize_step_from,
    upscale_factor,
)

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
        raise refuse("rotate needs an angle, e.g. 'rotate 90' (clockwise) or 'rotate left'")
    # Clockwise is what "rotate 90" means in photo editors; Pillow's sign is the reverse,
    # handled when the step runs.
    return {"angle": -angle if ccw is not None else angle}


def _only_filler(clause: str) -> bool:
    words = re.findall(r"[a-z0-9]+", clause)
    return all(w in _FILLER for w in words)


def plan_from_prompt(prompt: str, request: ImageRequest) -> Plan:
    params = request.params
    text = prompt.lower().strip()
    # "black and white" must survive the split on "and" below.
    text = re.sub(r"black\s*(?:and|&|-|/)\s*white|\bb\s*&\s*w\b|\bb/w\b", " grayscale ", text)
    plan = Plan(steps=[], output_format=normalise_format(request.output_format))
    plan.quality = quality_value(params.get("quality"))
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
            plan.quality = quality_value(int(next(g for g in quality.groups() if g)))
        step = _step_from_clause(clause, params, request)
        if step is not None:
            plan.steps.append(step)
        elif fmt is None and quality is None:
            if not _only_filler(clause):
                raise cannot(clause)
            continue
        plan.instructed = True
    return plan


def _step_from_clause(clause: str, params: Mapping[str, Any], request: ImageRequest) -> Step | None:
    if _RE_UPSCALE.search(clause):
        sized = _resize_args(clause)
        if "width" in sized or "height" in sized or "max_side" in sized:
            # "upscale to 1920x1080" names a size, not a factor.
            return resize_step_from(sized, params, request)
        factor = _factor_in(clause) or 2.0
        return Step("upscale", {"factor": upscale_factor(factor)})
    if _RE_FLIP.search(clause):
        vertical = re.search(r"vertical|upside|top[- ]to[- ]bottom|up[- ]down", clause)
        return Step("flip", {"direction": "vertical" if vertical else "horizontal"})
    if _RE_ROTATE.search(clause):
        return Step("rotate", _rotate_args(clause))
    # An explicit "crop" wins over a size; "square"/"aspect" alone only when no resize word.
    if _RE_CROP.search(clause) or (_RE_SHAPE.search(clause) and not _RE_RESIZE.search(clause)):
        box = re.search(r"(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)", clause)
        if box is not None:
            return Step("crop", {"box": tuple(int(g) for g in box.groups())})
        ratio = re.search(_NUMBER + r"\s*[:/]\s*" + _NUMBER, clause)
        if ratio is not None:
            return crop_step_from(f"{ratio.group(1)}:{ratio.group(2)}", params, request)
        if "square" in clause:
            return Step("crop", {"ratio": 1.0})
        return crop_step_from(params.get("crop"), params, request)
    if _RE_RESIZE.search(clause):
        return resize_step_from(_resize_args(clause), params, request)
    if _RE_GREY.search(clause):
        return Step("grayscale")
    return None


def plan_request(request: ImageRequest) -> Plan:
    """The plan for ``request``: its ``params.operation`` when set, else what its prompt
    says, plus its own size and aspect ratio. Cheap and pure, so bad instructions are refused
    before any image is decoded. Raises BackendError(client_error=True)."""
    operation = request.params.get("operation")
    if operation:
        plan = plan_from_params(operation, request)
    else:
        plan = plan_from_prompt(request.prompt or "", request)
    add_request_geometry(plan, request)
    if not plan.instructed and not plan.steps:
        raise refuse(f"Say what to do with the image. This model does: {CAPABILITIES}.")
    return plan
