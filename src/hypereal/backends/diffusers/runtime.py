"""Loading pipelines onto the device and running them with the resident lock held, shared by
the image and video backends."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread
from PIL import Image

from hypereal.backends.base import BackendError, MediaBlob
from hypereal.backends.diffusers.options import (
    PIPELINE_CLASSES,
    import_runtime,
    parse_options,
)
from hypereal.backends.diffusers.resident import RESIDENT, Interrupted, PipelineKey
from hypereal.backends.image_codec import DEFAULT_MAX_INPUT_PIXELS, decode_image

log = logging.getLogger("hypereal.backends.diffusers")

T = TypeVar("T")


class DiffusersBackend:
    """Loading, the resident pipeline and interruptible runs, shared by image and video."""

    _kinds: Mapping[str, str] = {}
    _video = False

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self._torch, self._diffusers = import_runtime(video=self._video)
        self._options = parse_options(
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

    def _key(self, model_dir: Path, kind: str) -> PipelineKey:
        o = self._options
        return PipelineKey(str(model_dir), PIPELINE_CLASSES[kind], o.device, o.dtype, o.offload)

    def _load(self, key: PipelineKey) -> Any:
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
        key: PipelineKey,
        interrupt: threading.Event,
        run: Callable[[Any], T],
        before_load: Callable[[], None] | None = None,
    ) -> T:
        """Take the process-wide lock, make ``key`` resident and call ``run(pipe)``.

        Runs in the worker thread. Waiting for the lock polls ``interrupt`` so that a
        cancelled request queued behind a long generation gives up at once.
        """
        while not RESIDENT.lock.acquire(timeout=0.1):
            if interrupt.is_set():
                raise Interrupted
        try:
            if interrupt.is_set():
                raise Interrupted

            def load() -> Any:
                if before_load is not None:
                    before_load()
                return self._load(key)

            pipe = RESIDENT.get(key, load)
            if interrupt.is_set():
                raise Interrupted
            try:
                return run(pipe)
            except (Interrupted, BackendError):
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
            RESIDENT.lock.release()

    async def aclose(self) -> None:
        """Unload the resident pipeline if this backend loaded it (called at shutdown)."""

        def unload() -> None:
            # Never wait on a running generation at shutdown: the process is going away.
            if not RESIDENT.lock.acquire(blocking=False):
                return
            try:
                key = RESIDENT.key
                if key is not None and Path(key.path).is_relative_to(self._options.weights_dir):
                    RESIDENT.unload()
            finally:
                RESIDENT.lock.release()

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


def pick_seed(value: Any) -> int:
    if value is None:
        return secrets.randbelow(2**32)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BackendError("seed must be a non-negative integer", client_error=True)
    return value % 2**64


def decode_source(blob: MediaBlob) -> Image.Image:
    """A request's source image as RGB, decoded by the one guarded codec (format allow-list,
    pixel cap read from the header first). Raises BackendError(client_error=True)."""
    image = decode_image(blob, max_pixels=DEFAULT_MAX_INPUT_PIXELS, what="source image")
    return image.convert("RGB")
