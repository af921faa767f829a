"""``diffusers_video``: Wan 2.x text-to-video and image-to-video, encoded to H.264 MP4."""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
from PIL import Image, ImageOps

from hypereal.backends.base import (
    BackendError,
    BackendUnavailable,
    JobRequest,
    JobResult,
    MediaBlob,
    ProgressCallback,
)
from hypereal.backends.diffusers import resident
from hypereal.backends.diffusers.options import DEFAULT_FPS, VIDEO_PIPELINES
from hypereal.backends.diffusers.resident import run_interruptible
from hypereal.backends.diffusers.runtime import DiffusersBackend, decode_source, pick_seed
from hypereal.backends.diffusers.sizes import fit, video_size

log = logging.getLogger("hypereal.backends.diffusers")


@dataclass(frozen=True)
class _VideoPlan:
    model_dir: Path
    kind: str
    prompt: str
    negative_prompt: str | None
    source: Image.Image | None
    seed: int
    steps: int
    guidance: float
    duration: float
    resolution: Any
    aspect_ratio: Any
    width: Any
    height: Any


class DiffusersVideo(DiffusersBackend):
    """Wan 2.x text-to-video and image-to-video from a local diffusers pipeline directory,
    encoded to H.264 MP4. See the module docstring for options and frame counts."""

    _kinds = VIDEO_PIPELINES
    _video = True

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        extra = self._options.extra
        fps = extra.get("fps", DEFAULT_FPS)
        max_frames = extra.get("max_frames")
        if isinstance(fps, bool) or not isinstance(fps, int) or not 1 <= fps <= 120:
            raise BackendUnavailable("option `fps` must be an integer from 1 to 120")
        if max_frames is not None and (
            isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1
        ):
            raise BackendUnavailable("option `max_frames` must be a positive integer")
        self._fps: int = fps
        self._max_frames: int | None = max_frames
        self._av = importlib.import_module("av")

    async def generate_video(self, request: JobRequest, progress: ProgressCallback) -> JobResult:
        """Generate one MP4; reports progress per denoising step. Raises BackendError."""
        model_dir = self._model_dir(request.upstream_model)
        kind = self._pipeline_kind(model_dir)
        data = request.input
        source = None
        image = request.media.get("image")
        if kind == "wan-i2v":
            if image is None:
                raise BackendError("image-to-video needs the source `image`", client_error=True)
            source = decode_source(image)
        duration = data.get("duration", 5)
        if (
            isinstance(duration, bool)
            or not isinstance(duration, (int, float))
            or not 0 < duration <= 60
        ):
            raise BackendError(
                "duration must be a positive number of seconds, at most 60", client_error=True
            )
        negative = data.get("negative_prompt", self._options.extra.get("negative_prompt"))
        plan = _VideoPlan(
            model_dir=model_dir,
            kind=kind,
            prompt=str(data.get("prompt") or ""),
            negative_prompt=str(negative) if negative else None,
            source=source,
            seed=pick_seed(data.get("seed")),
            steps=self._steps(data.get("num_inference_steps"), 50),
            guidance=self._guidance(data.get("guidance_scale"), 5.0),
            duration=float(duration),
            resolution=data.get("resolution"),
            aspect_ratio=data.get("aspect_ratio"),
            width=data.get("width"),
            height=data.get("height"),
        )
        # Validate the size on the event loop so bad input fails before queueing.
        video_size(plan.resolution, plan.aspect_ratio, plan.width, plan.height, source)

        interrupt = threading.Event()
        key = self._key(model_dir, kind)

        def report(fraction: float, message: str) -> None:
            if interrupt.is_set():
                return

            async def call() -> None:
                await progress(fraction, message)

            try:
                anyio.from_thread.run(call)
            except Exception:  # progress is best-effort; a closed loop must not fail the job
                log.debug("diffusers: progress report failed", exc_info=True)

        def work() -> JobResult:
            report(0.0, "queued")
            return self._with_pipeline(
                key,
                interrupt,
                lambda pipe: self._generate(pipe, plan, interrupt, report),
                before_load=lambda: report(0.01, "loading model"),
            )

        return await run_interruptible(work, interrupt)

    def _generate(
        self,
        pipe: Any,
        plan: _VideoPlan,
        interrupt: threading.Event,
        report: Callable[[float, str], None],
    ) -> JobResult:
        """One pipeline call plus MP4 encoding. Runs in the worker thread with the lock held."""
        width, height = video_size(
            plan.resolution, plan.aspect_ratio, plan.width, plan.height, plan.source
        )
        width, height = fit(width, height, self._options.max_pixels)
        temporal = int(getattr(pipe, "vae_scale_factor_temporal", 4))
        frames = frame_count(plan.duration, self._fps, temporal, self._max_frames)
        log.info(
            "diffusers %s: %dx%d, %d frames at %d fps, %d steps",
            plan.model_dir.name,
            width,
            height,
            frames,
            self._fps,
            plan.steps,
        )

        def on_step(step: int) -> None:
            report(0.05 + 0.85 * step / plan.steps, f"denoising step {step}/{plan.steps}")

        kwargs: dict[str, Any] = {
            "prompt": plan.prompt,
            "negative_prompt": plan.negative_prompt,
            "width": width,
            "height": height,
            "num_frames": frames,
            "num_inference_steps": plan.steps,
            "guidance_scale": plan.guidance,
            "generator": self._generator(plan.seed),
            "callback_on_step_end": resident.step_callback(interrupt, on_step),
            "output_type": "np",
        }
        if plan.kind == "wan-i2v" and plan.source is not None:
            # The pipeline stretches its image to the output size; crop to the output's aspect
            # ratio first so a 4:3 photo asked for at 16:9 is not distorted.
            kwargs["image"] = ImageOps.fit(plan.source, (width, height), Image.Resampling.LANCZOS)
        report(0.05, "generating")
        video = pipe(**kwargs).frames[0]  # (frames, height, width, 3) floats in [0, 1]
        report(0.92, "encoding MP4")
        pixels = (video * 255).round().clip(0, 255).astype("uint8")
        mp4 = encode_mp4(self._av, pixels, self._fps)
        n, out_h, out_w = (int(v) for v in pixels.shape[:3])
        return JobResult(
            output=MediaBlob(mp4, "video/mp4"),
            data={
                "width": out_w,
                "height": out_h,
                "frames": n,
                "fps": self._fps,
                "duration": round(n / self._fps, 3),
                "seed": plan.seed,
                "num_inference_steps": plan.steps,
            },
        )


def frame_count(duration: float, fps: int, temporal: int = 4, max_frames: int | None = None) -> int:
    """Frames Wan generates for ``duration`` seconds: the nearest ``temporal * k + 1`` to
    ``duration * fps`` (k >= 1), capped at ``max_frames`` (rounded down to that form)."""
    k = max(1, round(duration * fps / temporal))
    if max_frames is not None:
        k = max(1, min(k, (max_frames - 1) // temporal))
    return temporal * k + 1


def encode_mp4(av: Any, frames: Any, fps: int) -> bytes:
    """Encode ``frames`` (uint8 array: n x height x width x 3, RGB) as H.264 MP4 bytes.

    yuv420p (what every player decodes) needs even dimensions, so an odd row or column is
    cropped. ``+faststart`` puts the index first for streaming; the muxer rewrites the file to
    do that, which needs a real file rather than a memory buffer.
    """
    n, height, width = (int(v) for v in frames.shape[:3])
    even_h, even_w = height - height % 2, width - width % 2
    if n == 0 or even_h == 0 or even_w == 0:
        raise BackendError("the pipeline returned an empty video")
    with tempfile.TemporaryDirectory(prefix="hypereal-mp4-") as tmp:
        path = os.path.join(tmp, "out.mp4")
        with av.open(path, mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = even_w, even_h, "yuv420p"
            stream.options = {"crf": "18", "preset": "medium"}
            for index in range(n):
                frame = av.VideoFrame.from_ndarray(frames[index, :even_h, :even_w], format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        with open(path, "rb") as fh:
            return fh.read()
