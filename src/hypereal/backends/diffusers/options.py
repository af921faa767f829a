"""Options of the diffusers backends, parsed once when a backend is built, and the import of
the optional runtime (torch, diffusers, transformers; av and ftfy for video)."""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypereal.backends.base import BackendUnavailable

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


@dataclass(frozen=True)
class DiffusersOptions:
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


def import_runtime(*, video: bool) -> tuple[Any, Any]:
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


def parse_options(
    options: Mapping[str, Any] | None, *, torch: Any, kinds: Mapping[str, str], video: bool
) -> DiffusersOptions:
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
    return DiffusersOptions(
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
