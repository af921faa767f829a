"""A hosted Hypereal account as the upstream (operators reselling it), per its API document.

Protocol (every call ``Authorization: Bearer <key>``; errors ``{"error": "..."}``, 402 adds
``required`` and ``available``):

- ``POST /v1/spicy-chat`` ``{messages, temperature, max_tokens, stream: true}``: an SSE stream in
  the OpenAI ``chat.completion.chunk`` format; the last chunk may carry ``creditsUsed``.
- ``POST /v1/images/generate`` ``{prompt, model, size: "W*H", image}`` answers at once with
  ``{created, data: [{url, model}], resultId, creditsUsed}``.
- ``POST /v1/videos/generate`` (also ``/v1/audio/generate``, ``/v1/3d/generate``)
  ``{model, input: {...}}`` answers 202 ``{jobId, status: "processing", creditsUsed}``; then
  ``GET /v1/jobs/{jobId}?model=...&type=video|audio|3d`` answers ``status`` ``processing``,
  ``completed`` (with ``outputUrl``) or ``failed`` (with ``error``).

Input media (the engine has already fetched them) are sent as ``data:`` URIs in the field of
the same name (``input.image``, ``input.audio``); a source image of an edit goes in ``image``
(and every one in ``images`` when there are several).

Jobs run through the shared submit -> poll -> fetch driver (``backends/upstream/jobs.py``), so
they time out like fal.ai and Replicate jobs. The hosted API has no cancel call (its document
lists only submit and ``GET /v1/jobs/{id}``): a job we stop waiting for, on our cancel or the
``timeout``, keeps running (and is billed) upstream.

A pass-through model (a catalogue pattern with ``pass_through``) settles to what the account
was charged: the ``creditsUsed`` of the chat stream's last chunk, the image answer or the job
submission is recorded in the request's ``upstream_bill``.

Options (``[backends.NAME]`` with ``type = "hypereal"``):

``api_key`` (required)
    The hosted account's API key.
``base_url``
    API origin, default ``https://api.hypereal.cloud`` (paths start with ``/v1``).
``chat_path``
    Chat endpoint path, default ``/v1/spicy-chat``.
``poll_interval`` / ``timeout`` / ``request_timeout``
    Seconds between job polls (2), for a whole job (1800) and for one HTTP call, which for
    a chat stream is the longest silence between chunks (300).
``headers`` / ``retries`` / ``retry_backoff`` / ``max_download_bytes`` / ``max_connections``
    As for every upstream backend: extra headers, transient-failure retries (2), backoff
    factor (0.5 s), largest output file accepted (64 MiB), connections kept (1000).
``allowed_private_networks``
    Non-public networks (CIDRs) output files may come from; the ``base_url`` origin always may.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from typing import Any

from hypereal.backends.base import (
    BackendError,
    ChatDelta,
    ChatRequest,
    ImageRequest,
    JobRequest,
    JobResult,
    MediaBlob,
    ProgressCallback,
)
from hypereal.backends.upstream.chat import chat_deltas, estimate_prompt_tokens, record_credits
from hypereal.backends.upstream.http import UpstreamHttp
from hypereal.backends.upstream.jobs import JobStatus, ProgressReporter, run_provider_job
from hypereal.backends.upstream.media import to_data_uri
from hypereal.backends.upstream.options import HttpOptions, JobOptions, option_str

logger = logging.getLogger(__name__)

PROVIDER = "the upstream Hypereal API"
BACKEND = "hosted Hypereal"
_SUBJECT = "The upstream Hypereal API"
DEFAULT_BASE_URL = "https://api.hypereal.cloud"

# Job kind -> (submit path, ``type`` query value of the poll).
_JOB_ROUTES: Mapping[str, tuple[str, str]] = {
    "video": ("/v1/videos/generate", "video"),
    "audio": ("/v1/audio/generate", "audio"),
    "3d": ("/v1/3d/generate", "3d"),
}
_QUEUED_STATES = frozenset({"queued", "pending", "starting"})


class HyperealHosted:
    """Chat, images, video, audio and 3D served by a hosted Hypereal account."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        http = HttpOptions.parse(
            options,
            backend=BACKEND,
            default_base_url=DEFAULT_BASE_URL,
            api_key_hint="an API key of the hosted account",
            timeout=300.0,
        )
        self._chat_path = option_str(options, "chat_path", BACKEND) or "/v1/spicy-chat"
        self._jobs = JobOptions.parse(options, backend=BACKEND, poll_interval=2.0)
        self._http = UpstreamHttp(PROVIDER, http, auth=f"Bearer {http.api_key}")

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    # ------------------------------------------------------------------------ chat

    async def count_prompt_tokens(self, request: ChatRequest) -> int:
        """A conservative estimate (the hosted API has no tokenize call): UTF-8 bytes / 3 per
        message + 4 tokens per message + 3 for the reply; see ``estimate_prompt_tokens``."""
        return estimate_prompt_tokens(request.messages)

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ChatDelta]:
        """Stream the answer as deltas, the last with ``finish_reason`` and usage when the
        upstream sends it. Closing the iterator closes the upstream connection.

        Raises BackendError for HTTP errors (402: the account is out of credits), an ``error``
        in the stream or a stream cut short.
        """
        body: dict[str, Any] = {
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
            "stream": True,
        }
        if request.upstream_model:
            body["model"] = request.upstream_model
        async with (
            self._http.stream("POST", self._chat_path, json=body) as response,
            aclosing(chat_deltas(response, PROVIDER, request.upstream_bill)) as deltas,
        ):
            async for delta in deltas:
                yield delta

    # ---------------------------------------------------------------------- images

    async def generate_images(self, request: ImageRequest) -> list[MediaBlob]:
        """Generate or edit synchronously and download the images the answer links to.

        Raises BackendError for HTTP errors, an answer without images or a failed download.
        """
        body: dict[str, Any] = {"prompt": request.prompt, **request.params}
        body["model"] = _model_id(request.upstream_model)
        if request.width and request.height:
            body["size"] = f"{request.width}*{request.height}"
        if request.aspect_ratio:
            body["aspect_ratio"] = request.aspect_ratio
        body["output_format"] = request.output_format
        if request.images:
            uris = [to_data_uri(blob) for blob in request.images]
            body["image"] = uris[0]
            if len(uris) > 1:
                body["images"] = uris
        answer = await self._http.request_json("POST", "/v1/images/generate", json=body)
        if request.upstream_bill is not None:
            record_credits(request.upstream_bill, answer)
        items = answer.get("data")
        urls = (
            [item.get("url") for item in items if isinstance(item, dict)]
            if isinstance(items, list)
            else []
        )
        if not urls or not all(isinstance(url, str) and url for url in urls):
            raise BackendError(f"{_SUBJECT} answered without image URLs")
        return [await self._http.download(str(url)) for url in urls]

    # ------------------------------------------------------------------------ jobs

    async def generate_video(self, request: JobRequest, progress: ProgressCallback) -> JobResult:
        """Run a video job upstream; see :meth:`_run_job`."""
        return await self._run_job("video", request, progress)

    async def generate_audio(self, request: JobRequest, progress: ProgressCallback) -> JobResult:
        """Run an audio job (TTS, voice clone) upstream; see :meth:`_run_job`."""
        return await self._run_job("audio", request, progress)

    async def generate_mesh(self, request: JobRequest, progress: ProgressCallback) -> JobResult:
        """Run an image-to-3D job upstream; see :meth:`_run_job`."""
        return await self._run_job("3d", request, progress)

    async def _run_job(
        self, kind: str, request: JobRequest, progress: ProgressCallback
    ) -> JobResult:
        """Submit, poll every ``poll_interval`` until ``completed`` or ``failed``, download.

        Raises BackendError when the submission is refused (402: out of credits), the job
        fails (with its ``error``), ``timeout`` passes, or the output cannot be fetched.
        """
        path, job_type = _JOB_ROUTES[kind]
        model = _model_id(request.upstream_model)
        media = {name: to_data_uri(blob) for name, blob in request.media.items()}
        job = _HostedJob(self._http, path, job_type, model, {**request.input, **media})
        reporter = ProgressReporter(progress)
        output_url = await run_provider_job(job, self._http, self._jobs, reporter)
        output = await self._http.download(output_url)
        await reporter.done()
        if request.upstream_bill is not None:
            record_credits(request.upstream_bill, job.accepted)
        return JobResult(output=output)


class _HostedJob:
    """One hosted job, for :func:`run_job`. Not cancellable: the API has no cancel call."""

    cancellable = False
    queued_on_submit = True

    def __init__(
        self, http: UpstreamHttp, path: str, job_type: str, model: str, job_input: dict[str, Any]
    ) -> None:
        self._http = http
        self._path = path
        self._params = {"model": model, "type": job_type}
        self._input = job_input
        self._state: dict[str, Any] = {}
        self.accepted: dict[str, Any] = {}  # the submission's answer (creditsUsed: the bill)

    async def submit(self) -> str:
        body = {"model": self._params["model"], "input": self._input}
        accepted = await self._http.request_json("POST", self._path, json=body)
        self.accepted = accepted
        job_id = accepted.get("jobId")
        if not isinstance(job_id, str) or not job_id:
            raise BackendError(f"{_SUBJECT} accepted the job without a jobId")
        return job_id

    async def status(self, handle: str) -> JobStatus:
        state = await self._http.request_json("GET", f"/v1/jobs/{handle}", params=self._params)
        self._state = state
        status = str(state.get("status") or "").lower()
        if status == "completed":
            return JobStatus("done")
        if status == "failed":
            reason = state.get("error") or "no reason given"
            raise BackendError(f"{_SUBJECT} job {handle} failed: {reason}")
        return JobStatus("queued" if status in _QUEUED_STATES else "running")

    async def wait(self, handle: str, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def cancel(self, handle: str) -> None:  # never called: not cancellable
        raise RuntimeError(f"{_SUBJECT} jobs cannot be cancelled upstream (no cancel call)")

    async def result(self, handle: str) -> str:
        output_url = self._state.get("outputUrl")
        if not isinstance(output_url, str) or not output_url:
            raise BackendError(f"{_SUBJECT} job {handle} completed without an outputUrl")
        return output_url


def _model_id(upstream_model: str | None) -> str:
    if not upstream_model:
        raise BackendError(
            "No upstream model id: set `upstream_model` on the catalogue binding of the "
            "hosted Hypereal backend."
        )
    return upstream_model
