"""OpenAI-compatible servers: streamed chat, images and text to speech.

Speaks the OpenAI REST protocol as vLLM, the llama.cpp server, Ollama, OpenRouter and OpenAI
serve it, with ``base_url`` ending in the API root (``.../v1``):

- ``POST /chat/completions`` with ``stream: true`` and ``stream_options.include_usage``: an SSE
  stream of ``chat.completion.chunk`` objects (``choices[0].delta.content``, ``finish_reason``),
  a last chunk with empty ``choices`` and ``usage``, then ``data: [DONE]``. A failure after the
  stream started arrives as a chunk with an ``error`` object.
- ``POST /images/generations`` (JSON) or ``POST /images/edits`` (multipart, one ``image`` part, or
  ``image[]`` parts for several) answer ``{"data": [{"b64_json"} | {"url"}]}``.
- ``POST /audio/speech`` ``{model, input, voice, response_format}`` answers the audio bytes.
- Errors answer ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status.

Options (``[backends.NAME]`` with ``type = "openai"``):

``base_url`` (required)
    API root, e.g. ``http://localhost:8000/v1`` (vLLM), ``http://localhost:11434/v1`` (Ollama).
``api_key``
    Sent as ``Authorization: Bearer``; omitted when unset (local servers need none).
``model``
    Upstream model id used when the catalogue binding names no ``upstream_model``.
``headers``
    Extra headers for every API call (OpenRouter's ``HTTP-Referer``/``X-Title``).
``timeout``
    Seconds one HTTP call may take; for a stream, the longest silence between chunks (600).
``retries`` / ``retry_backoff``
    Retries of transient failures (2) and the exponential backoff factor (0.5 s).
``max_download_bytes``
    Largest image accepted when the server answers with a URL (64 MiB).
``max_connections``
    Upstream connections open (and kept alive) at once, one per request in flight (1000).
``tokenize_endpoint``
    URL (or path on the ``base_url`` host) of a ``/tokenize`` endpoint, see
    :meth:`OpenAICompatible.count_prompt_tokens`.
``max_tokens_param``
    Request field carrying the token limit: ``max_tokens`` (default) or
    ``max_completion_tokens`` (OpenAI reasoning models).
``image_response_format``
    ``b64_json``, ``url``, ``omit`` or ``auto`` (default: ``b64_json``, omitted for
    ``gpt-image-*`` models, which reject the field and always answer base64).
``default_voice``
    Voice for speech requests that name none (``alloy``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import random
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import aclosing, asynccontextmanager
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
import anyio
import orjson

from hypereal.backends._upstream import (
    allowed_networks_option,
    decode_data_uri,
    download_output,
    output_download_client,
    sniff_media_type,
    upstream_message,
)
from hypereal.backends.base import (
    BackendError,
    BackendUnavailable,
    ChatDelta,
    ChatMessage,
    ChatRequest,
    ImageRequest,
    JobRequest,
    JobResult,
    MediaBlob,
    ProgressCallback,
)
from hypereal.media.fetch import FetchRefused
from hypereal.media.guarded_session import LazySession, guarded_session, origin_of

logger = logging.getLogger(__name__)

PROVIDER = "OpenAI-compatible upstream"

# Model parameters the Images API knows; anything else (``seed`` ...) would be rejected with 400.
_IMAGE_PARAMS = ("n", "quality", "background", "style", "moderation", "output_compression")
_RESPONSE_FORMATS = ("auto", "b64_json", "url", "omit")
_SPEECH_FORMATS = ("mp3", "wav", "opus", "aac", "flac")

# Prompt estimate without a tokenizer: BPE vocabularies average ~4 characters per token on
# English, so 3 UTF-8 bytes per token over-counts ordinary text, and CJK (3 bytes a character,
# about a token each) is counted about right. Chat templates add a few tokens per message
# (role markers, separators) and a few to open the assistant's answer.
_BYTES_PER_TOKEN = 3
_TOKENS_PER_MESSAGE = 4
_TOKENS_PER_REPLY = 3


class OpenAICompatible:
    """Chat, image and speech backend for any server speaking the OpenAI REST API."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        base_url = option_str(options, "base_url", PROVIDER)
        if not base_url:
            raise BackendUnavailable(
                "The OpenAI-compatible backend needs `base_url`, the API root of the server "
                "(e.g. http://localhost:8000/v1 for vLLM, https://api.openai.com/v1)."
            )
        api_key = option_str(options, "api_key", PROVIDER)
        self._model = option_str(options, "model", PROVIDER)
        self._max_tokens_param = option_str(options, "max_tokens_param", PROVIDER) or "max_tokens"
        if self._max_tokens_param not in ("max_tokens", "max_completion_tokens"):
            raise BackendUnavailable(
                "`max_tokens_param` must be `max_tokens` or `max_completion_tokens`."
            )
        self._response_format = option_str(options, "image_response_format", PROVIDER) or "auto"
        if self._response_format not in _RESPONSE_FORMATS:
            raise BackendUnavailable(
                f"`image_response_format` must be one of {', '.join(_RESPONSE_FORMATS)}."
            )
        self._default_voice = option_str(options, "default_voice", PROVIDER) or "alloy"
        tokenize = option_str(options, "tokenize_endpoint", PROVIDER)
        # A path is resolved against the server's origin: vLLM and llama.cpp serve /tokenize
        # next to /v1, not under it.
        self._tokenize_url = urljoin(base_url, tokenize) if tokenize else None
        self._http = UpstreamHttp(
            PROVIDER,
            options,
            base_url=base_url,
            api_key=api_key,
            timeout=option_number(options, "timeout", 600.0, PROVIDER),
            trusted_urls=[self._tokenize_url] if self._tokenize_url else [],
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    def _model_id(self, upstream_model: str | None) -> str:
        model = upstream_model or self._model
        if not model:
            raise BackendError(
                "No upstream model id: set `upstream_model` on the catalogue binding or `model` "
                "in the OpenAI-compatible backend options."
            )
        return model

    # ------------------------------------------------------------------------ chat

    async def count_prompt_tokens(self, request: ChatRequest) -> int:
        """Prompt tokens, as exact as the server allows.

        The OpenAI API has no tokenize endpoint. When ``tokenize_endpoint`` is set, one request
        is sent that both known endpoints understand: vLLM's ``/tokenize`` renders ``messages``
        with the model's chat template and answers the exact ``count``; the llama.cpp server's
        ``/tokenize`` tokenizes ``content`` (the message texts) and its token count is used plus
        the per-message template allowance below. Without the endpoint, or when it fails
        (logged), the count is a conservative estimate: UTF-8 bytes / 3 per message (chars / 3
        for ASCII) + 4 tokens per message + 3 for the reply. The exact counts arrive with the
        stream's final usage chunk; this number is for checks before generating.
        """
        if self._tokenize_url is not None:
            try:
                return await self._tokenize(request)
            except BackendError as exc:
                logger.warning("Token counting via %s failed: %s", self._tokenize_url, exc.message)
        return estimate_prompt_tokens(request.messages)

    async def _tokenize(self, request: ChatRequest) -> int:
        assert self._tokenize_url is not None
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        body: dict[str, Any] = {
            "messages": messages,
            "add_generation_prompt": True,
            "content": "\n".join(m.content for m in request.messages),
            "add_special": True,
        }
        model = request.upstream_model or self._model
        if model:
            body["model"] = model
        answer = await self._http.post_json(self._tokenize_url, body)
        count = answer.get("count")
        if isinstance(count, int) and not isinstance(count, bool):
            return count
        tokens = answer.get("tokens")
        if isinstance(tokens, list):
            return len(tokens) + template_allowance(len(request.messages))
        raise BackendError("the tokenize endpoint answered neither `count` nor `tokens`")

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ChatDelta]:
        """Stream the answer: one delta per content chunk as it arrives, then a last delta with
        ``finish_reason`` and the usage counts. Closing this iterator closes the upstream
        connection, which makes vLLM, llama.cpp, Ollama and OpenAI stop generating.

        Raises BackendError for HTTP errors, an ``error`` object in the stream, malformed
        chunks, and a stream that ends before its finish chunk.
        """
        body: dict[str, Any] = {
            "model": self._model_id(request.upstream_model),
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "temperature": request.temperature,
            self._max_tokens_param: request.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with (
            self._http.stream("POST", "/chat/completions", json=body) as response,
            aclosing(chat_deltas(response, PROVIDER)) as deltas,
        ):
            async for delta in deltas:
                yield delta

    # ---------------------------------------------------------------------- images

    async def generate_images(self, request: ImageRequest) -> list[MediaBlob]:
        """Generate (``/images/generations``) or edit (``/images/edits``, when the request has
        source images) and return the images, decoded from base64 or downloaded from their URL.

        Raises BackendError for HTTP errors, an empty answer or bytes that are not an image.
        """
        model = self._model_id(request.upstream_model)
        fields = self._image_fields(request, model)
        if request.images:
            many = len(request.images) > 1
            files = [
                (
                    "image[]" if many else "image",
                    (f"image-{i}.{_suffix(blob)}", blob.data, blob.content_type),
                )
                for i, blob in enumerate(request.images)
            ]
            form = {key: str(value) for key, value in fields.items()}
            response = await self._http.request("POST", "/images/edits", form=form, files=files)
        else:
            response = await self._http.request("POST", "/images/generations", json=fields)
        items = _json_object(response, PROVIDER).get("data")
        if not isinstance(items, list) or not items:
            raise BackendError(f"The {PROVIDER} answered without images")
        return [await self._image_blob(item) for item in items]

    def _image_fields(self, request: ImageRequest, model: str) -> dict[str, Any]:
        fields: dict[str, Any] = {"model": model, "prompt": request.prompt}
        size = _image_size(request)
        if size:
            fields["size"] = size
        # png is every server's default; naming it would trip servers without the field.
        if request.output_format != "png":
            fields["output_format"] = request.output_format
        response_format = self._response_format
        if response_format == "auto":
            response_format = "omit" if model.startswith("gpt-image") else "b64_json"
        if response_format != "omit":
            fields["response_format"] = response_format
        fields.update({k: request.params[k] for k in _IMAGE_PARAMS if k in request.params})
        return fields

    async def _image_blob(self, item: object) -> MediaBlob:
        if isinstance(item, dict) and isinstance(item.get("b64_json"), str):
            try:
                data = base64.b64decode(item["b64_json"], validate=True)
            except (binascii.Error, ValueError) as exc:
                raise BackendError(f"The {PROVIDER} sent invalid base64 image data") from exc
            content_type = sniff_media_type(data)
        elif isinstance(item, dict) and isinstance(item.get("url"), str):
            blob = await self._http.download(item["url"])
            data, content_type = blob.data, blob.content_type
        else:
            raise BackendError(f"The {PROVIDER} sent an image entry without b64_json or url")
        if content_type is None or not content_type.startswith("image/"):
            raise BackendError(f"The {PROVIDER} sent an image in an unrecognised format")
        return MediaBlob(data=data, content_type=content_type)

    # ---------------------------------------------------------------------- speech

    async def generate_audio(self, request: JobRequest, progress: ProgressCallback) -> JobResult:
        """Text to speech through ``/audio/speech``: input ``text``, optional ``voice``,
        ``format`` (``wav`` | ``mp3``, default ``wav``) and ``speed``.

        Raises BackendError (client error) without text, or for HTTP errors and audio bytes
        in an unrecognised format.
        """
        text = request.input.get("text") or request.input.get("input")
        if not isinstance(text, str) or not text.strip():
            raise BackendError("Speech needs a non-empty `text`", client_error=True)
        audio_format = str(request.input.get("format") or "wav")
        if audio_format not in _SPEECH_FORMATS:
            raise BackendError(f"Unsupported audio format {audio_format!r}", client_error=True)
        body: dict[str, Any] = {
            "model": self._model_id(request.upstream_model),
            "input": text,
            "voice": request.input.get("voice") or self._default_voice,
            "response_format": audio_format,
        }
        if "speed" in request.input:
            body["speed"] = request.input["speed"]
        await progress(0.0, "Synthesising speech upstream")
        response = await self._http.request("POST", "/audio/speech", json=body)
        content_type = sniff_media_type(response.content)
        if content_type is None or not content_type.startswith("audio/"):
            raise BackendError(f"The {PROVIDER} sent audio in an unrecognised format")
        await progress(1.0, "Completed")
        return JobResult(output=MediaBlob(data=response.content, content_type=content_type))


# ------------------------------------------------------------------ stream parsing


async def sse_events(response: StreamedAnswer) -> AsyncGenerator[tuple[str | None, str]]:
    """``(event, data)`` of each server-sent event, per the WHATWG rules: lines end with LF,
    CRLF or CR; ``data`` lines of one event are joined with newlines; comment lines
    (``: keep-alive``) are skipped. Parsed a whole event block at a time as chunks arrive."""
    pending = b""
    async for chunk in response.chunks():
        pending += chunk
        if b"\r" in pending:
            # A CR at the very end may be the first half of a CRLF: keep it for the next chunk.
            held = pending.endswith(b"\r")
            body = pending[:-1] if held else pending
            pending = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + (b"\r" if held else b"")
        if b"\n\n" not in pending:
            continue
        *blocks, pending = pending.split(b"\n\n")
        for block in blocks:
            event = _sse_event(block)
            if event is not None:
                yield event
    if pending.strip(b"\r\n"):
        event = _sse_event(pending.replace(b"\r\n", b"\n").replace(b"\r", b"\n"))
        if event is not None:
            yield event


def _sse_event(block: bytes) -> tuple[str | None, str] | None:
    event: str | None = None
    data: list[str] = []
    for line in block.decode("utf-8", errors="replace").split("\n"):
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value.removeprefix(" "))
        elif name == "event":
            event = value.removeprefix(" ")
    return (event, "\n".join(data)) if data else None


async def chat_deltas(response: StreamedAnswer, provider: str) -> AsyncGenerator[ChatDelta]:
    """ChatDeltas from an OpenAI ``chat.completion.chunk`` SSE stream (see module docs); a
    server that ignored ``stream: true`` and answered one JSON completion is accepted too."""
    if response.headers.get("content-type", "").startswith("application/json"):
        whole_answer = await response.read()
        for whole in _completion_deltas(_json_object(whole_answer, provider), provider):
            yield whole
        return
    finish_reason: str | None = None
    usage: Mapping[str, Any] = {}
    done = False
    async with aclosing(sse_events(response)) as events:
        async for event, data in events:
            if data.strip() == "[DONE]":
                done = True
                break
            chunk = _chunk(data, provider)
            if event == "error" or chunk.get("error"):
                raise BackendError(f"The {provider} failed mid-stream: {_error_text(chunk)}")
            if isinstance(chunk.get("usage"), dict):
                usage = chunk["usage"]
            choices = chunk.get("choices") or []
            choice = choices[0] if isinstance(choices, list) and choices else {}
            delta = choice.get("delta") if isinstance(choice, dict) else None
            text = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(text, str) and text:
                yield ChatDelta(text=text)
            if isinstance(choice, dict) and choice.get("finish_reason"):
                finish_reason = str(choice["finish_reason"])
                if finish_reason == "error":  # OpenRouter's mark of a failed generation
                    raise BackendError(f"The {provider} failed mid-stream: {_error_text(chunk)}")
        if done:
            # Read the body to its end (the chunked terminator follows [DONE]): a connection
            # whose body was left unread is closed instead of kept for the next call.
            with anyio.move_on_after(_DRAIN_SECONDS):
                async for _ in events:
                    pass
    if not done and finish_reason is None:
        raise BackendError(f"The {provider} closed the stream before the answer was complete")
    yield _final_delta(finish_reason, usage)


# How long the rest of a finished stream may take to arrive before the connection is dropped.
_DRAIN_SECONDS = 1.0


def _completion_deltas(body: Mapping[str, Any], provider: str) -> list[ChatDelta]:
    choices = body.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or not isinstance(message, dict):
        raise BackendError(f"The {provider} answered without a message")
    text = message.get("content")
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    deltas = [ChatDelta(text=text)] if isinstance(text, str) and text else []
    return [*deltas, _final_delta(choice.get("finish_reason"), usage or {})]


def _final_delta(finish_reason: object, usage: Mapping[str, Any]) -> ChatDelta:
    return ChatDelta(
        finish_reason=str(finish_reason) if finish_reason else "stop",
        prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")),
    )


def _chunk(data: str, provider: str) -> dict[str, Any]:
    try:
        chunk = orjson.loads(data)
    except ValueError as exc:
        raise BackendError(f"The {provider} sent a malformed stream chunk") from exc
    if not isinstance(chunk, dict):
        raise BackendError(f"The {provider} sent a malformed stream chunk")
    return chunk


def _error_text(chunk: Mapping[str, Any]) -> str:
    error = chunk.get("error")
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(error, str) and error:
        return error
    return "unknown error"


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _json_object(response: UpstreamAnswer, provider: str) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError as exc:
        raise BackendError(f"The {provider} answered with invalid JSON") from exc
    if not isinstance(body, dict):
        raise BackendError(f"The {provider} answered with unexpected JSON")
    return body


# ---------------------------------------------------------------------- estimates


def estimate_prompt_tokens(messages: Sequence[ChatMessage]) -> int:
    """Conservative prompt size without a tokenizer: UTF-8 bytes / 3 per message, rounded up,
    plus the chat template allowance (4 per message, 3 for the reply)."""
    text = sum(math.ceil(len(m.content.encode()) / _BYTES_PER_TOKEN) for m in messages)
    return text + template_allowance(len(messages))


def template_allowance(message_count: int) -> int:
    """Tokens a chat template adds around ``message_count`` messages (an upper estimate)."""
    return _TOKENS_PER_MESSAGE * message_count + _TOKENS_PER_REPLY


def _image_size(request: ImageRequest) -> str | None:
    if request.width and request.height:
        return f"{request.width}x{request.height}"
    if request.aspect_ratio:
        # The sizes GPT image models accept; other servers take any WIDTHxHEIGHT.
        width, _, height = request.aspect_ratio.partition(":")
        try:
            ratio = float(width) / float(height)
        except (ValueError, ZeroDivisionError):
            return None
        if ratio > 1.1:
            return "1536x1024"
        if ratio < 0.9:
            return "1024x1536"
        return "1024x1024"
    return None


def _suffix(blob: MediaBlob) -> str:
    return blob.content_type.rsplit("/", 1)[-1].replace("jpeg", "jpg")


# -------------------------------------------------------------------- HTTP plumbing

# Failures caused by the request itself; other 4xx (credentials, credits, unknown model id, rate
# limits) are the operator's to fix, so the API reports them as server-side failures.
_CLIENT_ERROR_CODES = frozenset({400, 409, 413, 415, 422})
_CREDENTIAL_CODES = frozenset({401, 403})
# Answers worth another try: an idempotent call retries all of them, a POST (it may start a
# billed generation) only 429, a refusal before any work was done.
_TRANSIENT_CODES = frozenset({429, 502, 503, 504})
_POST_RETRY_CODES = frozenset({429})
# Exceptions proving a POST never reached the server, so retrying it cannot run it twice.
_UNSENT_ERRORS: tuple[type[Exception], ...] = (
    aiohttp.ClientConnectorError,
    aiohttp.ConnectionTimeoutError,
)
# Failures of an idempotent call worth another try: timeouts, network and protocol errors.
_TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
)
# Longest single wait between retries, even when a Retry-After header asks for more.
_MAX_RETRY_WAIT = 30.0


class UpstreamAnswer:
    """A whole upstream answer: status, headers and body bytes."""

    __slots__ = ("content", "headers", "reason_phrase", "status_code")

    def __init__(
        self, status_code: int, headers: Mapping[str, str], content: bytes, reason: str
    ) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content
        self.reason_phrase = reason

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    def json(self) -> Any:
        """The body decoded as JSON. Raises ValueError."""
        return orjson.loads(self.content)

    @property
    def text(self) -> str:
        """The body as text (its declared charset, else UTF-8)."""
        charset = "utf-8"
        for param in self.headers.get("content-type", "").split(";")[1:]:
            name, _, value = param.strip().partition("=")
            if name.lower() == "charset" and value:
                charset = value.strip('"')
        try:
            return self.content.decode(charset, errors="replace")
        except LookupError:
            return self.content.decode("utf-8", errors="replace")


class StreamedAnswer:
    """A 2xx upstream answer whose body is read as it arrives."""

    __slots__ = ("_response",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    @property
    def headers(self) -> Mapping[str, str]:
        return self._response.headers

    async def read(self) -> UpstreamAnswer:
        """The rest of the body, whole."""
        response = self._response
        content = await response.read()
        return UpstreamAnswer(response.status, response.headers, content, response.reason or "")

    async def chunks(self) -> AsyncGenerator[bytes]:
        """The body's bytes as they arrive."""
        async for chunk in self._response.content.iter_any():
            yield chunk


class UpstreamHttp:
    """One upstream's HTTP client: one long-lived pooled aiohttp session (made on first use
    on the running event loop, closed by :meth:`aclose`) for the API calls, credentials and
    extra headers sent with them only (never with output downloads), transient failures
    retried with exponential backoff, every failure surfacing as a :class:`BackendError`.

    The SSRF guard (:mod:`hypereal.media.guarded_session`) holds on every connection of the
    session, redirects included: the ``base_url`` origin (and ``trusted_urls``' origins, URLs
    the operator named) is trusted, other hosts must be public or in the option
    ``allowed_private_networks``. Output files are downloaded through the guard of
    :mod:`hypereal.backends._upstream` with the same rules.

    Reads the options ``headers``, ``retries`` (2), ``retry_backoff`` (0.5),
    ``max_download_bytes`` (64 MiB), ``max_connections`` (1000) and
    ``allowed_private_networks``; ``timeout`` is the limit of one HTTP call in seconds (for a
    streamed answer, of the silence between two reads; and of one whole download).
    """

    def __init__(
        self,
        provider: str,
        options: Mapping[str, Any],
        *,
        base_url: str,
        api_key: str | None,
        timeout: float,
        trusted_urls: Sequence[str] = (),
    ) -> None:
        self.provider = provider
        self.base_url = base_url.rstrip("/") + "/"
        self.timeout = timeout
        self._headers = option_headers(options, provider)
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._json_headers = {**self._headers, "Content-Type": "application/json"}
        self._retries = int(option_number(options, "retries", 2, provider, allow_zero=True))
        self._backoff = option_number(options, "retry_backoff", 0.5, provider, allow_zero=True)
        self._max_download = int(option_number(options, "max_download_bytes", 64 << 20, provider))
        allowed = allowed_networks_option(options, provider)
        self._downloads = output_download_client(
            base_url,
            allowed,
            retries=self._retries,
            retry_backoff=self._backoff,
            request_timeout=timeout,
        )
        # A gateway holds one upstream connection per request in flight: keep as many alive
        # as it opens.
        connections = int(option_number(options, "max_connections", 1000, provider))
        trusted = [origin_of(url) for url in (base_url, *trusted_urls)]
        # ``connect`` covers the wait for a free connection too; ``sock_read`` is the longest
        # silence while an answer arrives.
        limits = aiohttp.ClientTimeout(
            total=None, connect=timeout, sock_connect=min(timeout, 10.0), sock_read=timeout
        )
        self._session = LazySession(
            lambda: guarded_session(allowed, trusted, timeout=limits, limit=connections)
        )

    def url(self, path: str) -> str:
        """``path`` under the base URL; an absolute URL is kept as it is."""
        return path if "://" in path else self.base_url + path.lstrip("/")

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        form: Mapping[str, str] | None = None,
        files: Sequence[tuple[str, tuple[str, bytes, str]]] = (),
    ) -> UpstreamAnswer:
        """Send an API call (a ``json`` body, or ``form`` fields with ``files`` as multipart
        ``(field, (filename, bytes, content type))``; query ``params``) and return the 2xx
        answer, body read. Raises BackendError for any failure."""
        url = self.url(path)
        try:
            response = await self._send(
                method, url, json=json, params=params, form=form, files=files
            )
            async with response:
                content = await response.read()
        except (aiohttp.ClientError, FetchRefused) as exc:
            raise self._transport_error(exc, url) from exc
        answer = UpstreamAnswer(response.status, response.headers, content, response.reason or "")
        if not answer.is_success:
            raise self.error_for(answer)
        return answer

    async def post_json(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST ``body`` as JSON; the answer's JSON object. Raises BackendError."""
        return _json_object(await self.request("POST", path, json=body), self.provider)

    async def get_json(self, path: str, params: Mapping[str, str]) -> dict[str, Any]:
        """GET with query ``params``; the answer's JSON object. Raises BackendError."""
        return _json_object(await self.request("GET", path, params=params), self.provider)

    @asynccontextmanager
    async def stream(
        self, method: str, path: str, *, json: Mapping[str, Any] | None = None
    ) -> AsyncIterator[StreamedAnswer]:
        """An API call whose 2xx answer is read as it arrives; leaving the block closes the
        connection unless the whole body was read (then it goes back to the pool), which
        tells the server to stop. Raises BackendError for any failure, including one while
        the body is being read."""
        url = self.url(path)
        try:
            response = await self._send(method, url, json=json)
        except (aiohttp.ClientError, FetchRefused) as exc:
            raise self._transport_error(exc, url) from exc
        try:
            answer = StreamedAnswer(response)
            if not 200 <= response.status < 300:
                raise self.error_for(await answer.read())
            yield answer
        except aiohttp.ClientError as exc:
            raise self._transport_error(exc, url) from exc
        finally:
            if response.content.at_eof():
                response.release()
            else:
                response.close()

    async def _send(
        self,
        method: str,
        url: str,
        *,
        json: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        form: Mapping[str, str] | None = None,
        files: Sequence[tuple[str, tuple[str, bytes, str]]] = (),
    ) -> aiohttp.ClientResponse:
        """The first answer not to be retried, its body unread. A POST is retried only on
        429 or when its connection never opened; other methods on 429/502/503/504, timeouts
        and network errors; at most ``retries`` times, waiting ``Retry-After`` or an
        exponential backoff with full jitter (both capped at 30 s)."""
        post = method.upper() == "POST"
        statuses = _POST_RETRY_CODES if post else _TRANSIENT_CODES
        errors = _UNSENT_ERRORS if post else _TRANSIENT_ERRORS
        headers = self._json_headers if json is not None else self._headers
        payload = orjson.dumps(json) if json is not None else None
        session = self._session.get()
        attempt = 0
        while True:
            data: Any = payload
            if form is not None or files:
                data = aiohttp.FormData(dict(form or {}))  # a FormData is sent once
                for field, (filename, content, content_type) in files:
                    data.add_field(field, content, filename=filename, content_type=content_type)
            try:
                response = await session.request(
                    method, url, headers=headers, data=data, params=params
                )
            except errors:
                if attempt >= self._retries:
                    raise
                attempt += 1
                await asyncio.sleep(_retry_wait(attempt, self._backoff, None))
                continue
            if response.status not in statuses or attempt >= self._retries:
                return response
            retry_after = response.headers.get("Retry-After")
            async with response:
                await response.read()  # read to the end: the connection stays in the pool
            attempt += 1
            await asyncio.sleep(_retry_wait(attempt, self._backoff, retry_after))

    async def download(self, url: str) -> MediaBlob:
        """An output file (``http(s)`` or ``data:`` URL), fetched without our credentials; its
        type is sniffed from the bytes, else taken from a specific Content-Type. Raises
        BackendError when it cannot be fetched, is too large or of unknown type."""
        if url.startswith("data:"):
            data, declared = decode_data_uri(url)
        else:
            data, declared = await self._fetch(url)
        content_type = sniff_media_type(data) or _specific(declared)
        if content_type is None:
            raise BackendError(f"The {self.provider} returned an output file of unknown type")
        return MediaBlob(data=data, content_type=content_type)

    async def _fetch(self, url: str) -> tuple[bytes, str | None]:
        return await download_output(
            self._downloads, self.provider, url, max_bytes=self._max_download, timeout=self.timeout
        )

    def error_for(self, response: UpstreamAnswer) -> BackendError:
        """The BackendError for a non-2xx answer, carrying the upstream's own message."""
        status = response.status_code
        message = upstream_message(response)
        if status in _CREDENTIAL_CODES:
            return BackendError(
                f"The {self.provider} rejected the configured credentials (HTTP {status}): "
                f"{message}. Check the backend's `api_key`."
            )
        if status == 402:
            return BackendError(
                f"The {self.provider} account is out of credits (HTTP 402): "
                f"{message}{_credit_detail(response)}"
            )
        if status in _CLIENT_ERROR_CODES:
            return BackendError(message, client_error=True)
        if status == 404:
            return BackendError(
                f"The {self.provider} does not know this model or endpoint (HTTP 404): {message}"
            )
        if status == 429:
            return BackendError(f"The {self.provider} is rate limiting us (HTTP 429): {message}")
        if status >= 500:
            return BackendError(f"The {self.provider} failed (HTTP {status}): {message}")
        return BackendError(f"The {self.provider} refused the request (HTTP {status}): {message}")

    def _transport_error(self, exc: Exception, url: str) -> BackendError:
        # The URL goes to the log only: error messages may reach API callers.
        parts = urlsplit(url)
        logger.warning("%s: %s %s failed: %r", self.provider, parts.hostname, parts.path, exc)
        if isinstance(exc, FetchRefused):
            return BackendError(
                f"Could not reach the {self.provider}: it sent us to an address that is not "
                "public (see the backend option `allowed_private_networks`)"
            )
        if isinstance(exc, aiohttp.ServerTimeoutError):
            return BackendError(f"The {self.provider} did not answer within {self.timeout:g} s")
        return BackendError(f"Could not reach the {self.provider}: {exc or type(exc).__name__}")

    async def aclose(self) -> None:
        """Close the connection pools."""
        await self._session.aclose()
        await self._downloads.aclose()


def _retry_wait(attempt: int, backoff: float, retry_after: str | None) -> float:
    """Seconds before retry ``attempt`` (1, 2, ...): the server's ``Retry-After`` (seconds or
    an HTTP date) when it names a positive wait, else ``backoff * 2**attempt`` with full
    jitter; at most 30 s."""
    if retry_after:
        wait = _retry_after_seconds(retry_after.strip())
        if wait is not None and wait > 0:
            return min(wait, _MAX_RETRY_WAIT)
    if not backoff:
        return 0.0
    return min(backoff * 2.0**attempt * random.uniform(0.0, 1.0), _MAX_RETRY_WAIT)


def _retry_after_seconds(value: str) -> float | None:
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - datetime.now(UTC)).total_seconds()


def _credit_detail(response: UpstreamAnswer) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    if isinstance(body, dict) and "required" in body and "available" in body:
        return f" (required {body['required']}, available {body['available']})"
    return ""


def _specific(content_type: str | None) -> str | None:
    value = (content_type or "").split(";", 1)[0].strip().lower()
    return value if value and not value.endswith("octet-stream") else None


# ------------------------------------------------------------------------- options


def option_str(options: Mapping[str, Any], name: str, provider: str) -> str | None:
    """A string option, stripped; ``None`` when unset or empty. Raises BackendUnavailable
    for another type."""
    value = options.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BackendUnavailable(f"The {provider} option `{name}` must be a string.")
    return value.strip() or None


def option_number(
    options: Mapping[str, Any],
    name: str,
    default: float,
    provider: str,
    *,
    allow_zero: bool = False,
) -> float:
    """A positive number option (zero too with ``allow_zero``). Raises BackendUnavailable."""
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BackendUnavailable(f"The {provider} option `{name}` must be a number.")
    if value < 0 or (value == 0 and not allow_zero):
        raise BackendUnavailable(f"The {provider} option `{name}` must be positive.")
    return float(value)


def option_headers(options: Mapping[str, Any], provider: str) -> dict[str, str]:
    """The ``headers`` option: extra request headers, names and values strings."""
    headers = options.get("headers") or {}
    if not isinstance(headers, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise BackendUnavailable(f"The {provider} option `headers` must map names to strings.")
    return dict(headers)
