"""OpenAI-compatible servers: streamed chat, images and text to speech.

Speaks the OpenAI REST protocol as vLLM, the llama.cpp server, Ollama, OpenRouter and OpenAI
serve it, with ``base_url`` ending in the API root (``.../v1``):

- ``POST /chat/completions`` with ``stream: true`` and ``stream_options.include_usage``: an SSE
  stream of ``chat.completion.chunk`` objects (``choices[i].delta.content`` and
  ``delta.tool_calls`` pieces, ``finish_reason``), a last chunk with empty ``choices`` and
  ``usage``, then ``data: [DONE]``. A failure after the stream started arrives as a chunk with
  an ``error`` object. The client's ``stop``, ``seed``, ``response_format``, ``tools``,
  ``tool_choice`` and ``n`` are passed on as given; messages carry ``tool_calls`` and
  ``tool`` answers in OpenAI's shape.
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
``allowed_private_networks``
    Non-public networks (CIDRs) redirects and image URLs may reach; the ``base_url`` and
    ``tokenize_endpoint`` origins always may. The client, its retries, error mapping and
    guard are shared with every upstream backend (``backends/upstream/http.py``).
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
import logging
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from dataclasses import replace
from typing import Any
from urllib.parse import urljoin

from hypereal.backends.base import (
    BackendError,
    BackendUnavailable,
    ChatDelta,
    ChatRequest,
    ImageRequest,
    JobRequest,
    JobResult,
    MediaBlob,
    ProgressCallback,
)
from hypereal.backends.upstream.chat import chat_deltas, estimate_prompt_tokens, openai_message
from hypereal.backends.upstream.http import UpstreamHttp, json_object
from hypereal.backends.upstream.media import sniff_media_type
from hypereal.backends.upstream.options import HttpOptions, option_str

logger = logging.getLogger(__name__)

PROVIDER = "the OpenAI-compatible upstream"
BACKEND = "OpenAI-compatible"
SUBJECT = "The OpenAI-compatible upstream"

# Model parameters the Images API knows; anything else (``seed`` ...) would be rejected with 400.
_IMAGE_PARAMS = ("n", "quality", "background", "style", "moderation", "output_compression")
_RESPONSE_FORMATS = ("auto", "b64_json", "url", "omit")
_SPEECH_FORMATS = ("mp3", "wav", "opus", "aac", "flac")


class OpenAICompatible:
    """Chat, image and speech backend for any server speaking the OpenAI REST API."""

    # A non-streamed client request is answered from one non-streamed upstream completion.
    answers_whole = True
    # OpenAI fields a client may set that are passed on as they are (ChatRequest.options).
    chat_options = frozenset({"stop", "seed", "response_format", "tools", "tool_choice", "n"})

    def __init__(self, options: Mapping[str, Any]) -> None:
        base_url = option_str(options, "base_url", BACKEND)
        if not base_url:
            raise BackendUnavailable(
                "The OpenAI-compatible backend needs `base_url`, the API root of the server "
                "(e.g. http://localhost:8000/v1 for vLLM, https://api.openai.com/v1)."
            )
        self._model = option_str(options, "model", BACKEND)
        self._max_tokens_param = option_str(options, "max_tokens_param", BACKEND) or "max_tokens"
        if self._max_tokens_param not in ("max_tokens", "max_completion_tokens"):
            raise BackendUnavailable(
                "`max_tokens_param` must be `max_tokens` or `max_completion_tokens`."
            )
        self._response_format = option_str(options, "image_response_format", BACKEND) or "auto"
        if self._response_format not in _RESPONSE_FORMATS:
            raise BackendUnavailable(
                f"`image_response_format` must be one of {', '.join(_RESPONSE_FORMATS)}."
            )
        self._default_voice = option_str(options, "default_voice", BACKEND) or "alloy"
        tokenize = option_str(options, "tokenize_endpoint", BACKEND)
        # A path is resolved against the server's origin: vLLM and llama.cpp serve /tokenize
        # next to /v1, not under it.
        self._tokenize_url = urljoin(base_url, tokenize) if tokenize else None
        http = HttpOptions.parse(
            options,
            backend=BACKEND,
            default_base_url=base_url,
            api_key_hint=None,
            timeout_option="timeout",
            timeout=600.0,
        )
        self._http = UpstreamHttp(
            PROVIDER,
            http,
            auth=f"Bearer {http.api_key}" if http.api_key else None,
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
        return estimate_prompt_tokens(request.messages, _tools(request))

    async def _tokenize(self, request: ChatRequest) -> int:
        assert self._tokenize_url is not None
        body: dict[str, Any] = {
            "messages": [openai_message(m) for m in request.messages],
            "add_generation_prompt": True,
            "content": "\n".join(m.content for m in request.messages),
            "add_special": True,
        }
        tools = _tools(request)
        if tools:
            body["tools"] = tools
        model = request.upstream_model or self._model
        if model:
            body["model"] = model
        answer = await self._http.request_json("POST", self._tokenize_url, json=body)
        count = answer.get("count")
        if isinstance(count, int) and not isinstance(count, bool):
            return count
        tokens = answer.get("tokens")
        if isinstance(tokens, list):
            # llama.cpp's count is of the texts alone: the calls and tools are estimated.
            beyond_text = estimate_prompt_tokens(
                [replace(m, content="") for m in request.messages], tools
            )
            return len(tokens) + beyond_text
        raise BackendError("the tokenize endpoint answered neither `count` nor `tokens`")

    async def stream(self, request: ChatRequest) -> AsyncGenerator[ChatDelta]:
        """Stream the answer: one delta per content chunk as it arrives, then a last delta with
        ``finish_reason`` and the usage counts. Closing this iterator closes the upstream
        connection, which makes vLLM, llama.cpp, Ollama and OpenAI stop generating.

        For ``request.whole`` (the client wants the answer in one piece) the upstream is asked
        for a non-streamed completion: one JSON body instead of a chunk per token, so the
        whole answer costs one read and one parse (see ``answers_whole``).

        Raises BackendError for HTTP errors, an ``error`` object in the stream, malformed
        chunks, and a stream that ends before its finish chunk.
        """
        body: dict[str, Any] = {
            "model": self._model_id(request.upstream_model),
            "messages": [openai_message(m) for m in request.messages],
            "temperature": request.temperature,
            self._max_tokens_param: request.max_tokens,
        }
        if request.options:
            body.update(request.options)
        if not request.whole:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
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
        items = json_object(response, PROVIDER).get("data")
        if not isinstance(items, list) or not items:
            raise BackendError(f"{SUBJECT} answered without images")
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
                raise BackendError(f"{SUBJECT} sent invalid base64 image data") from exc
            content_type = sniff_media_type(data)
        elif isinstance(item, dict) and isinstance(item.get("url"), str):
            blob = await self._http.download(item["url"])
            data, content_type = blob.data, blob.content_type
        else:
            raise BackendError(f"{SUBJECT} sent an image entry without b64_json or url")
        if content_type is None or not content_type.startswith("image/"):
            raise BackendError(f"{SUBJECT} sent an image in an unrecognised format")
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
            raise BackendError(f"{SUBJECT} sent audio in an unrecognised format")
        await progress(1.0, "Completed")
        return JobResult(output=MediaBlob(data=response.content, content_type=content_type))


# ------------------------------------------------------------------------ helpers


def _tools(request: ChatRequest) -> list[dict[str, Any]]:
    """The function definitions the client gave (``tools``), if any."""
    return list((request.options or {}).get("tools") or ())


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
