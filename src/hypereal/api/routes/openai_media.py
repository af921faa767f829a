"""OpenAI-standard media routes, for clients of the official OpenAI SDKs:

- ``POST /images/generations`` and ``POST /images/edits`` (multipart) on the image pipeline
  (``domain/images.py``), answered as OpenAI's ``{"created", "data": [{"url"|"b64_json"}]}``;
- ``POST /audio/speech`` (the audio bytes) and ``POST /audio/transcriptions`` (multipart;
  json, text, verbose_json, srt, vtt) on the audio job models, waited for as a synchronous
  job (``routes/jobs.py``): still jobs, listed and pollable.

Errors on these routes leave in OpenAI's error object (``api/error_shapes.py``). A field the
serving model cannot honour (``seed`` on a model without one, a ``response_format`` its
backend does not produce) is a 400 saying so, never silently ignored.
"""

from __future__ import annotations

import base64
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict
from starlette.datastructures import FormData, UploadFile

from hypereal.api.deps import PrincipalDep, ServicesDep, running_engine
from hypereal.api.idempotency import idempotent
from hypereal.api.responses import FastJSONResponse
from hypereal.api.routes.jobs import JobEnded, wait_for_job
from hypereal.domain import images, jobs
from hypereal.domain.catalogue import ModelSpec
from hypereal.domain.errors import BadRequest, GenerationFailed, HyperealError
from hypereal.domain.keys import Principal
from hypereal.engine.submit import Submission, check_backend_input, submit_generation
from hypereal.services import Services
from hypereal.store.writer import Dialect, Ops, Sql

router = APIRouter(tags=["openai"])

MAX_IMAGES = 10
# OpenAI's model names, served by the catalogue's models of the same kind.
SPEECH_MODELS = {"tts-1": "audio-tts", "tts-1-hd": "audio-tts", "gpt-4o-mini-tts": "audio-tts"}
TRANSCRIPTION_MODELS = {
    "whisper-1": "audio-asr",
    "gpt-4o-transcribe": "audio-asr",
    "gpt-4o-mini-transcribe": "audio-asr",
}
OPENAI_VOICES = (
    "alloy",
    "ash",
    "ballad",
    "coral",
    "echo",
    "fable",
    "nova",
    "onyx",
    "sage",
    "shimmer",
    "verse",
)
SPEECH_CONTENT_TYPES = {"mp3": "audio/mpeg", "wav": "audio/wav"}
TRANSCRIPT_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
# How long a speech or transcription request waits for its job at most (seconds).
MEDIA_WAIT_SECONDS = 600.0


def _unsupported(field: str, value: Any, spec: ModelSpec, why: str) -> BadRequest:
    return BadRequest(
        f"Invalid value for '{field}': {value!r} cannot be honoured by the backend serving "
        f"{spec.slug} ({why})"
    )


# --------------------------------------------------------------------------- images


class ImageGenerationBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: Any = None
    model: str | None = None
    n: Any = None
    size: Any = None
    response_format: Any = None
    seed: Any = None
    output_format: Any = None
    aspect_ratio: Any = None


def _count(value: Any) -> int:
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_IMAGES:
        raise BadRequest(f"Invalid value for 'n': must be an integer from 1 to {MAX_IMAGES}")
    return value


def _image_format(value: Any) -> str:
    if value is None or value == "":
        return "url"
    if value not in ("url", "b64_json"):
        raise BadRequest("Invalid value for 'response_format': must be one of: url, b64_json")
    return str(value)


def _size(value: Any) -> Any:
    return None if value in (None, "", "auto") else value


def _check_seed(spec: ModelSpec, seed: Any) -> None:
    if seed is not None and spec.param("seed") is None:
        raise _unsupported("seed", seed, spec, "it takes no seed")


async def _images_answer(
    services: Services,
    principal: Principal,
    spec: ModelSpec,
    values: dict[str, Any],
    count: int,
    response_format: str,
) -> JSONResponse:
    """``count`` images (one backend call each, each charged and recorded as its own
    result) in OpenAI's answer shape. When one fails after others were made, the answer
    holds the images made (charged, as their results are) and ``notGenerated`` says how
    many were not and why (those were refunded); a failure before any image is the
    error answer itself."""
    data: list[dict[str, Any]] = []
    credits = 0
    body: dict[str, Any] = {"created": int(time.time()), "data": data}
    for made in range(count):
        try:
            result = await images.generate(services.pipeline, principal.account_id, spec, values)
        except HyperealError as exc:
            if made == 0:
                raise
            body["notGenerated"] = {"count": count - made, "error": exc.message}
            break
        credits += result.credits
        for url, key in zip(result.urls, result.keys, strict=True):
            if response_format == "b64_json":
                stored = await services.media.get(key)
                if stored is None:
                    raise BadRequest("The generated image is no longer stored")
                data.append({"b64_json": base64.b64encode(stored).decode("ascii")})
            else:
                data.append({"url": url})
    body["creditsUsed"] = credits
    return FastJSONResponse(body)


@router.post("/images/generations")
async def image_generations(
    request: Request, body: ImageGenerationBody, principal: PrincipalDep, services: ServicesDep
) -> Response:
    """OpenAI ``images.generate``: ``model``, ``prompt``, ``n``, ``size``, ``response_format``
    (url | b64_json), ``seed`` where the model takes one."""
    spec = services.catalogue.get(body.model, "image")
    count = _count(body.n)
    response_format = _image_format(body.response_format)
    _check_seed(spec, body.seed)
    values = {
        "prompt": body.prompt,
        "size": _size(body.size),
        "aspect_ratio": body.aspect_ratio,
        "output_format": body.output_format,
        "seed": body.seed,
    }

    async def produce() -> Response:
        return await _images_answer(services, principal, spec, values, count, response_format)

    return await idempotent(request, principal, services, produce)


def _data_uri(upload: UploadFile, data: bytes, field: str) -> str:
    if not data:
        raise BadRequest(f"Invalid value for '{field}': the file is empty")
    content_type = upload.content_type or "application/octet-stream"
    return f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}"


def _form_text(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if value is None or isinstance(value, UploadFile):
        return None
    return value


def _form_int(form: FormData, name: str) -> int | None:
    value = _form_text(form, name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"Invalid value for '{name}': must be an integer") from None


async def _form(request: Request) -> FormData:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise BadRequest("This endpoint takes multipart/form-data")
    try:
        return await request.form(max_files=16, max_fields=64)
    except HyperealError:
        raise
    except Exception as exc:  # a malformed multipart body
        raise BadRequest(f"Invalid multipart body: {exc}") from None


@router.post("/images/edits")
async def image_edits(request: Request, principal: PrincipalDep, services: ServicesDep) -> Response:
    """OpenAI ``images.edit``: multipart ``image`` (or ``image[]``, several), ``prompt``,
    ``model``, ``n``, ``size``, ``response_format``."""
    form = await _form(request)
    spec = services.catalogue.get(_form_text(form, "model"), "image-edit")
    sources: list[str] = []
    for name in ("image", "image[]"):
        for item in form.getlist(name):
            if isinstance(item, UploadFile):
                sources.append(_data_uri(item, await item.read(), name))
    if not sources:
        raise BadRequest("Missing required field 'image': one or more image files")
    if form.get("mask") is not None:
        raise _unsupported("mask", "(file)", spec, "it takes no mask")
    count = _count(_form_int(form, "n"))
    response_format = _image_format(_form_text(form, "response_format"))
    seed = _form_int(form, "seed")
    _check_seed(spec, seed)
    values = {
        "prompt": _form_text(form, "prompt"),
        "size": _size(_form_text(form, "size")),
        "output_format": _form_text(form, "output_format"),
        "seed": seed,
        "images": sources,
    }

    async def produce() -> Response:
        return await _images_answer(services, principal, spec, values, count, response_format)

    return await idempotent(request, principal, services, produce)


# ---------------------------------------------------------------------------- audio


def _output_key_op(_: Dialect, job_id: str) -> Ops[str | None]:
    row = yield Sql.one("SELECT output_key FROM jobs WHERE id = :id", id=job_id)
    return row["output_key"] if row is not None else None


async def _run_audio(
    request: Request, services: Services, account_id: str, spec: ModelSpec, fields: dict[str, Any]
) -> jobs.JobView:
    """Submit an audio job of ``spec`` and wait for it; its error when it fails, a 504
    naming the job when it runs on."""
    job = await submit_generation(
        services, running_engine(request), account_id, "audio", Submission(spec.slug, fields, None)
    )
    window = min(MEDIA_WAIT_SECONDS, max(spec.sync_seconds, float(spec.timeout_seconds)))
    job = await wait_for_job(request, services, job, window)
    if job.state == "completed":
        return job
    if job.state in jobs.TERMINAL:
        raise JobEnded(job)
    raise StillRunning(job)


class StillRunning(HyperealError):
    status = 504

    def __init__(self, job: jobs.JobView) -> None:
        super().__init__(f"The job {job.id} is still running; poll GET /v1/jobs/{job.id}")


class SpeechBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: Any = None
    voice: Any = None
    response_format: Any = None
    speed: Any = None
    instructions: Any = None


def _speech_model(services: Services, model: str | None) -> ModelSpec:
    slug = SPEECH_MODELS.get(model or "", model) or "audio-tts"
    return services.catalogue.get(slug, "audio")


def _speech_fields(services: Services, spec: ModelSpec, body: SpeechBody) -> dict[str, Any]:
    fmt = body.response_format or "mp3"
    format_param = spec.param("format")
    choices = format_param.choices if format_param is not None else None
    if not isinstance(fmt, str):  # a list or an object: unhashable, never a format
        raise BadRequest("Invalid value for 'response_format': must be one of: mp3, wav")
    if fmt not in SPEECH_CONTENT_TYPES or (choices is not None and fmt not in choices):
        raise _unsupported("response_format", fmt, spec, "it produces wav or mp3")
    if body.instructions not in (None, ""):
        raise _unsupported("instructions", body.instructions, spec, "it takes no instructions")
    fields: dict[str, Any] = {"text": body.input, "format": fmt}
    if body.speed is not None:
        if spec.param("speed") is None:
            raise _unsupported("speed", body.speed, spec, "it takes no speed")
        fields["speed"] = body.speed
    voice = body.voice
    if voice not in (None, ""):
        if not isinstance(voice, str):
            raise BadRequest("Invalid value for 'voice': must be a string")
        fields["voice"] = voice
        try:
            check_backend_input(services, spec, fields)
        except BadRequest:
            if voice.lower() not in OPENAI_VOICES:
                raise
            # An OpenAI voice name this backend lacks: its own default voice speaks.
            del fields["voice"]
    return fields


@router.post("/audio/speech")
async def speech(
    request: Request, body: SpeechBody, principal: PrincipalDep, services: ServicesDep
) -> Response:
    """OpenAI ``audio.speech.create``: the audio bytes (mp3 or wav). OpenAI's voice names
    are spoken by the backend's default voice when it has none of that name."""
    spec = _speech_model(services, body.model)
    fields = _speech_fields(services, spec, body)

    async def produce() -> Response:
        job = await _run_audio(request, services, principal.account_id, spec, fields)
        key = await services.db.read(_output_key_op, job.id)
        data = await services.media.get(key) if key else None
        if data is None:
            raise BadRequest("The speech is no longer stored")
        return Response(
            data,
            media_type=SPEECH_CONTENT_TYPES[fields["format"]],
            headers={"X-Hypereal-Job-Id": job.id, "X-Hypereal-Credits-Used": str(job.credits)},
        )

    return await idempotent(request, principal, services, produce)


def _timestamp(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _captions(segments: list[dict[str, Any]], *, vtt: bool) -> str:
    lines = ["WEBVTT", ""] if vtt else []
    for index, segment in enumerate(segments, 1):
        sep = "." if vtt else ","
        start = _timestamp(float(segment["start"]), sep)
        end = _timestamp(float(segment["end"]), sep)
        if not vtt:
            lines.append(str(index))
        lines += [f"{start} --> {end}", str(segment["text"]).strip(), ""]
    return "\n".join(lines)


def transcript_response(result: dict[str, Any], response_format: str) -> Response:
    """A transcript (``text``, ``segments``, ``words``, ``duration_seconds``, ``language``)
    in one of OpenAI's response formats."""
    text = str(result.get("text", ""))
    segments = list(result.get("segments") or [])
    if response_format == "json":
        return FastJSONResponse({"text": text})
    if response_format == "text":
        return PlainTextResponse(text)
    if response_format == "srt":
        return PlainTextResponse(_captions(segments, vtt=False))
    if response_format == "vtt":
        return PlainTextResponse(_captions(segments, vtt=True), media_type="text/vtt")
    return FastJSONResponse(
        {
            "task": "transcribe",
            "language": "english" if str(result.get("language", "")).startswith("en") else "",
            "duration": result.get("duration_seconds"),
            "text": text,
            "segments": [
                {
                    "id": index,
                    "seek": 0,
                    "start": s["start"],
                    "end": s["end"],
                    "text": s["text"],
                    "tokens": [],
                    "temperature": 0.0,
                    "avg_logprob": 0.0,
                    "compression_ratio": 0.0,
                    "no_speech_prob": 0.0,
                }
                for index, s in enumerate(segments)
            ],
            "words": list(result.get("words") or []),
        }
    )


@router.post("/audio/transcriptions")
async def transcriptions(
    request: Request, principal: PrincipalDep, services: ServicesDep
) -> Response:
    """OpenAI ``audio.transcriptions.create``: multipart ``file``, ``model``, ``language``,
    ``response_format`` (json, text, verbose_json with segments and words, srt, vtt)."""
    form = await _form(request)
    model = _form_text(form, "model")
    spec = services.catalogue.get(
        TRANSCRIPTION_MODELS.get(model or "", model) or "audio-asr", "audio"
    )
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise BadRequest("Missing required field 'file': the audio file")
    response_format = _form_text(form, "response_format") or "json"
    if response_format not in TRANSCRIPT_FORMATS:
        raise BadRequest(
            "Invalid value for 'response_format': must be one of: " + ", ".join(TRANSCRIPT_FORMATS)
        )
    for unsupported in ("prompt", "temperature"):
        value = _form_text(form, unsupported)
        if value not in (None, "", "0") and spec.param(unsupported) is None:
            raise _unsupported(unsupported, value, spec, f"it takes no {unsupported}")
    fields: dict[str, Any] = {"audio": _data_uri(upload, await upload.read(), "file")}
    language = _form_text(form, "language")
    if language:
        fields["language"] = language

    async def produce() -> Response:
        job = await _run_audio(request, services, principal.account_id, spec, fields)
        result = dict(job.result or {})
        if "text" not in result:
            raise GenerationFailed(f"{spec.slug} returned no transcript")
        response = transcript_response(result, response_format)
        response.headers["X-Hypereal-Job-Id"] = job.id
        return response

    return await idempotent(request, principal, services, produce)
