"""A fake fal.ai Queue API: a real FastAPI app speaking the documented protocol.

Endpoints (https://docs.fal.ai, "Queue"), all but ``/files`` behind ``Authorization: Key <key>``:

- ``POST /{model_id}`` -> ``{request_id, status_url, response_url, cancel_url, queue_position}``
- ``GET /{owner}/{alias}/requests/{id}/status[?logs=1]`` -> ``IN_QUEUE`` (``queue_position``),
  ``IN_PROGRESS`` (tqdm-style ``logs``) or ``COMPLETED`` (with ``error``/``error_type`` if failed)
- ``GET /{owner}/{alias}/requests/{id}`` -> the model output (``images`` / ``video`` / ``audio`` /
  ``model_mesh`` file objects), or the failure's status code and ``detail``
- ``PUT /{owner}/{alias}/requests/{id}/cancel`` -> 202 ``CANCELLATION_REQUESTED`` or 400
  ``ALREADY_COMPLETED``
- ``GET /files/{name}`` -> the output files (real PNG/JPEG/WEBP, MP4 head, WAV, GLB)

Usage::

    fake = FalFake()  # accepts the key "fal-test-key"
    fake.set_scenario("fal-ai/kling-video", FalScenario(output="video", progress_polls=3))
    with serve_app(fake.app) as url:
        backend = FalQueue({"api_key": "fal-test-key", "base_url": url, "poll_interval": 0.01})
        ...
    assert fake.cancelled == [...]  # request ids whose cancel endpoint was called

Each request's behaviour comes from the :class:`FalScenario` of its model id (the longest
registered prefix wins, else ``fake.default``). Progress advances one step per status poll.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tests.support.sample_media import MIME_BY_KIND, MediaStore, media_for, progress_log

OutputKind = Literal["images", "video", "audio", "mesh"]


@dataclass(frozen=True)
class FalScenario:
    """How the fake treats one model's requests."""

    output: OutputKind = "images"
    queue_polls: int = 1  # status polls answered IN_QUEUE, queue_position counting down to 0
    progress_polls: int = 1  # then polls answered IN_PROGRESS ("slow": make this large)
    submit_error: int | None = None  # answer the submit itself with 401/422/500 ...
    submit_delay: float = 0.0  # seconds the submit takes to answer (a slow queue front door)
    result_error: int | None = None  # the request COMPLETES, its result is this error
    error_detail: str = "The prompt was flagged by the content checker"
    transient_status_errors: int = 0  # the first N status polls answer 503 (gateway hiccup)
    served_content_type: str | None = None  # Content-Type the file server claims (None: true)


@dataclass(frozen=True)
class Submission:
    """What one ``POST /{model_id}`` carried."""

    model_id: str
    payload: dict[str, Any]
    authorization: str | None
    request_id: str | None


@dataclass
class _Job:
    request_id: str
    model_id: str
    payload: dict[str, Any]
    scenario: FalScenario
    polls: int = 0
    failed_polls: int = 0
    cancelled: bool = False
    result: dict[str, Any] | None = None

    @property
    def completed(self) -> bool:
        return (
            self.cancelled or self.polls > self.scenario.queue_polls + self.scenario.progress_polls
        )


@dataclass
class FalFake:
    """State and app of one fake fal.ai queue. Lists are appended by the server thread."""

    api_key: str = "fal-test-key"
    default: FalScenario = field(default_factory=FalScenario)
    submissions: list[Submission] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    status_polls: int = 0
    media: MediaStore = field(default_factory=MediaStore)
    _scenarios: dict[str, FalScenario] = field(default_factory=dict)
    _jobs: dict[str, _Job] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def set_scenario(self, model_prefix: str, scenario: FalScenario) -> None:
        """Use ``scenario`` for model ids starting with ``model_prefix``."""
        self._scenarios[model_prefix] = scenario

    def scenario_for(self, model_id: str) -> FalScenario:
        """The scenario of the longest registered prefix of ``model_id``, else the default."""
        matches = [prefix for prefix in self._scenarios if model_id.startswith(prefix)]
        return self._scenarios[max(matches, key=len)] if matches else self.default

    @property
    def app(self) -> FastAPI:
        """A new ASGI app over this fake's state."""
        app = FastAPI(title="fake fal.ai queue")
        self.media.mount(app)
        root = "/{owner}/{alias}/requests/{request_id}"
        app.get(root + "/status")(self._status)
        app.put(root + "/cancel")(self._cancel)
        app.get(root)(self._result)
        app.post("/{model_id:path}")(self._submit)
        return app

    # ------------------------------------------------------------------- endpoints

    async def _submit(self, model_id: str, request: Request) -> JSONResponse:
        payload = await request.json()
        scenario = self.scenario_for(model_id)
        await asyncio.sleep(scenario.submit_delay)
        denied = self._deny(request)
        error = denied or _error_response(scenario.submit_error, scenario.error_detail)
        if error is not None:
            self.submissions.append(Submission(model_id, payload, _auth(request), None))
            return error
        job = _Job(uuid.uuid4().hex, model_id, payload, scenario)
        with self._lock:
            self._jobs[job.request_id] = job
        self.submissions.append(Submission(model_id, payload, _auth(request), job.request_id))
        parts = model_id.split("/")
        base = (
            f"{str(request.base_url).rstrip('/')}/{parts[0]}/{parts[1]}/requests/{job.request_id}"
        )
        return JSONResponse(
            {
                "request_id": job.request_id,
                "response_url": base,
                "status_url": f"{base}/status",
                "cancel_url": f"{base}/cancel",
                "queue_position": scenario.queue_polls,
            }
        )

    async def _status(self, request_id: str, request: Request, logs: int = 0) -> JSONResponse:
        job, error = self._find(request_id, request)
        if job is None:
            return error
        self.status_polls += 1
        scenario = job.scenario
        if job.failed_polls < scenario.transient_status_errors:
            job.failed_polls += 1
            return JSONResponse({"detail": "upstream connect error"}, 503, {"Retry-After": "0"})
        job.polls += 1
        status_url = str(request.url).split("?")[0]
        body: dict[str, Any] = {
            "response_url": status_url.removesuffix("/status"),
            "status_url": status_url,
        }
        if job.completed:
            body.update(status="COMPLETED", logs=[] if logs else None, metrics={})
            if job.cancelled:
                body.update(error="Request was cancelled", error_type="client_cancelled")
            elif scenario.result_error:
                body.update(error=scenario.error_detail, error_type="model_error")
        elif job.polls <= scenario.queue_polls:
            body.update(status="IN_QUEUE", queue_position=scenario.queue_polls - job.polls)
        else:
            step = job.polls - scenario.queue_polls
            lines = [progress_log(i, scenario.progress_polls) for i in range(step)]
            entries = [{"message": line, "level": "INFO", "source": "user"} for line in lines]
            body.update(status="IN_PROGRESS", logs=entries if logs else None)
        return JSONResponse(body)

    async def _result(self, request_id: str, request: Request) -> JSONResponse:
        job, error = self._find(request_id, request)
        if job is None:
            return error
        if not job.completed:
            return JSONResponse({"detail": "Request is still in progress"}, 400)
        if job.cancelled:
            return JSONResponse(
                {"detail": "Request was cancelled", "error_type": "client_cancelled"}, 400
            )
        failure = _error_response(job.scenario.result_error, job.scenario.error_detail)
        if failure is not None:
            return failure
        if job.result is None:
            job.result = self._output(job, request)
        return JSONResponse(job.result)

    async def _cancel(self, request_id: str, request: Request) -> JSONResponse:
        job, error = self._find(request_id, request)
        if job is None:
            return error
        if job.completed:
            return JSONResponse({"status": "ALREADY_COMPLETED"}, 400)
        job.cancelled = True
        self.cancelled.append(request_id)
        return JSONResponse({"status": "CANCELLATION_REQUESTED"}, 202)

    # --------------------------------------------------------------------- helpers

    def _deny(self, request: Request) -> JSONResponse | None:
        if _auth(request) == f"Key {self.api_key}":
            return None
        return JSONResponse({"detail": "Invalid authentication credentials"}, 401)

    def _find(self, request_id: str, request: Request) -> tuple[_Job | None, JSONResponse]:
        denied = self._deny(request)
        if denied is not None:
            return None, denied
        with self._lock:
            job = self._jobs.get(request_id)
        return job, JSONResponse({"detail": "Request not found"}, 404)

    def _output(self, job: _Job, request: Request) -> dict[str, Any]:
        scenario, payload = job.scenario, job.payload
        if scenario.output != "images":
            suffix = {"video": "mp4", "audio": "wav", "mesh": "glb"}[scenario.output]
            true_type = MIME_BY_KIND[scenario.output]
            url = self.media.add(
                request,
                media_for(scenario.output),
                scenario.served_content_type or true_type,
                suffix,
            )
            key = "model_mesh" if scenario.output == "mesh" else scenario.output
            return {key: {"url": url, "content_type": true_type, "file_name": f"out.{suffix}"}}
        size = payload.get("image_size")
        width, height = (size["width"], size["height"]) if isinstance(size, dict) else (64, 64)
        fmt = str(payload.get("output_format") or "png")
        images = []
        for _ in range(int(payload.get("num_images", 1))):
            data = media_for("image", width=width, height=height, fmt=fmt)
            true_type = MIME_BY_KIND[fmt]
            url = self.media.add(request, data, scenario.served_content_type or true_type, fmt)
            images.append({"url": url, "content_type": true_type, "width": width, "height": height})
        return {"images": images, "seed": 42, "has_nsfw_concepts": [False] * len(images)}


def _auth(request: Request) -> str | None:
    return request.headers.get("authorization")


def _error_response(status: int | None, detail: str) -> JSONResponse | None:
    """fal's two documented error shapes: model errors (4xx) carry a ``detail`` list of typed
    objects, request errors (5xx) a string ``detail`` with ``error_type``."""
    if status is None:
        return None
    if status in (401, 403):
        return JSONResponse({"detail": "Invalid authentication credentials"}, status)
    if status < 500:
        body: dict[str, Any] = {
            "detail": [
                {
                    "loc": ["body", "prompt"],
                    "msg": detail,
                    "type": "content_policy_violation",
                    "url": "https://docs.fal.ai/errors/#content_policy_violation",
                }
            ]
        }
        return JSONResponse(body, status)
    return JSONResponse(
        {"detail": detail, "error_type": "runner_server_error"},
        status,
        {"X-Fal-Error-Type": "runner_server_error"},
    )
