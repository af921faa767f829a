"""Async generation (videos, audio, 3D), job polling, cancel, webhook deliveries and the
account's webhook signing secret."""

from __future__ import annotations

import re
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict

from hypereal.api.deps import PrincipalDep, ServicesDep, running_engine
from hypereal.api.idempotency import idempotent
from hypereal.api.responses import FastJSONResponse
from hypereal.api.schemas import iso
from hypereal.domain import admin_actions, jobs
from hypereal.domain.catalogue import ModelSpec
from hypereal.domain.errors import Conflict, GenerationFailed, HyperealError
from hypereal.domain.keys import Principal
from hypereal.domain.webhook_secrets import webhook_secret
from hypereal.engine.submit import EngineNotRunning, Submission, submit_generation
from hypereal.media.store import LocalMediaStore
from hypereal.services import Services
from hypereal.webhooks.delivery import Delivery, deliveries_for_job

router = APIRouter(tags=["jobs"])


class GenerateBody(BaseModel):
    """``{"model", "input": {...}, "webhook_url"}``; per-model fields sent at the top level
    instead of inside ``input`` are accepted too."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: dict[str, Any] | None = None
    webhook_url: str | None = None


def job_json(job: jobs.JobView) -> dict[str, Any]:
    data: dict[str, Any] = {
        "status": job.status,
        "jobId": job.id,
        "outputUrl": job.output_url,
        "type": job.type,
        "model": job.model,
        "creditsUsed": job.credits_used,
        "stage": job.stage,
        "progress": job.progress,
        "createdAt": iso(job.created_at),
    }
    if job.started_at is not None:
        data["startedAt"] = iso(job.started_at)
    if job.completed_at is not None:
        data["completedAt"] = iso(job.completed_at)
    if job.error is not None:
        data["error"] = job.error
    if job.result is not None:
        data["result"] = job.result
    return data


# ``Prefer: wait=N`` (Replicate's convention): wait up to N seconds, at most this many.
MAX_PREFER_WAIT = 60.0
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def prefer_wait(request: Request) -> float | None:
    """Seconds asked for by ``Prefer: wait=N`` (capped at MAX_PREFER_WAIT), or None."""
    header = request.headers.get("prefer")
    if not header:
        return None
    match = _PREFER_WAIT.search(header)
    if match is None:
        return None
    return min(float(match.group(1)), MAX_PREFER_WAIT)


def wait_window(request: Request, spec: ModelSpec | None) -> float:
    """How long a submission waits for its job: ``Prefer: wait=N`` when sent, else a sync
    model's window, else not at all."""
    asked = prefer_wait(request)
    if asked is not None:
        return asked
    return spec.sync_seconds if spec is not None and spec.sync else 0.0


def completed_json(job: jobs.JobView) -> dict[str, Any]:
    """A completed job with the result in every place clients read it (synchronous answer)."""
    data = job_json(job)
    url = job.output_url
    data.update(
        success=True,
        jobId=job.id,
        status="completed",
        outputUrl=url,
        url=url,
        data=[{"url": url, "model": job.model}],
        output={"url": url},
        creditsUsed=job.credits_used,
    )
    text = (job.result or {}).get("text")
    if isinstance(text, str):  # speech recognition: the transcript inline
        data["text"] = text
    return data


class JobEnded(HyperealError):
    """A waited-for job that failed or was canceled; the body carries the job's fields."""

    def __init__(self, job: jobs.JobView) -> None:
        failure = GenerationFailed if job.state == "failed" else Conflict
        self.status = failure.status
        super().__init__(job.error or f"Job {job.state}")
        self.job = job

    def body(self) -> dict[str, Any]:
        return {**job_json(self.job), "error": self.message, "success": False}


async def wait_for_job(
    request: Request, services: Services, job: jobs.JobView, seconds: float
) -> jobs.JobView:
    """The job once ended, or as it stands after ``seconds`` (see engine/waiters.py)."""
    engine = running_engine(request)
    if engine is None or seconds <= 0:
        return job
    return await engine.waiters.wait(services.db, job, seconds)


def delivery_json(delivery: Delivery) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "url": delivery.url,
        "event": delivery.event,
        "status": delivery.state,
        "attempts": delivery.attempts,
        "nextAttemptAt": iso(delivery.next_attempt_at),
        "lastStatusCode": delivery.last_status_code,
        "lastError": delivery.last_error,
        "createdAt": iso(delivery.created_at),
        "deliveredAt": iso(delivery.delivered_at),
        "attemptLog": [
            {
                "attempt": a.attempt,
                "statusCode": a.status_code,
                "error": a.error,
                "durationMs": a.duration_ms,
                "at": iso(a.started_at),
            }
            for a in delivery.log
        ],
    }


def _api_prefix(request: Request) -> str:
    return "/api/v1" if request.scope["path"].startswith("/api/v1") else "/v1"


async def _generate(
    request: Request,
    body: GenerateBody,
    principal: Principal,
    services: Services,
    modality: str,
) -> Response:
    async def produce() -> JSONResponse:
        fields = {**(body.model_extra or {}), **(body.input or {})}
        job = await submit_generation(
            services,
            running_engine(request),
            principal.account_id,
            modality,
            Submission(model=body.model, input=fields, webhook_url=body.webhook_url),
        )
        window = wait_window(request, services.catalogue.find(job.model))
        if window > 0:
            job = await wait_for_job(request, services, job, window)
            if job.state == "completed":
                return FastJSONResponse(completed_json(job))
            if job.state in jobs.TERMINAL:
                raise JobEnded(job)
        query = urlencode({"model": job.model, "type": job.type})
        poll_url = f"{services.settings.base_url()}{_api_prefix(request)}/jobs/{job.id}?{query}"
        message = (
            "Generation started. Result will be sent to your webhook URL."
            if job.webhook_url
            else "Generation started. Poll pollUrl for the result."
        )
        return FastJSONResponse(
            {
                "jobId": job.id,
                "status": job.status,
                "message": message,
                "creditsUsed": job.credits,
                "pollUrl": poll_url,
            },
            status_code=202,
        )

    return await idempotent(request, principal, services, produce)


@router.post("/videos/generate", status_code=202)
async def generate_video(
    request: Request, body: GenerateBody, principal: PrincipalDep, services: ServicesDep
) -> Response:
    """Start a text- or image-to-video job; answers 202 with ``jobId`` and ``pollUrl``."""
    return await _generate(request, body, principal, services, "video")


@router.post("/audio/generate", status_code=202)
async def generate_audio(
    request: Request, body: GenerateBody, principal: PrincipalDep, services: ServicesDep
) -> Response:
    """Start a text-to-speech or voice-cloning job (same job model as videos)."""
    return await _generate(request, body, principal, services, "audio")


@router.post("/3d/generate", status_code=202)
async def generate_3d(
    request: Request, body: GenerateBody, principal: PrincipalDep, services: ServicesDep
) -> Response:
    """Start an image-to-3D (GLB) job (same job model as videos)."""
    return await _generate(request, body, principal, services, "3d")


@router.get("/jobs")
async def list_jobs(
    principal: PrincipalDep,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    before: Annotated[str | None, Query(description="nextCursor of the previous page")] = None,
    type: Annotated[str | None, Query(description="Only jobs of this type")] = None,
) -> dict[str, Any]:
    """The caller's jobs, newest first, paginated."""
    rows = await jobs.list_jobs(
        services.db, principal.account_id, limit=limit + 1, before=before, type=type
    )
    shown = rows[:limit]
    more = len(rows) > limit
    return {
        "data": [job_json(job) for job in shown],
        "hasMore": more,
        "nextCursor": shown[-1].id if more and shown else None,
    }


@router.get("/jobs/{job_id}")
async def get_job(
    request: Request,
    job_id: str,
    principal: PrincipalDep,
    services: ServicesDep,
    model: Annotated[str | None, Query(description="Model slug (accepted, not needed)")] = None,
    type: Annotated[str | None, Query(description="video, audio, 3d or image")] = None,
) -> dict[str, Any]:
    """A job's status and, once completed, its ``outputUrl``. 404 for other accounts' jobs.
    With ``Prefer: wait=N`` a running job is held up to N seconds (60 at most) for its end."""
    job = await jobs.get_job(services.db, principal.account_id, job_id)
    asked = prefer_wait(request)
    if asked and job.state in jobs.ACTIVE:
        job = await wait_for_job(request, services, job, asked)
    data = job_json(job)
    if job.media:  # the uploaded inputs are not public: their owner gets expiring URLs
        data["inputUrls"] = {field: input_url(services, key) for field, key in job.media.items()}
    return data


def input_url(services: Services, key: str) -> str:
    """An uploaded input's URL: signed for an hour on the local store (``/files`` serves it
    to nobody else), the store's own (presigned) URL elsewhere."""
    if isinstance(services.media, LocalMediaStore):
        return services.media_signer.sign(services.settings.base_url(), key)
    return services.media.url_for(key)


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(request: Request, job_id: str, principal: PrincipalDep) -> dict[str, Any]:
    """Cancel a queued or running job and refund its credits (409 once it has finished)."""
    engine = running_engine(request)
    if engine is None:
        raise EngineNotRunning()
    return job_json(await engine.cancel(principal.account_id, job_id))


@router.get("/jobs/{job_id}/deliveries")
async def list_deliveries(
    job_id: str, principal: PrincipalDep, services: ServicesDep
) -> dict[str, Any]:
    """The job's webhook deliveries, each with its attempts."""
    job = await jobs.get_job(services.db, principal.account_id, job_id)
    return {"data": [delivery_json(d) for d in await deliveries_for_job(services.db, job.id)]}


@router.get("/webhooks/secret")
async def get_webhook_secret(principal: PrincipalDep, services: ServicesDep) -> dict[str, Any]:
    """The secret webhooks are signed with (Standard Webhooks, ``whsec_...``)."""
    return {"secret": await webhook_secret(services.db, principal.account_id)}


@router.post("/webhooks/secret/rotate")
async def rotate_secret(principal: PrincipalDep, services: ServicesDep) -> dict[str, Any]:
    """Replace the webhook secret; later attempts, retries included, use the new one."""
    return {
        "secret": await admin_actions.rotate_secret(services.db, principal, principal.account_id)
    }
