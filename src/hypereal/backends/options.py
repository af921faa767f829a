"""The options each backend type takes, as one pydantic model per type, checked when the
registry is built: an unknown type, an unknown option (a typo such as ``timout``), a value
of the wrong type or a missing required option stops ``hypereal serve``, ``hypereal worker``
and ``hypereal models list`` with one line naming the backend, the option and the problem,
instead of showing later as a model's ``unavailableReason``.

What only the running host can tell (a package not installed, a weights directory or model
file missing) is still the backend's own check when it is first used: its models are then
listed as unavailable with that reason.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

PositiveInt = Annotated[int, Field(gt=0)]
PositiveNumber = Annotated[float, Field(gt=0)]
NonNegativeNumber = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class BackendConfigError(ValueError):
    """A backend in the settings is misconfigured; the message is one line naming the
    backend, the option and the problem."""


class BackendOptions(BaseModel):
    """What every backend instance may set: its ``type`` and ``concurrency`` (jobs of one
    model run at once, all workers together)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    type: str
    concurrency: PositiveInt | None = None


# ---------------------------------------------------------------------- local, offline


class LlamaCppOptions(BackendOptions):
    model_path: str | None = None
    n_ctx: PositiveInt | None = None
    n_threads: PositiveInt | None = None
    chat_template: str | None = None


class PiperOptions(BackendOptions):
    voices: dict[str, str] | None = None
    default_voice: str | None = None
    sentence_silence: NonNegativeNumber | None = None
    max_text_chars: Annotated[float, Field(ge=1)] | None = None
    mp3_bitrate: Annotated[float, Field(ge=8_000)] | None = None


class PocketsphinxOptions(BackendOptions):
    max_duration_seconds: PositiveNumber | None = None
    vad_mode: Literal[0, 1, 2, 3] | None = None


class CameraMotionOptions(BackendOptions):
    max_input_pixels: PositiveInt | None = None
    max_duration: Annotated[int, Field(ge=1, le=600)] | None = None
    crf: Annotated[int, Field(ge=0, le=51)] | None = None
    preset: str | None = None
    bits_per_pixel: Annotated[float, Field(gt=0, le=10)] | None = None
    codec: str | None = None


class ReliefMeshOptions(BackendOptions):
    max_input_pixels: PositiveInt | None = None
    max_resolution: PositiveInt | None = None
    texture_max_side: PositiveInt | None = None
    smoothing: Annotated[float, Field(ge=0, le=50)] | None = None


class SegmentationOptions(BackendOptions):
    model_path: str | None = None
    model: str | None = None
    max_input_pixels: PositiveInt | None = None
    max_output_pixels: PositiveInt | None = None
    mask_low: Fraction | None = None
    mask_high: Fraction | None = None
    min_person_fraction: Fraction | None = None


class ImageOpsOptions(BackendOptions):
    max_input_pixels: PositiveInt | None = None
    max_output_pixels: PositiveInt | None = None
    max_images: PositiveInt | None = None


class DiffusersOptions(BackendOptions):
    weights_dir: str
    pipeline: str | None = None
    device: str | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = None
    offload: Literal["none", "model", "sequential"] | None = None
    num_inference_steps: PositiveInt | None = None
    guidance_scale: float | None = None
    max_pixels: PositiveInt | None = None
    max_steps: PositiveInt | None = None
    vae_tiling: bool | None = None


class DiffusersImageOptions(DiffusersOptions):
    max_images: PositiveInt | None = None


class DiffusersVideoOptions(DiffusersOptions):
    fps: Annotated[int, Field(ge=1, le=120)] | None = None
    max_frames: PositiveInt | None = None
    negative_prompt: str | None = None


# ---------------------------------------------------------------------------- upstream


class HttpClientOptions(BackendOptions):
    """The shared upstream HTTP client's options (``backends/upstream/options.py``)."""

    base_url: str | None = None
    api_key: str | None = None
    retries: NonNegativeNumber | None = None
    retry_backoff: NonNegativeNumber | None = None
    max_download_bytes: PositiveNumber | None = None
    max_connections: PositiveNumber | None = None
    headers: dict[str, str] | None = None
    allowed_private_networks: list[str] | str | None = None


class OpenAIOptions(HttpClientOptions):
    timeout: PositiveNumber | None = None
    model: str | None = None
    max_tokens_param: Literal["max_tokens", "max_completion_tokens"] | None = None
    image_response_format: Literal["auto", "b64_json", "url", "omit"] | None = None
    default_voice: str | None = None
    tokenize_endpoint: str | None = None


class HyperealOptions(HttpClientOptions):
    request_timeout: PositiveNumber | None = None
    poll_interval: PositiveNumber | None = None
    timeout: PositiveNumber | None = None
    chat_path: str | None = None


class QueueProviderOptions(HttpClientOptions):
    """fal.ai and Replicate: an API key is required."""

    api_key: str
    request_timeout: PositiveNumber | None = None
    poll_interval: PositiveNumber | None = None
    timeout: PositiveNumber | None = None
    input_map: dict[str, str | None] | None = None


class FalOptions(QueueProviderOptions):
    output_key: str | None = None


class ReplicateOptions(QueueProviderOptions):
    prefer_wait: Annotated[int, Field(ge=0, le=60)] | None = None
    webhook_url: str | None = None
    webhook_events_filter: list[Literal["start", "output", "logs", "completed"]] | None = None
    webhook_secret: str | None = None


class NoopOptions(BackendOptions):
    """The test-only ``noop`` type (``enable_test_backends``)."""

    delay_seconds: NonNegativeNumber | None = None
    fail: str | None = None


OPTIONS: dict[str, type[BackendOptions]] = {
    "llama_cpp": LlamaCppOptions,
    "piper": PiperOptions,
    "pocketsphinx": PocketsphinxOptions,
    "camera_motion": CameraMotionOptions,
    "relief_mesh": ReliefMeshOptions,
    "mediapipe_segmentation": SegmentationOptions,
    "image_ops": ImageOpsOptions,
    "openai": OpenAIOptions,
    "hypereal": HyperealOptions,
    "fal": FalOptions,
    "replicate": ReplicateOptions,
    "diffusers_image": DiffusersImageOptions,
    "diffusers_video": DiffusersVideoOptions,
    "noop": NoopOptions,
}


class _AnyOptions(BackendOptions):
    """A type registered without an options model (tests' scripted backends): only ``type``
    and ``concurrency`` are checked."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)


def validate(name: str, config: Mapping[str, Any], types: Mapping[str, str]) -> BackendOptions:
    """The options of the backend instance ``name``, checked against its type's model.

    Raises BackendConfigError with one line naming the backend, the option and the problem.
    """
    type_name = config.get("type", name)
    if not isinstance(type_name, str) or type_name not in types:
        hint = _did_you_mean(str(type_name), types)
        raise BackendConfigError(
            f"backend '{name}': option 'type': unknown backend type {type_name!r}{hint} "
            f"(types: {', '.join(sorted(types))})"
        )
    model = OPTIONS.get(type_name, _AnyOptions)
    try:
        return model.model_validate({**config, "type": type_name})
    except ValidationError as exc:
        raise BackendConfigError(_one_line(name, type_name, model, exc)) from None


def _one_line(name: str, type_name: str, model: type[BackendOptions], exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    key = str(error["loc"][0]) if error["loc"] else "?"
    if error["type"] == "extra_forbidden":
        known = [k for k in model.model_fields if k != "type"]
        problem = f"unknown option{_did_you_mean(key, known)} (type '{type_name}' takes: "
        problem += f"{', '.join(known)})"
    elif error["type"] == "missing":
        problem = f"required for type '{type_name}' but not set"
    else:
        problem = f"{error['msg']} (got {error.get('input')!r})"
    more = len(exc.errors()) - 1
    also = f" [and {more} more problem{'s' if more > 1 else ''}]" if more else ""
    return f"backend '{name}': option '{key}': {problem}{also}"


def _did_you_mean(word: str, candidates: Any) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f", did you mean '{close[0]}'?" if close else ""
