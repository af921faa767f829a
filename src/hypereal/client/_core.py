"""What the sync and async clients share: configuration, the retry and polling policies,
request bodies, input files as ``data:`` URIs, and the SSE decoder. No I/O here."""

from __future__ import annotations

import base64
import json
import mimetypes
import os
import random
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from hypereal.client._errors import (
    Conflict,
    HyperealError,
    JobCanceled,
    JobFailed,
    ModelUnavailable,
    NotFound,
    RateLimited,
    ServerError,
    WaitTimeout,
    error_for_status,
)
from hypereal.client._types import Job, Model

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
USER_AGENT = "hypereal-python/0.1"

#: The route that serves each modality.
ROUTES = {
    "chat": "/v1/chat",
    "image": "/v1/images/generate",
    "image-edit": "/v1/images/edit",
    "video": "/v1/videos/generate",
    "audio": "/v1/audio/generate",
    "3d": "/v1/3d/generate",
}
JOB_MODALITIES = ("video", "audio", "3d")

#: Seconds a poll asks the server to hold the answer until the job changes (``Prefer:
#: wait``, Replicate's convention); a server that does not support it answers at once.
PREFER_WAIT_SECONDS = 10

#: Messages: one user message as a string, or OpenAI-style ``{"role", "content"}`` dicts.
Messages = str | Sequence[Mapping[str, Any]]
#: An input file: a URL or ``data:`` URI (sent as is), a path, or the bytes themselves.
MediaInput = str | os.PathLike[str] | bytes


def resolve_base_url(base_url: str | None) -> str:
    """``base_url``, else ``HYPEREAL_BASE_URL``, else the local server; a trailing ``/v1`` or
    ``/api/v1`` (as OpenAI SDK users write it) is dropped: routes carry their prefix."""
    url = (base_url or os.environ.get("HYPEREAL_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
    for suffix in ("/api/v1", "/v1"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    return url


def resolve_api_key(api_key: str | None) -> str | None:
    return api_key or os.environ.get("HYPEREAL_API_KEY") or None


def new_idempotency_key() -> str:
    return f"hyc-{uuid.uuid4()}"


def default_headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed call is tried again, and after how long.

    Retried: 429 (after ``Retry-After``, if it is at most ``max_wait`` seconds), 5xx other
    than an unavailable model (after ``Retry-After`` or exponential backoff with jitter),
    a 409 saying the same Idempotency-Key is still in progress, and network errors. Every
    charging POST carries an Idempotency-Key, reused across its retries, so a retried
    submission whose first answer was lost is answered from the first one and charged once.
    """

    max_retries: int = 3
    max_wait: float = 60.0
    backoff: float = 0.5
    backoff_max: float = 8.0

    def _backoff(self, attempt: int) -> float:
        base = min(self.backoff_max, self.backoff * 2.0 ** (attempt - 1))
        return base * (0.5 + random.random() / 2)

    def after_error(self, attempt: int, error: HyperealError) -> float | None:
        """Seconds to wait before retry number ``attempt`` (1, 2, ...), or None to raise."""
        if attempt > self.max_retries:
            return None
        if isinstance(error, RateLimited):
            if error.retry_after is None:
                return self._backoff(attempt)
            return error.retry_after if error.retry_after <= self.max_wait else None
        if isinstance(error, ModelUnavailable):
            return None
        if isinstance(error, ServerError):
            if error.retry_after is not None and error.retry_after <= self.max_wait:
                return error.retry_after
            return self._backoff(attempt)
        if isinstance(error, Conflict) and "in progress" in error.message:
            return self._backoff(attempt)
        return None

    def after_network_error(self, attempt: int) -> float | None:
        return self._backoff(attempt) if attempt <= self.max_retries else None


@dataclass(frozen=True)
class PollPolicy:
    """Polling a job: the first wait ``initial`` seconds, each next one ``factor`` times
    longer, up to ``maximum``. A server that honours ``Prefer: wait`` holds each poll until
    the job changes instead, and the client polls again at once."""

    initial: float = 0.25
    factor: float = 1.5
    maximum: float = 3.0

    def next(self, interval: float) -> float:
        return min(self.maximum, interval * self.factor)


class WaitState:
    """One ``wait`` for a job: reports progress, tells how long to sleep before the next
    poll, and ends the wait (returns None) once the job has ended; raises JobFailed,
    JobCanceled or WaitTimeout. Shared by the sync and async clients."""

    def __init__(
        self,
        policy: PollPolicy,
        timeout: float | None,
        on_progress: Callable[[Job], object] | None,
    ) -> None:
        self.policy = policy
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.on_progress = on_progress
        self.interval = policy.initial
        self._last: tuple[str, str, float] | None = None

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def hold(self) -> float | None:
        """Seconds the next poll asks the server to hold it (``Prefer: wait``): only when
        nobody watches the progress (a held poll reports nothing until the job ends)."""
        if self.on_progress is not None:
            return None
        remaining = self.remaining()
        if remaining is None:
            return PREFER_WAIT_SECONDS
        return min(PREFER_WAIT_SECONDS, remaining) if remaining >= 1 else None

    def seen(self, job: Job, held: bool = False) -> float | None:
        """Record a poll's answer (``held``: the server honoured ``Prefer: wait``). None when
        the job completed; else the seconds to sleep before polling again."""
        state = (job.status, job.stage, job.progress)
        if self.on_progress is not None and state != self._last:
            self.on_progress(job)
        self._last = state
        if job.done:
            check_finished(job)
            return None
        remaining = self.remaining()
        if remaining is not None and remaining <= 0:
            assert self.timeout is not None
            raise WaitTimeout(job, self.timeout)
        if held:
            return 0.0
        delay = self.interval
        self.interval = self.policy.next(self.interval)
        return delay if remaining is None else min(delay, remaining)


def check_finished(job: Job) -> Job:
    """``job`` if it completed; JobFailed / JobCanceled otherwise."""
    if job.status == "failed":
        raise JobFailed(job)
    if job.status == "canceled":
        raise JobCanceled(job)
    return job


def poll_timeout(hold: float | None) -> Any:
    """The HTTP timeout of a poll that asks the server to hold it ``hold`` seconds."""
    if hold is None:
        return httpx.USE_CLIENT_DEFAULT
    return httpx.Timeout(hold + 30.0, connect=10.0)


def preference_applied(response: httpx.Response) -> bool:
    return "wait" in response.headers.get("preference-applied", "").lower()


def error_from_response(response: httpx.Response) -> HyperealError:
    """The typed error for an HTTP error answer whose body has been read."""
    body: Mapping[str, Any] = {}
    json_body = False
    try:
        parsed = response.json()
    except ValueError:
        parsed = None
    if isinstance(parsed, Mapping):
        body, json_body = parsed, True
    elif response.text.strip():
        body = {"error": f"HTTP {response.status_code}: {response.text.strip()[:200]}"}
    return error_for_status(response.status_code, body, response.headers, json_body=json_body)


def parse_json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError as exc:
        raise HyperealError(
            f"The server answered {response.status_code} with a body that is not JSON",
            status=response.status_code,
        ) from exc
    if not isinstance(data, dict):
        raise HyperealError("The server answered JSON that is not an object")
    return data


def prefer_wait_header(seconds: float | None) -> dict[str, str]:
    if seconds is None:
        return {}
    return {"Prefer": f"wait={max(1, int(seconds))}"}


# ------------------------------------------------------------------------- input files

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"ID3", "audio/mpeg"),
    (b"\xff\xfb", "audio/mpeg"),
    (b"fLaC", "audio/flac"),
    (b"OggS", "audio/ogg"),
    (b"glTF", "model/gltf-binary"),
)


def sniff_type(data: bytes) -> str:
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "audio/wav"
    if data[4:8] == b"ftyp":
        return "video/mp4"
    return "application/octet-stream"


def data_uri(data: bytes, mime: str | None = None) -> str:
    return f"data:{mime or sniff_type(data)};base64,{base64.b64encode(data).decode()}"


def encode_media(value: MediaInput) -> str:
    """A URL or ``data:`` URI as is; a path (``Path``, or a string naming an existing file)
    or bytes as a ``data:`` URI."""
    if isinstance(value, bytes):
        return data_uri(value)
    if isinstance(value, str) and (
        value.startswith(("http://", "https://", "data:")) or not Path(value).is_file()
    ):
        return value
    path = Path(value)
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise HyperealError(f"Cannot read {path}: {exc.strerror or exc}") from exc
    guessed, _ = mimetypes.guess_type(path.name)
    sniffed = sniff_type(content)
    return data_uri(content, sniffed if sniffed != "application/octet-stream" else guessed)


#: Parameters taken as files when no model is at hand (``videos.generate(image="cat.png")``).
COMMON_MEDIA_PARAMS = frozenset({"image", "images", "audio", "video", "mask"})


def _is_media_value(value: Any) -> bool:
    return isinstance(value, bytes | os.PathLike)


def media_params(model: Model | None) -> frozenset[str]:
    if model is None:
        return COMMON_MEDIA_PARAMS
    return COMMON_MEDIA_PARAMS | {p.name for p in model.params if p.is_media}


def prepare_input(
    values: Mapping[str, Any], media: Collection[str] = COMMON_MEDIA_PARAMS
) -> dict[str, Any]:
    """The input with its files as ``data:`` URIs: ``Path`` and ``bytes`` values always,
    and strings naming existing files for the ``media`` parameters (URLs are sent as is)."""
    prepared: dict[str, Any] = {}
    for name, value in values.items():
        if _is_media_value(value) or (name in media and isinstance(value, str)):
            prepared[name] = encode_media(value)
        elif isinstance(value, list | tuple) and (
            name in media or any(_is_media_value(v) for v in value)
        ):
            prepared[name] = [
                encode_media(v) if _is_media_value(v) or isinstance(v, str) else v for v in value
            ]
        else:
            prepared[name] = value
    return prepared


# ------------------------------------------------------------------------- requests


def job_body(
    model: str | None,
    values: Mapping[str, Any],
    webhook_url: str | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"input": prepare_input(values)}
    if model is not None:
        body["model"] = model
    if webhook_url is not None:
        body["webhook_url"] = webhook_url
    return body


def image_body(
    prompt: str | None,
    model: str | None,
    values: Mapping[str, Any],
) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if prompt is not None:
        body["prompt"] = prompt
    if model is not None:
        body["model"] = model
    body.update({k: v for k, v in prepare_input(values).items() if v is not None})
    return body


def normalize_messages(messages: Messages) -> list[dict[str, Any]]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    return [dict(message) for message in messages]


def chat_body(
    messages: Messages,
    *,
    model: str | None,
    stream: bool,
    temperature: float | None,
    max_tokens: int | None,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": normalize_messages(messages), "stream": stream}
    if model is not None:
        body["model"] = model
    if temperature is not None:
        body["temperature"] = temperature
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    body.update(extra)
    return body


def run_chat_arguments(values: Mapping[str, Any]) -> tuple[Messages, dict[str, Any]]:
    """``run(chat_model, input)``: ``messages``, or ``prompt`` (and ``system``) as one turn;
    the other keys (temperature, max_tokens, ...) go into the body."""
    rest = dict(values)
    rest.pop("stream", None)  # run() returns the whole answer
    messages = rest.pop("messages", None)
    prompt = rest.pop("prompt", None)
    system = rest.pop("system", None)
    if messages is None:
        if not isinstance(prompt, str):
            raise HyperealError("A chat model needs input 'messages' or 'prompt'")
        messages = [{"role": "user", "content": prompt}]
        if isinstance(system, str):
            messages.insert(0, {"role": "system", "content": system})
    if not isinstance(messages, str | list | tuple):
        raise HyperealError("input 'messages' must be a list of {role, content}")
    return messages, rest


def route_for(model: Model) -> str:
    if not model.available:
        raise ModelUnavailable(
            model.unavailable_reason or f"Model {model.slug} is not available on this server"
        )
    route = ROUTES.get(model.modality)
    if route is None:
        raise HyperealError(f"Model {model.slug} has a modality this client does not know")
    return route


def find_model(models: Mapping[str, Model], slug: str) -> Model:
    model = models.get(slug)
    if model is None:
        raise NotFound(f"Model not found: {slug}")
    return model


# ------------------------------------------------------------------------------ SSE


class SSEDecoder:
    """Server-sent events, fed line by line: returns each event's ``data`` when its blank
    line arrives (comments such as ``: keep-alive`` are skipped)."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        return self.feed("")


@dataclass
class ChatAccumulator:
    """The state of a streamed answer as its events arrive."""

    id: str | None = None
    model: str | None = None
    finish_reason: str | None = None
    usage: Mapping[str, Any] | None = None
    credits_used: int = 0
    done: bool = False

    def __post_init__(self) -> None:
        self.parts: list[str] = []

    def event(self, data: str) -> str | None:
        """The text delta of one event's ``data``; raises the typed error of an error event."""
        if data == "[DONE]":
            self.done = True
            return None
        try:
            chunk = json.loads(data)
        except ValueError:
            return None
        if not isinstance(chunk, dict):
            return None
        if "error" in chunk:
            error = chunk["error"]
            code = error.get("code") if isinstance(error, dict) else None
            status = code if isinstance(code, int) else 500
            self.credits_used = int(chunk.get("creditsUsed") or 0)
            self.done = True
            raise error_for_status(status, chunk)
        self.id = chunk.get("id", self.id)
        self.model = chunk.get("model", self.model)
        if "usage" in chunk:
            self.usage = chunk["usage"]
        if "creditsUsed" in chunk:
            self.credits_used = int(chunk["creditsUsed"] or 0)
        text = None
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
            delta = choice.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                text = delta["content"]
        if text:
            self.parts.append(text)
        return text or None

    def as_json(self) -> dict[str, Any]:
        """The finished stream in the shape of a non-streamed answer."""
        return {
            "id": self.id,
            "object": "chat.completion",
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(self.parts)},
                    "finish_reason": self.finish_reason,
                }
            ],
            "usage": self.usage,
            "creditsUsed": self.credits_used,
        }
