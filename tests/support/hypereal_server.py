"""A fake hosted Hypereal API: a real FastAPI app speaking the API document (spec/hypereal-api.txt).

Endpoints, each under ``/v1`` and ``/api/v1``, all but ``/files`` behind
``Authorization: Bearer <api_key>``; errors are ``{"error": "..."}`` (401, 400, 404, and 402 with
``required`` and ``available``):

- ``POST /v1/spicy-chat`` (and ``/v1/chat``) ``{messages, temperature, max_tokens, stream}``:
  with ``stream`` (the default) an SSE stream of OpenAI ``chat.completion.chunk`` objects whose
  finish chunk carries ``usage`` and ``creditsUsed``; else one JSON answer with ``creditsUsed``.
- ``POST /v1/images/generate`` ``{prompt, model, size, image}``: ``{created, data: [{url,
  model}], resultId, creditsUsed}`` at once.
- ``POST /v1/videos/generate``, ``/v1/audio/generate``, ``/v1/3d/generate`` ``{model, input}``:
  202 ``{jobId, status: "processing", message, creditsUsed}``.
- ``GET /v1/jobs/{id}?model=...&type=...``: ``processing`` for the scenario's number of polls,
  then ``completed`` with ``outputUrl`` (a real MP4 head, WAV or GLB) or ``failed`` with
  ``error``; 404 ``Job not found`` for an unknown id or a ``model``/``type`` that does not match.
- ``GET /files/{name}``: the output files (the CDN).

Credits are debited on submission, as the document says; ``credits = None`` never runs out.
Usage::

    fake = HyperealFake(credits=100)
    fake.set_scenario("sora-2-i2v", JobScenario(processing_polls=3))
    with serve_app(fake.app) as url:
        backend = HyperealHosted({"api_key": fake.api_key, "base_url": url, "poll_interval": 0.05})
    fake.submissions[0].body["input"]["image"]   # the data: URI the backend sent
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from tests.support.openai_server import StreamStats, chat_chunks, prompt_tokens
from tests.support.sample_media import MIME_BY_KIND, MediaStore, image_bytes, media_for

# Poll ``type`` and output kind of each job endpoint.
JOB_KINDS = {"videos": ("video", "video"), "audio": ("audio", "audio"), "3d": ("3d", "mesh")}
DEFAULT_PRICES = {"chat": 2, "image": 5, "video": 69, "audio": 107, "3d": 45}
SUFFIXES = {"video": "mp4", "audio": "wav", "mesh": "glb"}


@dataclass(frozen=True)
class JobScenario:
    """How the fake runs one model's jobs."""

    processing_polls: int = 2  # polls answered ``processing`` before the job ends
    error: str | None = None  # the job ends ``failed`` with this error instead of completing


@dataclass(frozen=True)
class Submission:
    """One accepted or refused POST, as received."""

    path: str
    body: dict[str, Any]
    authorization: str | None
    job_id: str | None = None


@dataclass
class _Job:
    job_id: str
    model: str
    type: str
    output: str
    scenario: JobScenario
    polls: int = 0
    output_url: str | None = None


@dataclass
class HyperealFake:
    """Configuration, recorded traffic and app of one fake hosted Hypereal account."""

    api_key: str = "hr-test-key"
    credits: int | None = None  # the account balance; None: unlimited
    prices: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    tokens: tuple[str, ...] | list[str] = ("Hi", " there", "!")
    token_delay: float = 0.0
    default: JobScenario = field(default_factory=JobScenario)
    submissions: list[Submission] = field(default_factory=list)
    polls: list[dict[str, str]] = field(default_factory=list)  # query of each job poll
    stats: StreamStats = field(default_factory=StreamStats)
    media: MediaStore = field(default_factory=MediaStore)
    _scenarios: dict[str, JobScenario] = field(default_factory=dict)
    _jobs: dict[str, _Job] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def set_scenario(self, model: str, scenario: JobScenario) -> None:
        """Run jobs of ``model`` per ``scenario`` (others use ``default``)."""
        self._scenarios[model] = scenario

    @property
    def app(self) -> FastAPI:
        """A new ASGI app over this fake's state."""
        app = FastAPI(title="fake hosted Hypereal API")
        self.media.mount(app)
        for prefix in ("/v1", "/api/v1"):
            app.post(prefix + "/spicy-chat")(self._chat)
            app.post(prefix + "/chat")(self._chat)
            app.post(prefix + "/images/generate")(self._image)
            app.post(prefix + "/{endpoint}/generate")(self._submit_job)
            app.get(prefix + "/jobs/{job_id}")(self._poll)
        return app

    # ------------------------------------------------------------------- plumbing

    def _check(self, request: Request, body: dict[str, Any], price: int) -> Response | None:
        """Auth, then the credit debit; the refusal to answer, or None."""
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return _error(401, "Unauthorized. Please log in or provide a valid API key.")
        with self._lock:
            if self.credits is not None:
                if self.credits < price:
                    return JSONResponse(
                        {
                            "error": "Insufficient credits",
                            "required": price,
                            "available": self.credits,
                        },
                        status_code=402,
                    )
                self.credits -= price
        return None

    def _record(self, request: Request, body: dict[str, Any], job_id: str | None = None) -> None:
        auth = request.headers.get("authorization")
        self.submissions.append(Submission(request.url.path, body, auth, job_id))

    # ----------------------------------------------------------------------- chat

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        self._record(request, body)
        if not body.get("messages"):
            return _error(400, "Messages are required")
        price = self.prices["chat"]
        if (refused := self._check(request, body, price)) is not None:
            return refused
        limit = body.get("max_tokens")
        answer = list(self.tokens)[: limit or None]
        finish = "length" if limit is not None and limit < len(self.tokens) else "stop"
        prompt = prompt_tokens(body["messages"])
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": len(answer),
            "total_tokens": prompt + len(answer),
        }
        if body.get("stream", True) is False:
            message = {"role": "assistant", "content": "".join(answer)}
            return JSONResponse(
                {
                    "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                    "usage": usage,
                    "creditsUsed": price,
                }
            )
        events = chat_chunks(
            self.stats,
            model=str(body.get("model") or "spicy-chat"),
            answer=answer,
            finish=finish,
            token_delay=self.token_delay,
            finish_extra={"usage": usage, "creditsUsed": price},
        )
        return StreamingResponse(events, media_type="text/event-stream")

    # --------------------------------------------------------------------- images

    async def _image(self, request: Request) -> Response:
        body = await request.json()
        self._record(request, body)
        if not body.get("prompt"):
            return _error(400, "Prompt is required")
        price = self.prices["image"]
        if (refused := self._check(request, body, price)) is not None:
            return refused
        fmt = str(body.get("output_format") or "png")
        url = self.media.add(request, image_bytes(32, 32, fmt), MIME_BY_KIND[fmt], fmt)
        model = body.get("model") or "nano-banana-t2i"
        return JSONResponse(
            {
                "created": int(time.time()),
                "data": [{"url": url, "model": model}],
                "resultId": f"res_{uuid.uuid4().hex[:12]}",
                "creditsUsed": price,
            }
        )

    # ----------------------------------------------------------------------- jobs

    async def _submit_job(self, endpoint: str, request: Request) -> Response:
        body = await request.json()
        if endpoint not in JOB_KINDS:
            return _error(404, "Not found")
        job_type, output = JOB_KINDS[endpoint]
        if not body.get("model"):
            self._record(request, body)
            return _error(400, "Model is required")
        if (refused := self._check(request, body, self.prices[job_type])) is not None:
            self._record(request, body)
            return refused
        model = str(body["model"])
        scenario = self._scenarios.get(model, self.default)
        job = _Job(f"job_{uuid.uuid4().hex[:12]}", model, job_type, output, scenario)
        with self._lock:
            self._jobs[job.job_id] = job
        self._record(request, body, job.job_id)
        return JSONResponse(
            {
                "jobId": job.job_id,
                "status": "processing",
                "message": "Generation started. Result will be sent to your webhook URL.",
                "creditsUsed": self.prices[job_type],
            },
            status_code=202,
        )

    async def _poll(self, job_id: str, request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return _error(401, "Unauthorized. Please log in or provide a valid API key.")
        query = dict(request.query_params)
        self.polls.append(query)
        job = self._jobs.get(job_id)
        if job is None or query.get("model") != job.model or query.get("type") != job.type:
            return _error(404, "Job not found")
        job.polls += 1
        if job.polls <= job.scenario.processing_polls:
            return JSONResponse({"status": "processing", "jobId": job_id})
        if job.scenario.error is not None:
            return JSONResponse({"status": "failed", "jobId": job_id, "error": job.scenario.error})
        if job.output_url is None:
            data = media_for(job.output)
            suffix = SUFFIXES[job.output]
            job.output_url = self.media.add(request, data, MIME_BY_KIND[job.output], suffix)
        return JSONResponse({"status": "completed", "outputUrl": job.output_url, "jobId": job_id})


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)
