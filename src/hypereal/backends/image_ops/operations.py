"""The edit steps themselves (crop, resize, upscale, rotate, flip, grayscale), each checking
the output pixel cap before it makes anything."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from PIL import Image, ImageFilter, ImageOps

from hypereal.backends.base import ImageRequest
from hypereal.backends.image_codec import DEFAULT_MAX_OUTPUT_PIXELS, check_pixels, has_alpha
from hypereal.backends.image_ops.plan import Plan, add_request_geometry, refuse


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
            raise refuse(
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
        raise refuse("resize needs a width, a height or a scale")
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
    if not has_alpha(img):
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


def apply_plan(img: Image.Image, plan: Plan, max_output_pixels: int) -> Image.Image:
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
            img = img.convert("LA" if has_alpha(img) else "L")
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
    plan = Plan(steps=[], output_format="png")
    add_request_geometry(plan, request)
    return apply_plan(img, plan, max_output_pixels)


# ----------------------------------------------------------------------- the backend
