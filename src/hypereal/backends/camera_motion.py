"""Camera moves over a still image, encoded as H.264 MP4 with PyAV, offline on CPU.

:class:`CameraMotionVideo` is the ``camera-motion-i2v`` video backend. It is not a generative
model: it animates the input image with one camera move, chosen by ``input.motion`` or read
from the prompt, and never invents content.

Moves (``input.motion`` value, then prompt words that select it):

- ``pan-left`` / ``pan-right`` / ``pan-up`` / ``pan-down``: "pan left", "truck right", "tilt
  up", "move down" ... The camera turns that way, so the picture slides the other way: on
  "pan left" the content moves to the right of the frame.
- ``zoom-in`` / ``zoom-out``: "zoom in", "push in", "dolly in", "pull back", "zoom out" ...
- ``orbit``: "orbit", "parallax", "3d", "around": a sideways camera move with parallax. A
  depth proxy (mostly the vertical position, lower is nearer, plus some brightness, brighter
  is nearer, heavily smoothed) displaces every pixel in proportion to its depth, a continuum
  of layers in which near ones travel further than far ones, with a slight push in.
- Without a recognised word: a slow zoom in.

"slow"/"gentle"/"subtle" make the move smaller, "fast"/"quick"/"dramatic" larger. Every move
is eased in and out (sine easing) and zooms are interpolated in log scale, so the apparent
speed is even. The video has exactly ``duration * fps`` frames; its size follows the image's
aspect ratio (clamped to 21:9 either way, centre-cropped beyond) with the short side set by
``resolution`` (480p, 720p, 1080p), both sides even, pixel format yuv420p, and the moov atom at
the start of the file (``+faststart``) so it streams.

Options (all optional):

- ``max_input_pixels``: largest source image accepted (default 40 MP).
- ``max_duration``: longest video in seconds (default 60; the catalogue allows 20).
- ``codec``: H.264 encoder to use; by default the first of ``libx264``, ``libopenh264``,
  ``h264`` that the installed PyAV/FFmpeg build has.
- ``crf``: libx264 constant rate factor (default 20); ``preset``: libx264 preset (default
  ``veryfast``).
- ``bits_per_pixel``: bit rate, per pixel per frame, for encoders without CRF (default 0.12).

Needs the ``local`` extra (``av`` and ``numpy``); without it the constructor raises
BackendUnavailable.
"""

from __future__ import annotations

import math
import re
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
from PIL import Image, ImageFilter

from hypereal.backends.base import (
    BackendError,
    BackendUnavailable,
    JobRequest,
    JobResult,
    MediaBlob,
    ProgressCallback,
)
from hypereal.backends.extras import require_local_extra
from hypereal.backends.image_codec import decode_image, input_pixel_cap

try:
    import av
    import numpy as np
except ImportError as _exc:  # pragma: no cover - the `local` extra is not installed
    _MISSING: str | None = _exc.name or str(_exc)
else:
    _MISSING = None

__all__ = [
    "MOTIONS",
    "CameraMotionVideo",
    "choose_h264_encoder",
    "motion_from_prompt",
    "output_size",
]

MOTIONS = ("pan-left", "pan-right", "pan-up", "pan-down", "zoom-in", "zoom-out", "orbit")
DEFAULT_MOTION = "zoom-in"
_ENCODER_PREFERENCE = ("libx264", "libopenh264", "h264")
_RESOLUTIONS: Mapping[str, int] = {"480p": 480, "720p": 720, "1080p": 1080}
_MAX_ASPECT = 21 / 9

# Prompt phrases, each mapped to a move. The earliest match in the prompt wins, so "zoom in,
# then pan left" zooms in.
_DIRECTIONS = r"(?:to\s+the\s+|towards?\s+(?:the\s+)?)?"
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "zoom-out",
        re.compile(r"\b(?:zoom(?:s|ing)?|dolly|pull(?:s|ing)?)\s*(?:-\s*)?(?:out|back)\b"),
    ),
    ("zoom-out", re.compile(r"\b(?:zoom[- ]?out|pull[- ]?back|dolly[- ]?out)\b")),
    ("zoom-in", re.compile(r"\b(?:zoom(?:s|ing)?|dolly|push(?:es|ing)?)\s*(?:-\s*)?in\b")),
    ("zoom-in", re.compile(r"\b(?:close[- ]?up|move(?:s|ing)?\s+closer)\b")),
    (
        "pan-left",
        re.compile(
            rf"\b(?:pan(?:s|ning)?|truck(?:s|ing)?|mov(?:e|es|ing)|track(?:s|ing)?)\s+"
            rf"{_DIRECTIONS}left\b"
        ),
    ),
    (
        "pan-right",
        re.compile(
            rf"\b(?:pan(?:s|ning)?|truck(?:s|ing)?|mov(?:e|es|ing)|track(?:s|ing)?)\s+"
            rf"{_DIRECTIONS}right\b"
        ),
    ),
    (
        "pan-up",
        re.compile(rf"\b(?:pan(?:s|ning)?|tilt(?:s|ing)?|mov(?:e|es|ing))\s+{_DIRECTIONS}up\b"),
    ),
    (
        "pan-down",
        re.compile(rf"\b(?:pan(?:s|ning)?|tilt(?:s|ing)?|mov(?:e|es|ing))\s+{_DIRECTIONS}down\b"),
    ),
    (
        "orbit",
        re.compile(r"\b(?:orbit(?:s|ing)?|parallax|3d|arc\s+shot|circl(?:e|es|ing)\s+around)\b"),
    ),
    # Bare words last: on a tie the earlier pattern wins.
    ("zoom-in", re.compile(r"\bzoom(?:s|ing)?\b")),
    ("pan-right", re.compile(r"\bpan(?:s|ning)?\b")),
)
_MOTION_ALIASES: Mapping[str, str] = {
    **{m: m for m in MOTIONS},
    "parallax": "orbit",
    "zoom": "zoom-in",
    "tilt-up": "pan-up",
    "tilt-down": "pan-down",
}
_SLOW = re.compile(r"\b(?:slow(?:ly)?|gentle|gently|subtle|subtly|slight(?:ly)?)\b")
_FAST = re.compile(r"\b(?:fast|quick(?:ly)?|rapid(?:ly)?|dramatic(?:ally)?|strong)\b")


def _client(message: str) -> BackendError:
    return BackendError(message, client_error=True)


# ----------------------------------------------------------------------------- planning


def motion_from_prompt(prompt: str) -> tuple[str | None, float]:
    """(move named in ``prompt`` or None, speed factor from its slow/fast words)."""
    text = prompt.lower()
    best: tuple[int, str] | None = None
    for motion, pattern in _PATTERNS:
        match = pattern.search(text)
        if match and (best is None or match.start() < best[0]):
            best = (match.start(), motion)
    speed = 1.0
    if _SLOW.search(text):
        speed = 0.6
    elif _FAST.search(text):
        speed = 1.5
    return (best[1] if best else None), speed


def output_size(image_width: int, image_height: int, short_side: int) -> tuple[int, int]:
    """Video size for an image: its aspect ratio (clamped to 21:9 each way), the short side
    ``short_side``, both sides even."""
    aspect = min(max(image_width / image_height, 1 / _MAX_ASPECT), _MAX_ASPECT)

    def even(value: float) -> int:
        return max(2, 2 * round(value / 2))

    if aspect >= 1:
        return even(short_side * aspect), even(short_side)
    return even(short_side), even(short_side / aspect)


def choose_h264_encoder(preferred: str | None = None) -> str:
    """The H.264 encoder this PyAV build can open for writing: ``preferred`` when given,
    else the first of libx264, libopenh264, h264. Raises BackendUnavailable if none."""
    candidates = (preferred,) if preferred else _ENCODER_PREFERENCE
    for name in candidates:
        try:
            codec = av.Codec(name, "w")
        except Exception:  # unknown codec name: av raises its own error types
            continue
        # "h264" resolves to the build's default H.264 encoder; return its real name.
        if codec.type == "video" and codec.canonical_name == "h264":
            return str(codec.name)
    wanted = preferred or ", ".join(_ENCODER_PREFERENCE)
    raise BackendUnavailable(f"this PyAV/FFmpeg build has no H.264 encoder ({wanted})")


@dataclass(frozen=True)
class _Plan:
    motion: str
    speed: float
    width: int
    height: int
    fps: int
    frames: int


def _ease(t: float) -> float:
    """Sine ease-in-out on [0, 1]."""
    return 0.5 - 0.5 * math.cos(math.pi * min(max(t, 0.0), 1.0))


# Camera parameters. Zoom z means the visible window is 1/z of the canvas on each side; the
# canvas is the source cropped to the video's aspect and scaled to ``video size * _CANVAS``.
_PAN_ZOOM = 1.25  # pans look through a 1/1.25 window that travels across the canvas
_ZOOM_RANGE = 1.3  # zoom in/out goes from 1 to this (times the speed factor's share)
_ORBIT_ZOOM = (1.1, 1.18)
_ORBIT_SHIFT = 0.07  # near-to-far parallax swing as a fraction of the video width
_CANVAS = 1.3
_MAX_ZOOM = 1.5  # past the canvas factor the last frames are slightly upsampled


@dataclass(frozen=True)
class _View:
    """A window on the canvas: centre (fractions of the canvas) and zoom (>= 1)."""

    cx: float
    cy: float
    zoom: float


def _view_at(motion: str, speed: float, t: float) -> tuple[_View, float]:
    """The camera at time ``t`` in [0, 1]: the canvas window and, for orbit, the signed
    parallax swing (fraction of the video width; 0 otherwise)."""
    e = _ease(t)
    if motion.startswith("pan-"):
        # The window is 1/zoom of the canvas and travels edge to edge: the picture slides by
        # (zoom - 1) video widths (or heights) over the clip.
        zoom = min(1 + (_PAN_ZOOM - 1) * speed, _MAX_ZOOM)
        offset = (1 - 1 / zoom) / 2 * (2 * e - 1)  # window centre: 0.5 -+ this
        # The camera turns left: the window moves from the right of the canvas to the left.
        if motion == "pan-left":
            return _View(0.5 - offset, 0.5, zoom), 0.0
        if motion == "pan-right":
            return _View(0.5 + offset, 0.5, zoom), 0.0
        if motion == "pan-up":
            return _View(0.5, 0.5 - offset, zoom), 0.0
        return _View(0.5, 0.5 + offset, zoom), 0.0
    if motion in ("zoom-in", "zoom-out"):
        end = min(1 + (_ZOOM_RANGE - 1) * speed, _MAX_ZOOM)
        progress = e if motion == "zoom-in" else 1 - e
        return _View(0.5, 0.5, math.exp(math.log(end) * progress)), 0.0
    start, stop = _ORBIT_ZOOM
    zoom = math.exp(math.log(start) + (math.log(stop) - math.log(start)) * e)
    swing = _ORBIT_SHIFT * speed * (2 * e - 1)
    return _View(0.5, 0.5, zoom), swing


# ---------------------------------------------------------------------------- rendering


def _cover(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``img`` centre-cropped to the aspect of ``size`` and resized to it."""
    src_w, src_h = img.size
    target = size[0] / size[1]
    if src_w / src_h > target:
        crop_w = src_h * target
        box = ((src_w - crop_w) / 2, 0.0, (src_w + crop_w) / 2, float(src_h))
    else:
        crop_h = src_w / target
        box = (0.0, (src_h - crop_h) / 2, float(src_w), (src_h + crop_h) / 2)
    return img.resize(size, Image.Resampling.LANCZOS, box=box)


def _window(view: _View, canvas: tuple[int, int]) -> tuple[float, float, float, float]:
    cw, ch = canvas
    ww, wh = cw / view.zoom, ch / view.zoom
    x0 = min(max(view.cx * cw - ww / 2, 0.0), cw - ww)
    y0 = min(max(view.cy * ch - wh / 2, 0.0), ch - wh)
    return x0, y0, x0 + ww, y0 + wh


def _depth_map(canvas: Image.Image) -> Image.Image:
    """Depth proxy on the canvas, 0 = far, 1 = near: mostly height in the frame (lower is
    nearer), some brightness, smoothed so the displacement never tears."""
    small_w = 96
    small_h = max(2, round(small_w * canvas.height / canvas.width))
    grey = canvas.convert("L").resize((small_w, small_h), Image.Resampling.BOX)
    grey = grey.filter(ImageFilter.GaussianBlur(3))
    bright = np.asarray(grey, dtype=np.float32) / 255.0
    span = float(bright.max() - bright.min())
    bright = (bright - bright.min()) / span if span > 1e-6 else np.zeros_like(bright)
    vertical = np.linspace(0.0, 1.0, small_h, dtype=np.float32)[:, None]
    depth = 0.75 * vertical + 0.25 * bright
    img = Image.fromarray(depth.astype(np.float32))  # float32 -> mode "F"
    return img.resize(canvas.size, Image.Resampling.BILINEAR)


class _Renderer:
    def __init__(self, source: Image.Image, plan: _Plan) -> None:
        self.plan = plan
        canvas_size = (round(plan.width * _CANVAS), round(plan.height * _CANVAS))
        self.canvas = _cover(source.convert("RGB"), canvas_size)
        self.depth = _depth_map(self.canvas) if plan.motion == "orbit" else None

    def frame(self, index: int) -> Any:
        """Frame ``index`` as an RGB uint8 array (height, width, 3)."""
        plan = self.plan
        t = index / (plan.frames - 1) if plan.frames > 1 else 0.0
        view, swing = _view_at(plan.motion, plan.speed, t)
        box = _window(view, self.canvas.size)
        if self.depth is None:
            img = self.canvas.resize(
                (plan.width, plan.height), Image.Resampling.BICUBIC, box=box, reducing_gap=None
            )
            return np.asarray(img, dtype=np.uint8)
        return self._parallax(box, swing, self.depth)

    def _parallax(
        self, box: tuple[float, float, float, float], swing: float, depth_map: Image.Image
    ) -> Any:
        """Backward warp in video pixels: the window, widened by the largest shift, is
        resampled to video scale, then each pixel takes its colour from ``swing * width *
        (depth - 0.5)`` to the side (near and far move in opposite directions)."""
        width, height = self.plan.width, self.plan.height
        x0, y0, x1, y1 = box
        scale = width / (x1 - x0)  # video pixels per canvas pixel
        max_shift = abs(swing) * width / 2 + 2  # video pixels
        margin = max_shift / scale
        ex0 = max(0.0, x0 - margin)
        ex1 = min(float(self.canvas.width), x1 + margin)
        ext_w = max(2, round((ex1 - ex0) * scale))
        ext_box = (ex0, y0, ex1, y1)
        wide = self.canvas.resize(
            (ext_w, height), Image.Resampling.BICUBIC, box=ext_box, reducing_gap=None
        )
        pixels = np.asarray(wide, dtype=np.uint8).reshape(-1, 3)
        depth_wide = np.asarray(
            depth_map.resize((ext_w, height), Image.Resampling.BILINEAR, box=ext_box),
            dtype=np.float32,
        )
        scale_x = ext_w / (ex1 - ex0)
        base = (
            (x0 - ex0) * scale_x
            + (np.arange(width, dtype=np.float32) + 0.5) * ((x1 - x0) * scale_x / width)
            - 0.5
        )
        columns = np.clip(np.rint(base), 0, ext_w - 1).astype(np.intp)
        depth = depth_wide[:, columns]
        src = np.clip(base[None, :] - swing * width * (depth - 0.5), 0, ext_w - 1)
        left = np.minimum(np.floor(src).astype(np.intp), ext_w - 2)
        frac = (src - left)[..., None]
        rows = (np.arange(height, dtype=np.intp) * ext_w)[:, None]
        flat = rows + left
        before = pixels[flat].astype(np.float32)
        after = pixels[flat + 1].astype(np.float32)
        out = before + (after - before) * frac
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- encoding


def _encode(
    renderer: _Renderer,
    encoder: str,
    encoder_options: Mapping[str, str],
    bit_rate: int,
    report: Callable[[int], None],
) -> bytes:
    plan = renderer.plan
    with tempfile.TemporaryDirectory(prefix="hypereal-camera-") as tmp:
        path = Path(tmp) / "out.mp4"
        # A real file, not BytesIO: +faststart rewrites the file in a second pass.
        with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as out:
            stream = out.add_stream(encoder, rate=plan.fps)
            if not isinstance(stream, av.VideoStream):  # pragma: no cover - H.264 is video
                raise BackendError(f"{encoder} did not open a video stream")
            stream.width = plan.width
            stream.height = plan.height
            stream.pix_fmt = "yuv420p"
            stream.time_base = Fraction(1, plan.fps)
            if encoder == "libx264":
                stream.options = dict(encoder_options)
            else:
                stream.bit_rate = bit_rate
            for index in range(plan.frames):
                frame = av.VideoFrame.from_ndarray(renderer.frame(index), format="rgb24")
                frame.pts = index
                frame.time_base = Fraction(1, plan.fps)
                for packet in stream.encode(frame):
                    out.mux(packet)
                report(index + 1)
            for packet in stream.encode(None):
                out.mux(packet)
        return path.read_bytes()


# ------------------------------------------------------------------------------ backend


def _int_option(options: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BackendUnavailable(
            f"option {name!r} must be an integer from {low} to {high}, got {value!r}"
        )
    return value


class CameraMotionVideo:
    """Offline ``camera-motion-i2v`` backend: pan, zoom or parallax orbit over the input
    image, H.264 MP4 out. See the module docstring for the moves and the options."""

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        """Check PyAV/numpy and the options; raises BackendUnavailable when unusable."""
        options = options or {}
        require_local_extra("CameraMotionVideo", "PyAV and numpy", _MISSING)
        self.max_input_pixels = input_pixel_cap(options)
        self.max_duration = _int_option(options, "max_duration", 60, 1, 600)
        self.crf = _int_option(options, "crf", 20, 0, 51)
        self.preset = str(options.get("preset", "veryfast"))
        bpp = options.get("bits_per_pixel", 0.12)
        if isinstance(bpp, bool) or not isinstance(bpp, int | float) or not 0 < bpp <= 10:
            raise BackendUnavailable(f"option 'bits_per_pixel' must be in (0, 10], got {bpp!r}")
        self.bits_per_pixel = float(bpp)
        codec = options.get("codec")
        if codec is not None and not isinstance(codec, str):
            raise BackendUnavailable(f"option 'codec' must be an encoder name, got {codec!r}")
        self.encoder = choose_h264_encoder(codec)

    def _read_request(self, request: JobRequest) -> tuple[str, float, float, int, int]:
        """(motion, speed, duration s, fps, short side) from the validated input."""
        values = request.input
        prompt = values.get("prompt") or ""
        if not isinstance(prompt, str):
            raise _client("prompt must be a string")
        prompt_motion, speed = motion_from_prompt(prompt)
        explicit = values.get("motion")
        if explicit:
            motion = _MOTION_ALIASES.get(str(explicit).strip().lower())
            if motion is None:
                raise _client(f"Unknown motion {explicit!r}: use one of {', '.join(MOTIONS)}")
        else:
            motion = prompt_motion or DEFAULT_MOTION
            if prompt_motion is None:
                speed = min(speed, 0.6)  # the default is a slow zoom in
        duration = values.get("duration", 5)
        if isinstance(duration, bool) or not isinstance(duration, int | float):
            raise _client(f"duration must be a number of seconds, got {duration!r}")
        if not 0 < duration <= self.max_duration:
            raise _client(f"duration must be from 1 to {self.max_duration} seconds")
        fps = values.get("fps", 24)
        if isinstance(fps, bool) or not isinstance(fps, int) or not 1 <= fps <= 60:
            raise _client(f"fps must be an integer from 1 to 60, got {fps!r}")
        resolution = str(values.get("resolution") or "720p").lower()
        if resolution not in _RESOLUTIONS:
            raise _client(f"resolution must be one of {', '.join(_RESOLUTIONS)}")
        return motion, speed, float(duration), fps, _RESOLUTIONS[resolution]

    async def generate_video(self, request: JobRequest, progress: ProgressCallback) -> JobResult:
        """Animate ``request.media['image']``; client errors for a missing/bad image or
        out-of-range input."""
        blob = request.media.get("image")
        if blob is None:
            raise _client("This model animates an image: pass it in 'image'")
        motion, speed, duration, fps, short_side = self._read_request(request)
        frames = max(1, round(duration * fps))
        await progress(0.0, f"rendering {frames} frames ({motion})")

        # Set when the job is cancelled or times out: the encoder thread stops at the next frame
        # (cancelling the awaiting task alone leaves a thread rendering on).
        stop = threading.Event()

        def report(done: int) -> None:
            # Runs in the worker thread: check for cancellation, post progress every ~5%.
            if stop.is_set():
                raise anyio.get_cancelled_exc_class()()
            anyio.from_thread.check_cancelled()
            step = max(1, frames // 20)
            if done % step == 0 or done == frames:
                fraction = 0.95 * done / frames
                message = f"encoded {done}/{frames} frames"

                async def post() -> None:
                    await progress(fraction, message)

                try:
                    anyio.from_thread.run(post)
                except Exception:  # progress is best-effort
                    pass

        def work() -> tuple[bytes, _Plan]:
            image = decode_image(blob, max_pixels=self.max_input_pixels, what="input image")
            width, height = output_size(image.width, image.height, short_side)
            plan = _Plan(motion, speed, width, height, fps, frames)
            renderer = _Renderer(image, plan)
            options = {"crf": str(self.crf), "preset": self.preset}
            bit_rate = max(200_000, round(width * height * fps * self.bits_per_pixel))
            try:
                data = _encode(renderer, self.encoder, options, bit_rate, report)
            except (av.FFmpegError, OSError, ValueError) as exc:
                raise BackendError(f"H.264 encoding failed ({self.encoder}): {exc}") from exc
            return data, plan

        try:
            data, plan = await anyio.to_thread.run_sync(work)
        except BaseException:
            stop.set()
            raise
        await progress(1.0, "encoded")
        return JobResult(
            output=MediaBlob(data, "video/mp4"),
            data={
                "duration_seconds": plan.frames / plan.fps,
                "fps": plan.fps,
                "frames": plan.frames,
                "width": plan.width,
                "height": plan.height,
                "motion": plan.motion,
                "codec": "h264",
            },
        )
