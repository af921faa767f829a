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

import base64
import binascii
import json
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import aclosing, asynccontextmanager
from typing import Any
from urllib.parse import urljoin

import anyio
import httpx
from httpx_retries import Retry, RetryTransport

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
            response = await self._http.request("POST", "/images/edits", data=form, files=files)
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


async def sse_events(response: httpx.Response) -> AsyncGenerator[tuple[str | None, str]]:
    """``(event, data)`` of each server-sent event, per the WHATWG rules: ``data`` lines of
    one event are joined with newlines, comment lines (``: keep-alive``) are skipped."""
    event: str | None = None
    data: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = None, []
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
    if data:
        yield event, "\n".join(data)


async def chat_deltas(response: httpx.Response, provider: str) -> AsyncGenerator[ChatDelta]:
    """ChatDeltas from an OpenAI ``chat.completion.chunk`` SSE stream (see module docs); a
    server that ignored ``stream: true`` and answered one JSON completion is accepted too."""
    if response.headers.get("content-type", "").startswith("application/json"):
        await response.aread()
        for whole in _completion_deltas(_json_object(response, provider), provider):
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
            # Read the body to its end (the chunked terminator follows [DONE]): a body left
            # unread makes httpx close the connection instead of keeping it for the next call.
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
        chunk = json.loads(data)
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


def _json_object(response: httpx.Response, provider: str) -> dict[str, Any]:
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
_TRANSIENT_CODES = (429, 502, 503, 504)
# Exceptions proving a POST never reached the server, so retrying it cannot run it twice.
_UNSENT_ERRORS: tuple[type[Exception], ...] = (httpx.ConnectError, httpx.ConnectTimeout)


class UpstreamHttp:
    """One upstream's HTTP client: credentials and extra headers go with API calls only (never
    with output downloads), transient failures are retried by ``httpx-retries``, and every
    failure surfaces as a :class:`BackendError`. Output files are downloaded through the SSRF
    guard as in :mod:`hypereal.backends._upstream`: the ``base_url`` origin is trusted, other
    hosts must be public or in the option ``allowed_private_networks``.

    Reads the options ``headers``, ``retries`` (2), ``retry_backoff`` (0.5),
    ``max_download_bytes`` (64 MiB) and ``allowed_private_networks``; ``timeout`` is the limit
    of one HTTP call in seconds (and of one whole download).
    """

    def __init__(
        self,
        provider: str,
        options: Mapping[str, Any],
        *,
        base_url: str,
        api_key: str | None,
        timeout: float,
    ) -> None:
        self.provider = provider
        self.base_url = base_url.rstrip("/") + "/"
        self.timeout = timeout
        self._headers = option_headers(options, provider)
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        retries = int(option_number(options, "retries", 2, provider, allow_zero=True))
        backoff = option_number(options, "retry_backoff", 0.5, provider, allow_zero=True)
        self._max_download = int(option_number(options, "max_download_bytes", 64 << 20, provider))
        self._downloads = output_download_client(
            base_url,
            allowed_networks_option(options, provider),
            retries=retries,
            retry_backoff=backoff,
            request_timeout=timeout,
        )
        # POSTs start billed generations: retried only when refused before any work (429) or
        # when the connection never opened. Idempotent calls (polls, downloads) retry more.
        self._post_retry = Retry(
            total=retries,
            allowed_methods=["POST"],
            status_forcelist=[429],
            retry_on_exceptions=_UNSENT_ERRORS,
            backoff_factor=backoff,
            max_backoff_wait=30.0,
        )
        retry = Retry(
            total=retries,
            status_forcelist=_TRANSIENT_CODES,
            backoff_factor=backoff,
            max_backoff_wait=30.0,
        )
        # A gateway holds one upstream connection per request in flight: keep as many alive as
        # it opens (httpx keeps 20, so past 20 concurrent requests every call reconnected).
        connections = int(option_number(options, "max_connections", 1000, provider))
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self._client = httpx.AsyncClient(
            transport=RetryTransport(
                transport=httpx.AsyncHTTPTransport(limits=limits), retry=retry
            ),
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            follow_redirects=True,
        )

    def url(self, path: str) -> str:
        """``path`` under the base URL; an absolute URL is kept as it is."""
        return path if "://" in path else self.base_url + path.lstrip("/")

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send an API call (``json=``, ``data=``/``files=``, ``params=``) and return the 2xx
        response, body read. Raises BackendError for any failure."""
        request = self._build(method, path, **kwargs)
        try:
            response = await self._client.send(request)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, request.url) from exc
        if not response.is_success:
            raise self.error_for(response)
        return response

    async def post_json(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """POST ``body`` as JSON; the answer's JSON object. Raises BackendError."""
        return _json_object(await self.request("POST", path, json=body), self.provider)

    async def get_json(self, path: str, params: Mapping[str, str]) -> dict[str, Any]:
        """GET with query ``params``; the answer's JSON object. Raises BackendError."""
        return _json_object(await self.request("GET", path, params=params), self.provider)

    @asynccontextmanager
    async def stream(self, method: str, path: str, **kwargs: Any) -> AsyncIterator[httpx.Response]:
        """An API call whose 2xx response body is read as it arrives; leaving the block closes
        the connection, which tells the server to stop. Raises BackendError for any failure,
        including one while the body is being read."""
        request = self._build(method, path, **kwargs)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, request.url) from exc
        try:
            if not response.is_success:
                await response.aread()
                raise self.error_for(response)
            yield response
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, request.url) from exc
        finally:
            await response.aclose()

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

    def error_for(self, response: httpx.Response) -> BackendError:
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

    def _build(self, method: str, path: str, **kwargs: Any) -> httpx.Request:
        extensions = {"retry": self._post_retry} if method.upper() == "POST" else None
        return self._client.build_request(
            method, self.url(path), headers=self._headers, extensions=extensions, **kwargs
        )

    def _transport_error(self, exc: httpx.HTTPError, url: httpx.URL) -> BackendError:
        # The URL goes to the log only: error messages may reach API callers.
        logger.warning("%s: %s %s failed: %r", self.provider, url.host, url.path, exc)
        if isinstance(exc, httpx.TimeoutException):
            return BackendError(f"The {self.provider} did not answer within {self.timeout:g} s")
        return BackendError(f"Could not reach the {self.provider}: {exc or type(exc).__name__}")

    async def aclose(self) -> None:
        """Close the connection pools."""
        await self._client.aclose()
        await self._downloads.aclose()


def _credit_detail(response: httpx.Response) -> str:
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
