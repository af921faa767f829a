"""A fake Replicate predictions API: a real FastAPI app speaking the documented protocol.

Endpoints (https://replicate.com/docs, "Predictions"), all under ``/v1`` and behind
``Authorization: Bearer <token>`` except ``/files``:

- ``POST /v1/models/{owner}/{name}/predictions`` and ``POST /v1/predictions`` (with ``version``)
  -> 201 prediction (``id``, ``status: starting``, ``urls.get``/``urls.cancel``); ``Prefer: wait``
  returns it finished when the scenario allows; errors are RFC 7807 bodies (``title``,
  ``detail``, ``status``; 422 adds ``invalid_fields``)
- ``GET /v1/predictions/{id}`` -> ``starting`` -> ``processing`` (tqdm ``logs``) -> ``succeeded``
  (``output``: a URL or a list of URLs), ``failed`` (``error``) or ``canceled``
- ``POST /v1/predictions/{id}/cancel`` -> the prediction, now ``canceled``
- ``GET /v1/webhooks/default/secret`` -> ``{"key": "whsec_..."}``
- ``GET /files/{name}`` -> output files (real PNG/JPEG/WEBP, MP4 head, WAV, GLB)

When a prediction carries ``webhook`` (and its ``webhook_events_filter`` includes
``completed``), the fake POSTs the finished prediction there, signed the Standard Webhooks way
with :attr:`ReplicateFake.webhook_secret`, and records the receiver's answer in ``deliveries``.

Usage::

    fake = ReplicateFake()  # accepts the token "r8_test_token"
    fake.set_scenario("owner/video-model", ReplicateScenario(output="video", processing_polls=3))
    with serve_app(fake.app) as url:
        backend = ReplicatePredictions(
            {"api_key": "r8_test_token", "base_url": f"{url}/v1", "poll_interval": 0.01}
        )

Scenarios are keyed by ``owner/name`` (models endpoint) or version id; ``fake.default`` applies
otherwise. State advances one step per ``GET`` of the prediction, or by itself after
``finish_after`` seconds.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
from fastapi import BackgroundTasks, FastAPI, Request
from fastapi.responses import JSONResponse
from standardwebhooks.webhooks import Webhook

from tests.support.sample_media import MIME_BY_KIND, MediaStore, media_for, progress_log

OutputKind = Literal["image", "images", "video", "audio", "mesh"]
Outcome = Literal["succeeded", "failed", "canceled"]
_ALL_EVENTS = ("start", "output", "logs", "completed")  # Replicate's default events filter


@dataclass(frozen=True)
class ReplicateScenario:
    """How the fake treats one model's predictions."""

    output: OutputKind = "image"  # "images": a list of URLs (num_outputs of them)
    starting_polls: int = 1  # GETs answered "starting"
    processing_polls: int = 1  # then GETs answered "processing" ("slow": make this large)
    outcome: Outcome = "succeeded"
    error: str = "CUDA out of memory"  # the prediction's error when it fails
    create_error: int | None = None  # answer the create itself with 401/402/404/422/500 ...
    throttled_creates: int = 0  # the first N creates answer 429 with Retry-After: 0
    transient_get_errors: int = 0  # the first N GETs answer 503
    finishes_within_wait: bool = True  # "Prefer: wait" returns the finished prediction
    output_as_data_uri: bool = False  # output files inline as data: URIs instead of URLs
    # Finish by itself this many seconds after the create, as the real service does (GETs
    # before then answer "processing"), and deliver the webhook then; None: advance per GET.
    finish_after: float | None = None


@dataclass(frozen=True)
class Creation:
    """What one create call carried."""

    path: str
    body: dict[str, Any]
    authorization: str | None
    prefer: str | None
    prediction_id: str | None


@dataclass(frozen=True)
class Delivery:
    """One webhook POST the fake made, and the receiver's status code (None: unreachable)."""

    url: str
    prediction_id: str
    status_code: int | None


@dataclass
class _Prediction:
    body: dict[str, Any]
    scenario: ReplicateScenario
    polls: int = 0
    failed_polls: int = 0

    @property
    def terminal(self) -> bool:
        return self.body["status"] in ("succeeded", "failed", "canceled")


@dataclass
class ReplicateFake:
    """State and app of one fake Replicate API. Lists are appended by the server thread."""

    api_key: str = "r8_test_token"
    default: ReplicateScenario = field(default_factory=ReplicateScenario)
    webhook_secret: str = field(
        default_factory=lambda: "whsec_" + base64.b64encode(uuid.uuid4().bytes * 2).decode()
    )
    creations: list[Creation] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    polls: int = 0
    media: MediaStore = field(default_factory=MediaStore)
    _scenarios: dict[str, ReplicateScenario] = field(default_factory=dict)
    _predictions: dict[str, _Prediction] = field(default_factory=dict)
    _throttled: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _timers: set[asyncio.Task[None]] = field(default_factory=set)

    def set_scenario(self, model: str, scenario: ReplicateScenario) -> None:
        """Use ``scenario`` for ``owner/name`` (or a version id)."""
        self._scenarios[model] = scenario

    @property
    def app(self) -> FastAPI:
        """A new ASGI app over this fake's state."""
        app = FastAPI(title="fake Replicate API")
        self.media.mount(app)
        app.post("/v1/models/{owner}/{name}/predictions")(self._create_for_model)
        app.post("/v1/predictions")(self._create_for_version)
        app.get("/v1/predictions/{prediction_id}")(self._get)
        app.post("/v1/predictions/{prediction_id}/cancel")(self._cancel)
        app.get("/v1/webhooks/default/secret")(self._secret)
        return app

    # ------------------------------------------------------------------- endpoints

    async def _create_for_model(
        self, owner: str, name: str, request: Request, tasks: BackgroundTasks
    ) -> JSONResponse:
        body = await request.json()
        return self._create(request, body, f"{owner}/{name}", None, tasks)

    async def _create_for_version(self, request: Request, tasks: BackgroundTasks) -> JSONResponse:
        body = await request.json()
        version = body.get("version")
        if not isinstance(version, str) or not version:
            return _problem(422, "Invalid version", "- version is required")
        model = version.split(":")[0] if ":" in version else None
        return self._create(request, body, model, version.split(":")[-1], tasks)

    def _create(
        self,
        request: Request,
        body: dict[str, Any],
        model: str | None,
        version: str | None,
        tasks: BackgroundTasks,
    ) -> JSONResponse:
        scenario = self._scenarios.get(version or "") or self._scenarios.get(model or "")
        scenario = scenario or self.default
        creation = Creation(
            path=request.url.path,
            body=body,
            authorization=request.headers.get("authorization"),
            prefer=request.headers.get("prefer"),
            prediction_id=None,
        )
        error = self._deny(request) or self._create_error(scenario, body)
        if error is not None:
            self.creations.append(creation)
            return error
        prediction_id = uuid.uuid4().hex[:26]
        api = str(request.base_url).rstrip("/") + "/v1/predictions/" + prediction_id
        prediction = _Prediction(
            {
                "id": prediction_id,
                "model": model or "unknown/unknown",
                "version": version or "",
                "input": body["input"],
                "logs": "",
                "output": None,
                "error": None,
                "status": "starting",
                "created_at": _now(),
                "started_at": None,
                "completed_at": None,
                "data_removed": False,
                "metrics": {},
                "urls": {"get": api, "cancel": f"{api}/cancel", "web": f"{api}/web"},
                **{k: body[k] for k in ("webhook", "webhook_events_filter") if k in body},
            },
            scenario,
        )
        with self._lock:
            self._predictions[prediction_id] = prediction
        self.creations.append(dataclasses.replace(creation, prediction_id=prediction_id))
        if creation.prefer and creation.prefer.startswith("wait") and scenario.finishes_within_wait:
            self._finish(prediction, request, tasks)
        elif scenario.finish_after is not None:
            # Detached from the create call, which answers now (a background task would hold
            # its connection until it ends).
            timer = asyncio.get_running_loop().create_task(
                self._finish_later(prediction, request, scenario.finish_after)
            )
            self._timers.add(timer)
            timer.add_done_callback(self._timers.discard)
        return JSONResponse(prediction.body, 201)

    async def _get(
        self, prediction_id: str, request: Request, tasks: BackgroundTasks
    ) -> JSONResponse:
        prediction, error = self._find(prediction_id, request)
        if prediction is None:
            return error
        self.polls += 1
        scenario = prediction.scenario
        if prediction.failed_polls < scenario.transient_get_errors:
            prediction.failed_polls += 1
            return _problem(503, "Service Unavailable", "upstream connect error")
        if not prediction.terminal and scenario.finish_after is not None:
            prediction.body["status"] = "processing"
        elif not prediction.terminal:
            prediction.polls += 1
            if prediction.polls <= scenario.starting_polls:
                pass  # still booting the model
            elif prediction.polls <= scenario.starting_polls + scenario.processing_polls:
                step = prediction.polls - scenario.starting_polls
                prediction.body["status"] = "processing"
                prediction.body["started_at"] = prediction.body["started_at"] or _now()
                prediction.body["logs"] = "\n".join(
                    progress_log(i, scenario.processing_polls) for i in range(step)
                )
            else:
                self._finish(prediction, request, tasks)
        return JSONResponse(prediction.body)

    async def _cancel(
        self, prediction_id: str, request: Request, tasks: BackgroundTasks
    ) -> JSONResponse:
        prediction, error = self._find(prediction_id, request)
        if prediction is None:
            return error
        if not prediction.terminal:
            self.cancelled.append(prediction_id)
            prediction.body.update(status="canceled", completed_at=_now())
            self._notify(prediction, tasks)
        return JSONResponse(prediction.body)

    async def _secret(self, request: Request) -> JSONResponse:
        return self._deny(request) or JSONResponse({"key": self.webhook_secret})

    # --------------------------------------------------------------------- helpers

    def _deny(self, request: Request) -> JSONResponse | None:
        if request.headers.get("authorization") == f"Bearer {self.api_key}":
            return None
        return _problem(401, "Unauthenticated", "You did not pass a valid authentication token")

    def _create_error(
        self, scenario: ReplicateScenario, body: dict[str, Any]
    ) -> JSONResponse | None:
        if self._throttled < scenario.throttled_creates:
            self._throttled += 1
            return _problem(429, "Request was throttled", "Expected available in 0 seconds.", "0")
        if not isinstance(body.get("input"), dict):
            return _problem(422, "Input validation failed", "- input is required")
        status = scenario.create_error
        if status is None:
            return None
        if status == 422:
            return _problem(422, "Input validation failed", "- input.prompt: prompt is too long")
        titles = {401: "Unauthenticated", 402: "Insufficient credit", 404: "Not found"}
        return _problem(status, titles.get(status, "Internal Server Error"), f"fake error {status}")

    def _find(
        self, prediction_id: str, request: Request
    ) -> tuple[_Prediction | None, JSONResponse]:
        denied = self._deny(request)
        if denied is not None:
            return None, denied
        with self._lock:
            prediction = self._predictions.get(prediction_id)
        return prediction, _problem(404, "Not found", "The requested resource does not exist")

    def _finish(self, prediction: _Prediction, request: Request, tasks: BackgroundTasks) -> None:
        scenario, body = prediction.scenario, prediction.body
        body.update(status=scenario.outcome, completed_at=_now())
        body["started_at"] = body["started_at"] or body["completed_at"]
        if scenario.outcome == "failed":
            body["error"] = scenario.error
        elif scenario.outcome == "succeeded":
            body["output"] = self._output(scenario, body["input"], request)
            body["metrics"] = {"predict_time": 0.01}
        self._notify(prediction, tasks)

    async def _finish_later(self, prediction: _Prediction, request: Request, delay: float) -> None:
        await asyncio.sleep(delay)
        if prediction.terminal:  # canceled meanwhile
            return
        later = BackgroundTasks()
        self._finish(prediction, request, later)
        await later()

    def _output(self, scenario: ReplicateScenario, inputs: dict[str, Any], request: Request) -> Any:
        kind = "image" if scenario.output in ("image", "images") else scenario.output
        fmt = str(inputs.get("output_format") or "png") if kind == "image" else ""
        suffix = fmt or {"video": "mp4", "audio": "wav", "mesh": "glb"}[kind]
        mime = MIME_BY_KIND[fmt or kind]
        count = int(inputs.get("num_outputs", 1)) if scenario.output == "images" else 1
        files = []
        for _ in range(count):
            data = media_for(kind, fmt=fmt or "png")
            if scenario.output_as_data_uri:
                files.append(f"data:{mime};base64,{base64.b64encode(data).decode()}")
            else:
                files.append(self.media.add(request, data, mime, suffix))
        return files if scenario.output == "images" else files[0]

    def _notify(self, prediction: _Prediction, tasks: BackgroundTasks) -> None:
        url = prediction.body.get("webhook")
        events = prediction.body.get("webhook_events_filter") or _ALL_EVENTS
        if isinstance(url, str) and "completed" in events:
            tasks.add_task(self._deliver, url, json.loads(json.dumps(prediction.body)))

    async def _deliver(self, url: str, payload: dict[str, Any]) -> None:
        data = json.dumps(payload)
        message_id = f"msg_{uuid.uuid4().hex}"
        now = datetime.now(UTC)
        headers = {
            "content-type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": Webhook(self.webhook_secret).sign(message_id, now, data),
        }
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                response = await client.post(url, content=data, headers=headers)
            status: int | None = response.status_code
        except httpx.HTTPError:
            status = None
        self.deliveries.append(Delivery(url, payload["id"], status))


def _problem(status: int, title: str, detail: str, retry_after: str | None = None) -> JSONResponse:
    """Replicate's RFC 7807 error body."""
    body: dict[str, Any] = {"title": title, "detail": detail, "status": status}
    if status == 422:
        body["invalid_fields"] = [
            {"type": "invalid", "field": "input", "description": detail.lstrip("- ")}
        ]
    headers = {"Retry-After": retry_after} if retry_after is not None else None
    return JSONResponse(body, status, headers, media_type="application/problem+json")


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")
