"""Local image and video generation with Hugging Face ``diffusers``, from weights on disk.

Two backend types share this module: ``diffusers_image`` (:class:`DiffusersImage`: FLUX.1
schnell/dev text-to-image, FLUX.1 Kontext and Qwen-Image-Edit image edits) and
``diffusers_video`` (:class:`DiffusersVideo`: Wan 2.x text-to-video and image-to-video).
Nothing is ever downloaded: pipelines load with ``local_files_only=True`` from a directory
the operator filled beforehand, e.g. ``hf download black-forest-labs/FLUX.1-schnell
--local-dir /models/flux-1-schnell``.

Requirements (not installed with hypereal): ``torch`` (CPU or CUDA build), ``diffusers``,
``transformers``, ``accelerate``, plus ``av`` (MP4 encoding) and ``ftfy`` (Wan's prompt
cleaning) for video. Without them, or without the weights directory, the constructor raises
:class:`BackendUnavailable` saying what is missing. Qwen-Image-Edit works without
``torchvision``: its Qwen2-VL processor is then built image-only (transformers' full one needs
torchvision for a video processor the pipeline never uses) from the ``processor/`` folder.

Options (``backends.<name>`` with ``type = "diffusers_image"`` or ``"diffusers_video"``):

``weights_dir`` (required)
    A diffusers pipeline directory (holding ``model_index.json``), or a directory of them
    named by the catalogue's ``upstream_model`` (``weights_dir/flux-1-schnell/...``). A
    request uses ``weights_dir/<upstream_model>`` when it exists, else ``weights_dir`` itself.
``pipeline``
    ``auto`` (default: the ``_class_name`` in ``model_index.json``) or, for images, ``flux``,
    ``flux-kontext``, ``qwen-image-edit``; for video, ``wan`` or ``wan-i2v``.
``device`` / ``dtype``
    ``auto`` (default) picks ``cuda`` when available, else ``cpu``; dtype ``auto`` is
    ``bfloat16`` on CUDA and ``float32`` on CPU (``float16`` also accepted).
``offload``
    ``none`` (default: the whole pipeline on the device), ``model``
    (``enable_model_cpu_offload``: one component on the GPU at a time) or ``sequential``
    (``enable_sequential_cpu_offload``: least memory, slowest). Ignored on CPU.
``num_inference_steps`` / ``guidance_scale``
    Defaults per pipeline: FLUX schnell 4 steps (no guidance), FLUX dev 28 / 3.5, Kontext
    28 / 2.5, Qwen-Image-Edit 50 / 4.0 (its true CFG scale), Wan 50 / 5.0. A request may
    override both with ``num_inference_steps`` / ``guidance_scale`` params (steps are capped by
    ``max_steps``, default 100).
``max_pixels``
    Largest ``width * height`` generated; bigger requests are scaled down keeping their aspect
    ratio (default 2 MP for images, 1280x720 for video).
``max_images`` (images)
    Most images one request may ask for with ``num_images`` (default 4).
``fps`` / ``max_frames`` / ``vae_tiling`` / ``negative_prompt`` (video)
    Frame rate (16, Wan 2.1/2.2 A14B's native rate; use 24 for Wan 2.2 TI2V-5B), an optional
    cap on frames, VAE tiling to decode big videos in less memory (off), and the default
    negative prompt (none).

Sizes: width and height are rounded to the nearest multiple of 16 (FLUX and Wan work on 16x16
pixel patches: 8x VAE downsampling times 2x2 patches); the rounding is logged, and for video
also returned in the job's ``data``. ``aspect_ratio`` alone (or with one side) picks a size of
about 1 MP for images; edits without any size keep their source image's aspect ratio. Video
``resolution`` (``480p``/``720p``/``1080p``) is the short side, the long side follows
``aspect_ratio`` (16:9 by default, the source image's ratio for image-to-video).

Video length: Wan generates ``4k + 1`` frames (its VAE compresses 4 frames into one latent
after the first), so ``duration * fps`` is rounded to the nearest ``4k + 1``: 5 s at 16 fps
is 81 frames (5.06 s). Frames are encoded to H.264 MP4 (yuv420p, ``+faststart``).

Memory: a process keeps ONE pipeline resident, whichever backend instance loaded it; a request
for another model unloads it first (and frees the CUDA cache), and generations run one at a
time. Cancelling the awaiting task interrupts the pipeline at its next denoising step.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import io
import json
import logging
import math
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread
from PIL import Image, ImageOps, UnidentifiedImageError

from hypereal.backends.base import (
    BackendError,
    BackendUnavailable,
    ImageRequest,
    JobRequest,
    JobResult,
    MediaBlob,
    ProgressCallback,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

INSTALL_HINT = (
    "install PyTorch first (CPU: `pip install torch==2.13.0 --index-url "
    "https://download.pytorch.org/whl/cpu`; CUDA: the matching build from pytorch.org), then "
    "`pip install diffusers==0.42.1 transformers==5.23.0 accelerate==1.15.0`"
)
VIDEO_INSTALL_HINT = "`pip install av==18.1.0 ftfy==6.3.1`"

# Pixel granularity of every pipeline here: 8x VAE downsampling times 2x2 latent patches.
SIZE_MULTIPLE = 16
DEFAULT_IMAGE_AREA = 1024 * 1024
DEFAULT_IMAGE_MAX_PIXELS = 2 * 1024 * 1024
DEFAULT_VIDEO_MAX_PIXELS = 1280 * 720
DEFAULT_MAX_STEPS = 100
DEFAULT_FPS = 16
VIDEO_SHORT_SIDES = {"480p": 480, "720p": 720, "1080p": 1080}

# model_index.json `_class_name` -> our pipeline kind, and kind -> diffusers class.
IMAGE_PIPELINES = {
    "FluxPipeline": "flux",
    "FluxKontextPipeline": "flux-kontext",
    "QwenImageEditPipeline": "qwen-image-edit",
}
VIDEO_PIPELINES = {"WanPipeline": "wan", "WanImageToVideoPipeline": "wan-i2v"}
PIPELINE_CLASSES = {
    "flux": "FluxPipeline",
    "flux-kontext": "FluxKontextPipeline",
    "qwen-image-edit": "QwenImageEditPipeline",
    "wan": "WanPipeline",
    "wan-i2v": "WanImageToVideoPipeline",
}
EDIT_KINDS = frozenset({"flux-kontext", "qwen-image-edit"})
EDIT_NAMES = {"flux-kontext": "FLUX.1 Kontext", "qwen-image-edit": "Qwen-Image-Edit"}

IMAGE_FORMATS = {
    "png": ("PNG", "image/png"),
    "jpeg": ("JPEG", "image/jpeg"),
    "jpg": ("JPEG", "image/jpeg"),
    "webp": ("WEBP", "image/webp"),
}


class _Interrupted(Exception):
    """Raised inside the worker thread once the awaiting task was cancelled."""


# ------------------------------------------------------------------ resident pipeline


@dataclass(frozen=True)
class _PipelineKey:
    path: str
    class_name: str
    device: str
    dtype: str
    offload: str


class _Resident:
    """The single pipeline loaded in this process.

    Diffusion models take most of a GPU, so two never stay loaded together: loading another
    unloads this one. ``lock`` is held (in the worker thread) for a whole load + generation,
    which also serialises generations on the one device.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.key: _PipelineKey | None = None
        self.pipe: Any = None

    def get(self, key: _PipelineKey, load: Callable[[], Any]) -> Any:
        """The pipeline for ``key``, loading it (after unloading another). Hold ``lock``."""
        if self.pipe is not None and self.key == key:
            return self.pipe
        self.unload()
        self.pipe = load()
        self.key = key
        return self.pipe

    def unload(self) -> None:
        """Drop the resident pipeline and give its memory back. Hold ``lock``."""
        if self.pipe is None:
            return
        log.info(
            "diffusers: unloading %s from %s",
            self.key.class_name if self.key else "?",
            self.key.path if self.key else "?",
        )
        self.pipe = None
        self.key = None
        # Components reference each other (and accelerate hooks reference them): collect the
        # cycles now so that the CUDA allocator can actually hand the memory back.
        gc.collect()
        torch = _torch_if_loaded()
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


_RESIDENT = _Resident()


def resident_model() -> str | None:
    """Directory of the pipeline loaded in this process, or None."""
    key = _RESIDENT.key
    return key.path if key is not None else None


def unload_resident() -> None:
    """Unload the resident pipeline (waits for a running generation to finish)."""
    with _RESIDENT.lock:
        _RESIDENT.unload()


def _torch_if_loaded() -> Any:
    import sys

    return sys.modules.get("torch")


# ------------------------------------------------------------------------- options


@dataclass(frozen=True)
class _Options:
    weights_dir: Path
    pipeline: str
    device: str
    dtype: str
    offload: str
    num_inference_steps: int | None
    guidance_scale: float | None
    max_pixels: int
    max_steps: int
    extra: Mapping[str, Any] = field(default_factory=dict)


def _import_runtime(*, video: bool) -> tuple[Any, Any]:
    """(torch, diffusers), or BackendUnavailable naming what to install."""
    try:
        torch = importlib.import_module("torch")
        diffusers = importlib.import_module("diffusers")
        importlib.import_module("transformers")
    except ImportError as exc:
        raise BackendUnavailable(
            f"the Python package {exc.name or 'torch/diffusers'} is not installed: {INSTALL_HINT}"
        ) from exc
    if video:
        missing = [name for name in ("av", "ftfy") if importlib.util.find_spec(name) is None]
        if missing:
            raise BackendUnavailable(
                f"video needs the Python packages {', '.join(missing)}: {VIDEO_INSTALL_HINT}"
            )
    return torch, diffusers


def _parse_options(
    options: Mapping[str, Any] | None, *, torch: Any, kinds: Mapping[str, str], video: bool
) -> _Options:
    opts = dict(options or {})
    kind = "video" if video else "image"

    raw_dir = opts.get("weights_dir")
    if not raw_dir or not isinstance(raw_dir, (str, os.PathLike)):
        raise BackendUnavailable(
            f"set the option `weights_dir` to a local diffusers {kind} pipeline directory (or a "
            "directory of them named by upstream model), e.g. after `hf download "
            "black-forest-labs/FLUX.1-schnell --local-dir /models/flux-1-schnell`"
        )
    weights_dir = Path(raw_dir).expanduser().resolve()
    if not weights_dir.is_dir():
        raise BackendUnavailable(
            f"the weights directory {weights_dir} does not exist: download the model there (e.g. "
            f"`hf download <repo> --local-dir {weights_dir}/<upstream_model>`); nothing is "
            "downloaded at run time"
        )
    if not _has_pipeline(weights_dir):
        raise BackendUnavailable(
            f"no diffusers pipeline (model_index.json) in {weights_dir} or its subdirectories: "
            "put a pipeline there, one subdirectory per upstream model"
        )

    pipeline = str(opts.get("pipeline", "auto"))
    if pipeline != "auto" and pipeline not in kinds.values():
        allowed = ", ".join(["auto", *kinds.values()])
        raise BackendUnavailable(f"option `pipeline` must be one of {allowed}, not {pipeline!r}")

    device = str(opts.get("device", "auto"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailable(
            f"option device={device!r} but PyTorch sees no CUDA device (a CPU build of torch, or "
            "no GPU/driver)"
        )
    elif device != "cpu" and not device.startswith(("cuda", "mps", "xpu")):
        raise BackendUnavailable(f"option `device` must be auto, cpu or cuda[:N], not {device!r}")

    dtype = str(opts.get("dtype", "auto"))
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "bfloat16"
    if dtype not in ("bfloat16", "float16", "float32"):
        raise BackendUnavailable(
            f"option `dtype` must be auto, bfloat16, float16 or float32, not {dtype!r}"
        )

    offload = str(opts.get("offload", "none"))
    if offload not in ("none", "model", "sequential"):
        raise BackendUnavailable(
            f"option `offload` must be none, model or sequential, not {offload!r}"
        )
    if offload != "none" and importlib.util.find_spec("accelerate") is None:
        raise BackendUnavailable(
            f"offload={offload!r} needs accelerate: `pip install accelerate==1.15.0`"
        )

    default_pixels = DEFAULT_VIDEO_MAX_PIXELS if video else DEFAULT_IMAGE_MAX_PIXELS
    steps = _positive_int_option(opts, "num_inference_steps", None)
    guidance = opts.get("guidance_scale")
    if guidance is not None and (
        isinstance(guidance, bool) or not isinstance(guidance, (int, float))
    ):
        raise BackendUnavailable("option `guidance_scale` must be a number")
    known = {"weights_dir", "pipeline", "device", "dtype", "offload", "num_inference_steps"}
    known |= {"guidance_scale", "max_pixels", "max_steps"}
    return _Options(
        weights_dir=weights_dir,
        pipeline=pipeline,
        device=device,
        dtype=dtype,
        offload=offload,
        num_inference_steps=steps,
        guidance_scale=float(guidance) if guidance is not None else None,
        max_pixels=_positive_int_option(opts, "max_pixels", default_pixels) or default_pixels,
        max_steps=_positive_int_option(opts, "max_steps", DEFAULT_MAX_STEPS) or DEFAULT_MAX_STEPS,
        extra={k: v for k, v in opts.items() if k not in known},
    )


def _positive_int_option(opts: Mapping[str, Any], name: str, default: int | None) -> int | None:
    value = opts.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BackendUnavailable(f"option `{name}` must be a positive integer, not {value!r}")
    return value


def _has_pipeline(root: Path) -> bool:
    if (root / "model_index.json").is_file():
        return True
    # Subdirectories by upstream model; also `owner/name` ids laid out as two levels.
    return any(root.glob("*/model_index.json")) or any(root.glob("*/*/model_index.json"))


# ---------------------------------------------------------------- shared machinery


class _DiffusersBackend:
    """Loading, the resident pipeline and interruptible runs, shared by image and video."""

    _kinds: Mapping[str, str] = {}
    _video = False

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self._torch, self._diffusers = _import_runtime(video=self._video)
        self._options = _parse_options(
            options, torch=self._torch, kinds=self._kinds, video=self._video
        )

    # -- locating and loading

    def _model_dir(self, upstream_model: str | None) -> Path:
        root = self._options.weights_dir
        if upstream_model:
            # Resolved and checked: an upstream id must not reach outside weights_dir.
            candidate = (root / upstream_model).resolve()
            if candidate.is_relative_to(root) and (candidate / "model_index.json").is_file():
                return candidate
        if (root / "model_index.json").is_file():
            return root
        expected = f"{root / upstream_model}/ or " if upstream_model else ""
        raise BackendError(
            f"no diffusers weights for model {upstream_model!r}: expected model_index.json in "
            f"{expected}{root}/"
        )

    def _pipeline_kind(self, model_dir: Path) -> str:
        if self._options.pipeline != "auto":
            return self._options.pipeline
        try:
            index = json.loads((model_dir / "model_index.json").read_text())
            class_name = str(index["_class_name"])
        except (OSError, ValueError, KeyError) as exc:
            raise BackendError(f"unreadable model_index.json in {model_dir}: {exc}") from exc
        kind = self._kinds.get(class_name)
        if kind is None:
            supported = ", ".join(self._kinds)
            raise BackendError(
                f"{model_dir} holds a {class_name}; this backend runs {supported} (set the option "
                "`pipeline` to force one)"
            )
        return kind

    def _key(self, model_dir: Path, kind: str) -> _PipelineKey:
        o = self._options
        return _PipelineKey(str(model_dir), PIPELINE_CLASSES[kind], o.device, o.dtype, o.offload)

    def _load(self, key: _PipelineKey) -> Any:
        """Load a pipeline from disk onto the configured device. Runs in the worker thread."""
        torch = self._torch
        components: dict[str, Any] = {}
        if key.class_name == "QwenImageEditPipeline" and not importlib.util.find_spec(
            "torchvision"
        ):
            # transformers' Qwen2VLProcessor needs torchvision for a video processor that
            # Qwen-Image-Edit never uses: give the pipeline an image-only one instead.
            components["processor"] = _image_only_qwen_processor(Path(key.path) / "processor")
        cls = getattr(self._diffusers, key.class_name)
        started = time.monotonic()
        try:
            pipe = cls.from_pretrained(
                key.path, dtype=getattr(torch, key.dtype), local_files_only=True, **components
            )
            if key.device == "cpu" or key.offload == "none":
                pipe.to(key.device)
            elif key.offload == "model":
                pipe.enable_model_cpu_offload(device=key.device)
            else:
                pipe.enable_sequential_cpu_offload(device=key.device)
        except torch.cuda.OutOfMemoryError as exc:
            raise BackendError(
                f"out of GPU memory loading {key.path}: set offload = 'model' or 'sequential'"
            ) from exc
        except ImportError as exc:
            raise BackendError(
                f"loading {key.class_name} needs the Python package {exc.name}: pip install it"
            ) from exc
        except Exception as exc:  # a broken or incomplete directory fails in many ways
            raise BackendError(f"could not load {key.class_name} from {key.path}: {exc}") from exc
        pipe.set_progress_bar_config(disable=True)
        if self._options.extra.get("vae_tiling") and hasattr(pipe.vae, "enable_tiling"):
            pipe.vae.enable_tiling()
        log.info(
            "diffusers: loaded %s from %s on %s (%s, offload=%s) in %.1fs",
            key.class_name,
            key.path,
            key.device,
            key.dtype,
            key.offload,
            time.monotonic() - started,
        )
        return pipe

    def _with_pipeline(
        self,
        key: _PipelineKey,
        interrupt: threading.Event,
        run: Callable[[Any], T],
        before_load: Callable[[], None] | None = None,
    ) -> T:
        """Take the process-wide lock, make ``key`` resident and call ``run(pipe)``.

        Runs in the worker thread. Waiting for the lock polls ``interrupt`` so that a
        cancelled request queued behind a long generation gives up at once.
        """
        while not _RESIDENT.lock.acquire(timeout=0.1):
            if interrupt.is_set():
                raise _Interrupted
        try:
            if interrupt.is_set():
                raise _Interrupted

            def load() -> Any:
                if before_load is not None:
                    before_load()
                return self._load(key)

            pipe = _RESIDENT.get(key, load)
            if interrupt.is_set():
                raise _Interrupted
            try:
                return run(pipe)
            except (_Interrupted, BackendError):
                raise
            except self._torch.cuda.OutOfMemoryError as exc:
                raise BackendError(
                    "out of GPU memory while generating: ask for fewer pixels/frames, or set "
                    "offload = 'model' (or max_pixels / vae_tiling)"
                ) from exc
            except Exception as exc:
                raise BackendError(f"{key.class_name} failed: {type(exc).__name__}: {exc}") from exc
            finally:
                if getattr(pipe, "_interrupt", False):
                    # An interrupted call skipped its end-of-call offload; do it here so the
                    # next call starts with the components where accelerate expects them.
                    pipe._interrupt = False
                    pipe.maybe_free_model_hooks()
        finally:
            _RESIDENT.lock.release()

    async def aclose(self) -> None:
        """Unload the resident pipeline if this backend loaded it (called at shutdown)."""

        def unload() -> None:
            # Never wait on a running generation at shutdown: the process is going away.
            if not _RESIDENT.lock.acquire(blocking=False):
                return
            try:
                key = _RESIDENT.key
                if key is not None and Path(key.path).is_relative_to(self._options.weights_dir):
                    _RESIDENT.unload()
            finally:
                _RESIDENT.lock.release()

        await anyio.to_thread.run_sync(unload)

    # -- per-request values

    def _generator(self, seed: int) -> Any:
        # A CPU generator gives the same noise on any device, so a seed reproduces across
        # CPU/GPU hosts (diffusers moves the noise to the execution device).
        return self._torch.Generator(device="cpu").manual_seed(seed)

    def _steps(self, value: Any, default: int) -> int:
        if value is None:
            return self._options.num_inference_steps or default
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not 1 <= value <= self._options.max_steps
        ):
            raise BackendError(
                f"num_inference_steps must be an integer from 1 to {self._options.max_steps}",
                client_error=True,
            )
        return value

    def _guidance(self, value: Any, default: float) -> float:
        if value is None:
            return (
                self._options.guidance_scale
                if self._options.guidance_scale is not None
                else default
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 30:
            raise BackendError("guidance_scale must be a number from 0 to 30", client_error=True)
        return float(value)


def _image_only_qwen_processor(directory: Path) -> Any:
    """Qwen-Image-Edit's Qwen2-VL processor (image processor + tokenizer) from ``directory``,
    without the video processor. Raises BackendError.

    transformers' ``Qwen2VLProcessor`` always builds a video processor, which needs
    torchvision; Qwen-Image-Edit never passes video, so without torchvision a subclass that
    leaves it out (its image processor falls back to the PIL one) does the same work.
    """
    try:
        base: Any = importlib.import_module("transformers").Qwen2VLProcessor
        mixin: Any = importlib.import_module("transformers.processing_utils").ProcessorMixin

        # transformers takes a processor's parts from the modality-named `__init__` parameters.
        class ImageOnlyQwen2VLProcessor(base):  # type: ignore[misc]
            def __init__(
                self,
                image_processor: Any = None,
                tokenizer: Any = None,
                chat_template: Any = None,
                **kwargs: Any,
            ) -> None:
                self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
                self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
                self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
                self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
                mixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        return ImageOnlyQwen2VLProcessor.from_pretrained(directory, local_files_only=True)
    except Exception as exc:  # missing files, a bad config, another transformers version
        raise BackendError(
            f"could not load Qwen-Image-Edit's processor from {directory} (without torchvision "
            f"it is built image-only from that folder): {type(exc).__name__}: {exc}"
        ) from exc


def _step_callback(
    interrupt: threading.Event, on_step: Callable[[int], None] | None = None
) -> Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]:
    """A ``callback_on_step_end`` that reports steps and stops the pipeline once cancelled."""

    def callback(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if interrupt.is_set():
            # The pipeline's own flag makes it skip its remaining steps; raising as well skips
            # the VAE decode after them (a minute for a long video) whose result nobody wants.
            pipe._interrupt = True
            raise _Interrupted
        if on_step is not None:
            on_step(step + 1)
        return kwargs

    return callback


async def _run_interruptible(work: Callable[[], T], interrupt: threading.Event) -> T:
    """Run ``work`` in a worker thread; if the caller is cancelled, set ``interrupt`` and wait
    for the thread to stop before re-raising, so the pipeline is idle when we return."""
    handoff = threading.Lock()
    state = {"started": False, "abandoned": False}
    done = threading.Event()

    def wrapped() -> T:
        with handoff:
            if state["abandoned"]:
                raise _Interrupted
            state["started"] = True
        try:
            return work()
        finally:
            done.set()

    try:
        return await anyio.to_thread.run_sync(wrapped, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        interrupt.set()
        # Either the thread already started (then wait for it: it stops at its next step) or
        # it never will, because `abandoned` is seen under the same lock.
        with handoff:
            state["abandoned"] = True
            started = state["started"]
        if started:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(done.wait)
        raise
    except _Interrupted as exc:  # pragma: no cover - only raised after a cancellation
        raise BackendError("generation was interrupted") from exc


# --------------------------------------------------------------------------- sizes


def _round16(value: float) -> int:
    # Half up (not Python's round-half-even), so 1000 -> 1008 like 1080 -> 1088.
    return max(SIZE_MULTIPLE, math.floor(value / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE)


def _parse_ratio(text: str) -> float:
    try:
        w, _, h = text.replace("/", ":").partition(":")
        ratio = float(w) / float(h)
    except (ValueError, ZeroDivisionError):
        raise BackendError(
            f"aspect_ratio must look like '16:9', not {text!r}", client_error=True
        ) from None
    if not 1 / 8 <= ratio <= 8:
        raise BackendError(f"aspect_ratio {text!r} is too extreme", client_error=True)
    return ratio


def _fit(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """Scale down (keeping the aspect ratio) until width * height <= max_pixels."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))

    def down(value: int) -> int:
        return max(SIZE_MULTIPLE, int(value * scale) // SIZE_MULTIPLE * SIZE_MULTIPLE)

    return down(width), down(height)


def _image_size(
    request: ImageRequest, source: Image.Image | None, max_pixels: int
) -> tuple[int, int, str | None]:
    """(width, height, note) for an image request; the note says how the size was changed."""
    width, height = request.width, request.height
    if width is None and height is None:
        size = request.params.get("size")
        if isinstance(size, str) and size.strip():
            parts = size.lower().replace("*", "x").split("x")
            try:
                width, height = (int(p) for p in parts)
            except ValueError:
                raise BackendError(
                    f"size must be WIDTHxHEIGHT, not {size!r}", client_error=True
                ) from None
    for name, value in (("width", width), ("height", height)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value <= 0
        ):
            raise BackendError(f"{name} must be a positive integer", client_error=True)

    ratio: float | None = None
    if request.aspect_ratio:
        ratio = _parse_ratio(request.aspect_ratio)
    elif source is not None and (width is None or height is None):
        ratio = source.width / source.height  # edits keep their source's shape by default
    if width is not None and height is not None:
        w, h = float(width), float(height)
    elif width is not None:
        w, h = float(width), width / (ratio or 1.0)
    elif height is not None:
        w, h = height * (ratio or 1.0), float(height)
    else:
        r = ratio or 1.0
        w, h = math.sqrt(DEFAULT_IMAGE_AREA * r), math.sqrt(DEFAULT_IMAGE_AREA / r)
    out_w, out_h = _fit(_round16(w), _round16(h), max_pixels)
    note = None
    if width is not None and height is not None and (out_w, out_h) != (width, height):
        note = (
            f"requested {width}x{height}, generating {out_w}x{out_h} (multiples of "
            f"{SIZE_MULTIPLE}, at most {max_pixels} pixels)"
        )
    return out_w, out_h, note


def _video_size(
    resolution: Any, aspect_ratio: Any, width: Any, height: Any, source: Image.Image | None
) -> tuple[int, int]:
    if width is not None or height is not None:
        if not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height)
        ):
            raise BackendError("width and height must both be positive integers", client_error=True)
        return _round16(width), _round16(height)
    short = VIDEO_SHORT_SIDES.get(str(resolution or "720p"))
    if short is None:
        raise BackendError(
            f"resolution must be one of {', '.join(VIDEO_SHORT_SIDES)}, not {resolution!r}",
            client_error=True,
        )
    if aspect_ratio:
        ratio = _parse_ratio(str(aspect_ratio))
    elif source is not None:
        ratio = source.width / source.height
    else:
        ratio = 16 / 9
    if ratio >= 1:
        return _round16(short * ratio), _round16(short)
    return _round16(short), _round16(short / ratio)


def _decode_image(blob: MediaBlob, what: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(blob.data)) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BackendError(f"{what} is not a readable image: {exc}", client_error=True) from exc


def _encode_image(image: Image.Image, output_format: str) -> MediaBlob:
    fmt, content_type = IMAGE_FORMATS[output_format]
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.convert("RGB").save(buf, format=fmt, quality=95)
    elif fmt == "WEBP":
        image.save(buf, format=fmt, quality=95)
    else:
        image.save(buf, format=fmt)
    return MediaBlob(buf.getvalue(), content_type)


def _seed(value: Any) -> int:
    if value is None:
        return secrets.randbelow(2**32)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BackendError("seed must be a non-negative integer", client_error=True)
    return value % 2**64


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class _ImagePlan:
    model_dir: Path
    kind: str
    width: int
    height: int
    source: Image.Image | None
    num_images: int
    seed: int
    steps: int | None
    guidance: Any
    output_format: str
    prompt: str
    negative_prompt: str | None


class DiffusersImage(_DiffusersBackend):
    """Text-to-image (FLUX.1 schnell/dev) and image edits (FLUX.1 Kontext, Qwen-Image-Edit)
    from a local diffusers pipeline directory. See the module docstring for options."""

    _kinds = IMAGE_PIPELINES
    _video = False

    async def generate_images(self, request: ImageRequest) -> list[MediaBlob]:
        """Generate ``params['num_images']`` (default 1) images; raises BackendError."""
        output_format = (request.output_format or "png").lower()
        if output_format not in IMAGE_FORMATS:
            raise BackendError(
                f"output_format must be png, jpeg or webp, not {request.output_format!r}",
                client_error=True,
            )
        model_dir = self._model_dir(request.upstream_model)
        kind = self._pipeline_kind(model_dir)
        source = None
        if kind in EDIT_KINDS:
            if not request.images:
                raise BackendError(
                    f"{EDIT_NAMES[kind]} edits an image: send the source image", client_error=True
                )
            source = _decode_image(request.images[0], "the source image")
        width, height, note = _image_size(request, source, self._options.max_pixels)
        if note:
            log.info("diffusers %s: %s", request.upstream_model or model_dir.name, note)
        num_images = request.params.get("num_images", 1)
        max_images = int(self._options.extra.get("max_images", 4))
        if (
            isinstance(num_images, bool)
            or not isinstance(num_images, int)
            or not 1 <= num_images <= max_images
        ):
            raise BackendError(f"num_images must be from 1 to {max_images}", client_error=True)
        steps = request.params.get("num_inference_steps")
        if steps is not None:
            self._steps(steps, 1)  # validate now, on the event loop, before queueing
        guidance = request.params.get("guidance_scale")
        if guidance is not None:
            self._guidance(guidance, 0.0)
        negative = request.params.get("negative_prompt")
        plan = _ImagePlan(
            model_dir=model_dir,
            kind=kind,
            width=width,
            height=height,
            source=source,
            num_images=num_images,
            seed=_seed(request.params.get("seed")),
            steps=steps,
            guidance=guidance,
            output_format=output_format,
            prompt=request.prompt,
            negative_prompt=negative if isinstance(negative, str) else None,
        )
        interrupt = threading.Event()
        key = self._key(model_dir, kind)
        return await _run_interruptible(
            lambda: self._with_pipeline(
                key, interrupt, lambda pipe: self._generate(pipe, plan, interrupt)
            ),
            interrupt,
        )

    def _generate(self, pipe: Any, plan: _ImagePlan, interrupt: threading.Event) -> list[MediaBlob]:
        """One pipeline call. Runs in the worker thread with the resident lock held."""
        kwargs: dict[str, Any] = {
            "prompt": plan.prompt,
            "width": plan.width,
            "height": plan.height,
            "num_images_per_prompt": plan.num_images,
            "generator": self._generator(plan.seed),
            "callback_on_step_end": _step_callback(interrupt),
            "output_type": "pil",
        }
        if plan.kind == "flux":
            # FLUX.1 [schnell] is the timestep-distilled model without guidance embedding: it
            # wants 4 steps, no guidance, and its T5 prompt stops at 256 tokens.
            schnell = not getattr(pipe.transformer.config, "guidance_embeds", True)
            kwargs["num_inference_steps"] = self._steps(plan.steps, 4 if schnell else 28)
            kwargs["guidance_scale"] = self._guidance(plan.guidance, 0.0 if schnell else 3.5)
            kwargs["max_sequence_length"] = 256 if schnell else 512
        elif plan.kind == "flux-kontext":
            kwargs["image"] = plan.source
            kwargs["num_inference_steps"] = self._steps(plan.steps, 28)
            kwargs["guidance_scale"] = self._guidance(plan.guidance, 2.5)
            # Kontext rescales its output to `max_area` (1 MP by default) at the requested
            # aspect ratio; pinning the area to the request keeps the requested size.
            kwargs["max_area"] = plan.width * plan.height
        else:  # qwen-image-edit: true classifier-free guidance needs a negative prompt
            kwargs["image"] = plan.source
            kwargs["num_inference_steps"] = self._steps(plan.steps, 50)
            kwargs["true_cfg_scale"] = self._guidance(plan.guidance, 4.0)
            kwargs["negative_prompt"] = plan.negative_prompt or " "
        images = pipe(**kwargs).images
        return [_encode_image(image, plan.output_format) for image in images]


# ---------------------------------------------------------------------------- video


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


class DiffusersVideo(_DiffusersBackend):
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
            source = _decode_image(image, "the source image")
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
            seed=_seed(data.get("seed")),
            steps=self._steps(data.get("num_inference_steps"), 50),
            guidance=self._guidance(data.get("guidance_scale"), 5.0),
            duration=float(duration),
            resolution=data.get("resolution"),
            aspect_ratio=data.get("aspect_ratio"),
            width=data.get("width"),
            height=data.get("height"),
        )
        # Validate the size on the event loop so bad input fails before queueing.
        _video_size(plan.resolution, plan.aspect_ratio, plan.width, plan.height, source)

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

        return await _run_interruptible(work, interrupt)

    def _generate(
        self,
        pipe: Any,
        plan: _VideoPlan,
        interrupt: threading.Event,
        report: Callable[[float, str], None],
    ) -> JobResult:
        """One pipeline call plus MP4 encoding. Runs in the worker thread with the lock held."""
        width, height = _video_size(
            plan.resolution, plan.aspect_ratio, plan.width, plan.height, plan.source
        )
        width, height = _fit(width, height, self._options.max_pixels)
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
            "callback_on_step_end": _step_callback(interrupt, on_step),
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
