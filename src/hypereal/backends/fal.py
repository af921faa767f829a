"""fal.ai through its Queue API: images, video, audio and 3D from any fal model id.

Protocol (https://docs.fal.ai, "Queue"): ``POST {base}/{model_id}`` with the model's input as
JSON answers ``{request_id, status_url, response_url, cancel_url}``; ``GET status_url?logs=1``
answers ``IN_QUEUE`` (with ``queue_position``), ``IN_PROGRESS`` (with ``logs``) or ``COMPLETED``;
``GET response_url`` answers the model's output JSON, or the model's error status and ``detail``;
``PUT cancel_url`` cancels. Every call carries ``Authorization: Key <FAL_KEY>``. The request runs
through the shared job driver (``backends/upstream/jobs.py``): cancelled at fal when our job is
cancelled or ``timeout`` passes.

Options (``backends.<name>`` with ``type = "fal"``):

``api_key`` (required)
    The fal key.
``base_url``
    Queue endpoint, default ``https://queue.fal.run``.
``poll_interval``, ``timeout``, ``request_timeout``, ``retries``, ``retry_backoff``,
``max_download_bytes``, ``headers``, ``max_connections``, ``allowed_private_networks``,
``input_map``
    The options of every queue provider (``backends/upstream/queue.py``).
``output_key``
    Output field holding the media when it is not one of the usual ones listed below.

Inputs sent: images send ``prompt``, ``image_size`` ``{width, height}``, ``aspect_ratio``,
``output_format``, the source images as data URIs in ``image_url`` (first) and ``image_urls``
(all), then the model's other parameters unchanged (``num_images``, ``seed`` ...). Jobs send their
validated ``input`` unchanged and each media field ``X`` as a data URI in ``X_url``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hypereal.backends.base import (
    BackendError,
    BackendUnavailable,
    ImageRequest,
    JobRequest,
    JobResult,
    MediaBlob,
    ProgressCallback,
)
from hypereal.backends.upstream.http import UpstreamHttp
from hypereal.backends.upstream.jobs import (
    CANCEL_TIMEOUT,
    JobStatus,
    ProgressReporter,
    run_provider_job,
)
from hypereal.backends.upstream.media import to_data_uri
from hypereal.backends.upstream.options import apply_input_map
from hypereal.backends.upstream.queue import QueueProvider, image_arguments

PROVIDER = "fal.ai"
DEFAULT_BASE_URL = "https://queue.fal.run"

# Where fal models put their media, by modality, in order of preference.
_OUTPUT_KEYS: Mapping[str, tuple[str, ...]] = {
    "images": ("images", "image"),
    "video": ("video", "videos"),
    "audio": ("audio", "audio_url", "audio_file"),
    "mesh": ("model_mesh", "model_glb", "glb", "mesh"),
}
# Namespaced app ids keep one more path segment in their queue root (fal-client's AppId rule).
_NAMESPACES = ("workflows", "comfy")


@dataclass(frozen=True)
class _Handle:
    request_id: str
    status_url: str
    response_url: str
    cancel_url: str


@dataclass(frozen=True)
class _Output:
    url: str
    content_type: str | None


class FalQueue(QueueProvider):
    """ImageBackend, VideoBackend, AudioBackend and MeshBackend over fal.ai's queue."""

    PROVIDER = PROVIDER
    DEFAULT_BASE_URL = DEFAULT_BASE_URL
    API_KEY_HINT = "your FAL_KEY"
    AUTH_SCHEME = "Key"

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        output_key = options.get("output_key")
        if output_key is not None and not isinstance(output_key, str):
            raise BackendUnavailable("The fal.ai backend option `output_key` must be a string.")
        self._output_key = output_key

    # ------------------------------------------------------------------ modalities

    async def generate_images(self, request: ImageRequest) -> list[MediaBlob]:
        """Run an image model; returns every image it produced. Raises BackendError."""
        arguments = image_arguments(request, lambda w, h: {"image_size": {"width": w, "height": h}})
        if request.images:
            uris = [to_data_uri(image) for image in request.images]
            arguments["image_url"] = uris[0]
            arguments["image_urls"] = uris
        arguments.update(request.params)
        result = await self._run(_model_id(request.upstream_model), arguments, None)
        outputs = self._outputs(result, "images")
        return [await self._http.download(out.url, out.content_type) for out in outputs]

    # -------------------------------------------------------------------- protocol

    async def _job(self, request: JobRequest, progress: ProgressCallback, kind: str) -> JobResult:
        arguments = dict(request.input)
        for field, blob in request.media.items():
            arguments[field if field.endswith("_url") else f"{field}_url"] = to_data_uri(blob)
        reporter = ProgressReporter(progress)
        result = await self._run(_model_id(request.upstream_model), arguments, reporter)
        output = self._outputs(result, kind)[0]
        blob = await self._http.download(output.url, output.content_type)
        await reporter.done()
        return JobResult(output=blob)

    async def _run(
        self, model_id: str, arguments: Mapping[str, Any], reporter: ProgressReporter | None
    ) -> dict[str, Any]:
        """Submit, wait for completion and return the result JSON through the job driver
        (cancelled upstream on our cancel or the overall timeout)."""
        job = _FalJob(
            self._http,
            model_id,
            apply_input_map(arguments, self._input_map),
            logs=reporter is not None,
        )
        return await run_provider_job(job, self._http, self._jobs, reporter)

    def _outputs(self, result: Mapping[str, Any], kind: str) -> list[_Output]:
        keys = (self._output_key,) if self._output_key else _OUTPUT_KEYS[kind]
        for key in keys:
            outputs = _media_refs(result.get(key))
            if outputs:
                return outputs if kind == "images" else outputs[:1]
        raise BackendError(f"fal.ai result has no {kind} output (looked for {', '.join(keys)})")


class _FalJob:
    """One fal queue request, for :func:`run_job`."""

    cancellable = True
    queued_on_submit = False

    def __init__(
        self, http: UpstreamHttp, model_id: str, payload: Mapping[str, Any], *, logs: bool
    ) -> None:
        self._http = http
        self._model_id = model_id
        self._payload = payload
        self._logs = "1" if logs else "0"

    async def submit(self) -> _Handle:
        http = self._http
        body = await http.request_json("POST", self._model_id, json=self._payload)
        request_id = body.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            raise BackendError("fal.ai accepted the request but returned no request_id")
        root = http.url(f"{_queue_root(self._model_id)}/requests/{request_id}")
        return _Handle(
            request_id=request_id,
            status_url=http.api_url(body.get("status_url"), f"{root}/status"),
            response_url=http.api_url(body.get("response_url"), root),
            cancel_url=http.api_url(body.get("cancel_url"), f"{root}/cancel"),
        )

    async def status(self, handle: _Handle) -> JobStatus:
        status = await self._http.request_json(
            "GET", handle.status_url, params={"logs": self._logs}
        )
        state = status.get("status")
        if state == "COMPLETED":
            # A failed request is COMPLETED too; its error comes back from response_url.
            return JobStatus("done")
        if state == "IN_QUEUE":
            position = status.get("queue_position")
            return JobStatus("queued", position=position if isinstance(position, int) else None)
        if state == "IN_PROGRESS":
            return JobStatus("running", logs=_log_text(status.get("logs")))
        raise BackendError(f"fal.ai reported an unknown request status: {state!r}")

    async def wait(self, handle: _Handle, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def cancel(self, handle: _Handle) -> None:
        await self._http.request("PUT", handle.cancel_url, timeout=CANCEL_TIMEOUT)

    async def result(self, handle: _Handle) -> dict[str, Any]:
        return await self._http.request_json("GET", handle.response_url)


def _model_id(upstream_model: str | None) -> str:
    if not upstream_model:
        raise BackendError("No fal.ai model id is configured for this model (upstream_model)")
    return upstream_model.strip("/")


def _queue_root(model_id: str) -> str:
    """``owner/alias`` of a model id: fal serves status, result and cancel there, without the
    endpoint sub-path (``fal-ai/flux/schnell`` -> ``fal-ai/flux``)."""
    parts = model_id.split("/")
    keep = 3 if parts[0] in _NAMESPACES else 2
    return "/".join(parts[:keep])


def _media_refs(value: object) -> list[_Output]:
    """fal file objects (``{url, content_type}``), bare URL strings, or lists of either."""
    items = value if isinstance(value, list) else [value]
    refs: list[_Output] = []
    for item in items:
        if isinstance(item, str) and item:
            refs.append(_Output(item, None))
        elif isinstance(item, Mapping) and isinstance(item.get("url"), str):
            declared = item.get("content_type")
            refs.append(_Output(item["url"], declared if isinstance(declared, str) else None))
    return refs


def _log_text(logs: object) -> str:
    if not isinstance(logs, list):
        return ""
    return "\n".join(str(entry.get("message", "")) for entry in logs if isinstance(entry, Mapping))
