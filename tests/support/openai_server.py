"""A fake OpenAI-compatible server: a real FastAPI app speaking the OpenAI REST protocol.

Endpoints (under ``/v1``, so the client's base URL is ``{url}/v1``; all but ``/files`` and
``/tokenize`` want ``Authorization: Bearer <api_key>`` when ``api_key`` is set):

- ``POST /v1/chat/completions``: with ``stream: true`` an SSE stream of ``chat.completion.chunk``
  objects (a role chunk, one chunk per token, a ``finish_reason`` chunk, with
  ``stream_options.include_usage`` a usage chunk with empty ``choices``, then ``[DONE]``);
  without it one ``chat.completion`` object. ``max_tokens`` (or ``max_completion_tokens``)
  truncates the answer with ``finish_reason: "length"``. With ``n`` it answers that many
  choices (choice ``i`` adds ``i`` tokens " again"; streamed, their chunks interleave). With
  ``tools`` (and a ``tool_choice`` other than ``none``), unless the last message is a ``tool``
  answer, each choice calls a tool instead (the one ``tool_choice`` names, else the first)
  with ``tool_arguments``: streamed as OpenAI does, a piece with the id and name, then the
  arguments in fragments of 4 characters, ``finish_reason: "tool_calls"``.
- ``POST /v1/images/generations`` (JSON) and ``POST /v1/images/edits`` (multipart ``image`` or
  ``image[]`` files): ``{"created", "data": [{"b64_json"} | {"url"}]}``; ``response_format``
  picks, absent means ``b64_json`` (as GPT image models answer). Images are real PNG/JPEG/WEBP.
- ``POST /v1/audio/speech``: real WAV bytes (stdlib ``wave``), or an MP3 frame for ``mp3``.
- ``POST /tokenize``: vLLM's (``{count, max_model_len, tokens}``) or, with
  ``tokenize_style="llama_cpp"``, llama.cpp's (``{tokens}`` of ``content``) tokenizer endpoint.
- ``GET /files/{name}``: the images answered by URL.

Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``. Usage::

    fake = OpenAIFake(tokens=["Hel", "lo"], token_delay=0.01)
    fake.failure = "server_error"      # or unauthorized, bad_request, rate_limited, slow,
    fake.failure_times = 1             # error_mid_stream, cut_mid_stream; next request only
    with serve_app(fake.app) as url:
        backend = OpenAICompatible({"base_url": url + "/v1", "api_key": fake.api_key})
    assert fake.tokens_sent == 2       # token chunks the server actually wrote

Tokens are counted as one per whitespace-separated word of the message contents (prompt) and
one per streamed token or tool-call piece (completion, all choices together), so tests can
predict usage.
"""

from __future__ import annotations

import asyncio
import base64
import email.parser
import email.policy
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from tests.support.sample_media import MIME_BY_KIND, MediaStore, image_bytes, wav_bytes

Failure = Literal[
    "unauthorized",
    "bad_request",
    "server_error",
    "rate_limited",
    "slow",
    "error_mid_stream",
    "cut_mid_stream",
]

# Status, type, code and message of each failure, as OpenAI words them.
_FAILURES: dict[str, tuple[int, str, str | None, str]] = {
    "unauthorized": (
        401,
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect API key provided. You can find your API key in your account settings.",
    ),
    "bad_request": (
        400,
        "invalid_request_error",
        "context_length_exceeded",
        "This model's maximum context length is 4096 tokens. However, your messages resulted "
        "in 5000 tokens. Please reduce the length of the messages.",
    ),
    "server_error": (
        500,
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    "rate_limited": (
        429,
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for requests. Please try again in 1ms.",
    ),
}
DEFAULT_TOKENS = ("Hello", ",", " world", "!")
# A tool definition for tests of tool calls (the fake calls whichever tool it is given).
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
# One MPEG-1 Layer III frame header (128 kbit/s, 44.1 kHz) padded to its 417-byte length.
MP3_FRAME = b"\xff\xfb\x90\x64" + b"\x00" * 413


@dataclass(frozen=True)
class RecordedRequest:
    """One API request as the fake received it (``form`` and ``files`` for multipart)."""

    path: str
    authorization: str | None
    headers: dict[str, str]
    body: dict[str, Any]
    files: list[tuple[str, str, bytes]] = field(default_factory=list)  # (field, type, bytes)
    client: tuple[str, int] | None = None  # the peer address: one per TCP connection


def openai_error(status: int, message: str, type_: str, code: str | None = None) -> JSONResponse:
    """An error answer in OpenAI's body format."""
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    headers = {"Retry-After": "0"} if status == 429 else None
    return JSONResponse(body, status_code=status, headers=headers)


@dataclass
class StreamStats:
    """What the chat streams of one fake did; written by the server thread."""

    tokens_sent: int = 0  # token chunks handed to the socket
    started: int = 0
    completed: int = 0  # streams that reached ``[DONE]``
    aborted: int = 0  # streams stopped early because the client went away

    async def wait_for_abort(self, count: int = 1, timeout: float = 5.0) -> None:
        """Wait until ``count`` streams were stopped by their client going away (the server
        notices a disconnect asynchronously). Raises AssertionError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while self.aborted < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.aborted} streams aborted, expected {count}")
            await asyncio.sleep(0.01)


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """The fakes' prompt token count: whitespace-separated words of every content."""
    return sum(len(str(m.get("content") or "").split()) for m in messages)


# One streamed piece of an answer: a token, or a delta object (tool-call pieces).
Piece = str | dict[str, Any]


async def chat_chunks(
    stats: StreamStats,
    *,
    model: str,
    answer: list[str],
    finish: str,
    usage_chunk: dict[str, int] | None = None,
    token_delay: float = 0.0,
    error_after: int | None = None,
    cut_after: int | None = None,
    finish_extra: dict[str, Any] | None = None,
    keepalive: bool = False,
    choices: list[tuple[list[Piece], str]] | None = None,
) -> AsyncIterator[bytes]:
    """An OpenAI ``chat.completion.chunk`` SSE stream of ``answer``: a role chunk, one chunk
    per token (``token_delay`` apart), the ``finish`` chunk (with ``finish_extra`` fields), a
    usage chunk with empty ``choices`` when ``usage_chunk`` is given, then ``[DONE]``. With
    ``error_after`` the stream instead ends after that many tokens with an ``error`` chunk;
    with ``cut_after`` it just ends there, as when the server dies mid-answer. ``choices``
    (``(pieces, finish)`` of each choice) replaces ``answer`` and ``finish``: the choices'
    chunks interleave, one piece of each in turn."""
    pieces: list[Piece] = list(answer)
    scripts = choices if choices is not None else [(pieces, finish)]
    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {
            "id": chunk_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": choices,
            **extra,
        }
        if usage_chunk is not None:
            chunk.setdefault("usage", None)  # with include_usage, other chunks carry null
        return f"data: {json.dumps(chunk)}\n\n".encode()

    def choice(
        delta: dict[str, Any], finish_reason: str | None = None, index: int = 0
    ) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    stats.started += 1
    try:
        if keepalive:
            yield b": keep-alive\n\n"
        for index in range(len(scripts)):
            yield event([choice({"role": "assistant", "content": ""}, index=index)])
        for sent, (index, piece) in enumerate(_interleaved(scripts)):
            if sent == error_after:
                error = {"message": _FAILURES["server_error"][3], "type": "server_error"}
                yield f"data: {json.dumps({'error': {**error, 'param': None}})}\n\n".encode()
                return
            if sent == cut_after:
                return
            if token_delay:
                await asyncio.sleep(token_delay)
            delta = {"content": piece} if isinstance(piece, str) else piece
            yield event([choice(delta, index=index)])
            stats.tokens_sent += 1  # resumed: the chunk above was handed to the socket
        for index, (_, finish_reason) in enumerate(scripts):
            last = index == len(scripts) - 1
            extra = (finish_extra or {}) if last else {}
            yield event([choice({}, finish_reason, index)], **extra)
        if usage_chunk is not None:
            yield event([], usage=usage_chunk)
        yield b"data: [DONE]\n\n"
        stats.completed += 1
    except (asyncio.CancelledError, GeneratorExit):
        stats.aborted += 1
        raise


def _interleaved(scripts: list[tuple[list[Piece], str]]) -> list[tuple[int, Piece]]:
    """``(choice, piece)`` of every choice's pieces, one of each choice in turn."""
    longest = max((len(pieces) for pieces, _ in scripts), default=0)
    return [
        (index, pieces[step])
        for step in range(longest)
        for index, (pieces, _) in enumerate(scripts)
        if step < len(pieces)
    ]


@dataclass
class OpenAIFake:
    """Configuration, recorded traffic and app of one fake OpenAI-compatible server.

    Attributes may be changed between requests; counters are written by the server thread.
    """

    api_key: str | None = "sk-test"
    tokens: tuple[str, ...] | list[str] = DEFAULT_TOKENS
    token_delay: float = 0.0  # seconds between streamed token chunks
    failure: Failure | None = None
    failure_times: int | None = None  # the failure hits the next N requests; None: every one
    error_after_tokens: int = 2  # tokens streamed before ``error_mid_stream``/``cut_mid_stream``
    slow_seconds: float = 5.0  # delay before a ``slow`` request answers
    tokenize_style: Literal["vllm", "llama_cpp"] = "vllm"
    keepalive_comments: bool = True  # interleave ``: keep-alive`` SSE comments (as OpenRouter)
    reports_usage: bool = True  # False: a stream never has a usage chunk, as some servers do
    tool_arguments: str = '{"city": "Paris"}'  # what a tool call answers (see the module doc)

    requests: list[RecordedRequest] = field(default_factory=list)
    stats: StreamStats = field(default_factory=StreamStats)
    media: MediaStore = field(default_factory=MediaStore)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def app(self) -> FastAPI:
        """A new ASGI app over this fake's state."""
        app = FastAPI(title="fake OpenAI-compatible server")
        self.media.mount(app)
        app.post("/v1/chat/completions")(self._chat)
        app.post("/v1/images/generations")(self._generations)
        app.post("/v1/images/edits")(self._edits)
        app.post("/v1/audio/speech")(self._speech)
        app.post("/tokenize")(self._tokenize)
        return app

    @property
    def tokens_sent(self) -> int:
        """Token chunks written to the wire, across all streams."""
        return self.stats.tokens_sent

    # ------------------------------------------------------------------- plumbing

    def _record(self, request: Request, body: dict[str, Any], files: Any = ()) -> None:
        self.requests.append(
            RecordedRequest(
                path=request.url.path,
                authorization=request.headers.get("authorization"),
                headers=dict(request.headers),
                body=body,
                files=list(files),
                client=(request.client.host, request.client.port) if request.client else None,
            )
        )

    async def _gate(self, request: Request) -> Response | None:
        """The error answer this request gets (auth, injected failure), or None."""
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return openai_error(*_error_args("unauthorized"))
        failure = self._take_failure()
        if failure == "slow":
            await asyncio.sleep(self.slow_seconds)
        elif failure in _FAILURES:
            return openai_error(*_error_args(failure))
        return None

    def _take_failure(self) -> Failure | None:
        with self._lock:
            failure = self.failure
            if failure is not None and self.failure_times is not None:
                self.failure_times -= 1
                if self.failure_times <= 0:
                    self.failure, self.failure_times = None, None
            return failure

    # ----------------------------------------------------------------------- chat

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        self._record(request, body)
        mid_stream = self.failure
        if (denied := await self._gate(request)) is not None:
            return denied
        scripts = [self._script(body, index) for index in range(int(body.get("n") or 1))]
        usage = {
            "prompt_tokens": prompt_tokens(body.get("messages") or []),
            "completion_tokens": sum(len(pieces) for pieces, _ in scripts),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        model = str(body.get("model") or "fake-model")
        if not body.get("stream"):
            return JSONResponse(_completion(model, scripts, usage))
        include_usage = self.reports_usage and bool(
            (body.get("stream_options") or {}).get("include_usage")
        )
        events = chat_chunks(
            self.stats,
            model=model,
            answer=[],
            finish="stop",
            choices=scripts,
            usage_chunk=usage if include_usage else None,
            token_delay=self.token_delay,
            error_after=self.error_after_tokens if mid_stream == "error_mid_stream" else None,
            cut_after=self.error_after_tokens if mid_stream == "cut_mid_stream" else None,
            keepalive=self.keepalive_comments,
        )
        return StreamingResponse(events, media_type="text/event-stream")

    def _script(self, body: dict[str, Any], index: int) -> tuple[list[Piece], str]:
        """Choice ``index``'s pieces and finish reason (see the module doc)."""
        tool = _tool_called(body)
        if tool is not None:
            return _tool_call_pieces(
                tool, self.tool_arguments, f"call_{index}_{uuid.uuid4().hex[:8]}"
            )
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        tokens = [*self.tokens, *[" again"] * index]
        answer: list[Piece] = list(tokens[: limit or None])
        return answer, "length" if limit is not None and limit < len(tokens) else "stop"

    # --------------------------------------------------------------------- images

    async def _generations(self, request: Request) -> Response:
        body = await request.json()
        self._record(request, body)
        if (denied := await self._gate(request)) is not None:
            return denied
        return self._images_answer(request, body)

    async def _edits(self, request: Request) -> Response:
        form, files = parse_multipart(request.headers.get("content-type", ""), await request.body())
        self._record(request, form, files)
        if (denied := await self._gate(request)) is not None:
            return denied
        if not any(name in ("image", "image[]") for name, _, _ in files):
            return openai_error(
                400, "Missing required parameter: 'image'.", "invalid_request_error"
            )
        return self._images_answer(request, form)

    def _images_answer(self, request: Request, body: dict[str, Any]) -> Response:
        if not body.get("prompt"):
            return openai_error(
                400, "Missing required parameter: 'prompt'.", "invalid_request_error"
            )
        fmt = str(body.get("output_format") or "png")
        width, _, height = str(body.get("size") or "64x64").partition("x")
        data = image_bytes(min(int(width), 64), min(int(height), 64), fmt)
        items = []
        for _ in range(int(body.get("n") or 1)):
            if body.get("response_format") == "url":
                items.append({"url": self.media.add(request, data, MIME_BY_KIND[fmt], fmt)})
            else:
                items.append({"b64_json": base64.b64encode(data).decode()})
        return JSONResponse({"created": int(time.time()), "data": items})

    # --------------------------------------------------------------------- speech

    async def _speech(self, request: Request) -> Response:
        body = await request.json()
        self._record(request, body)
        if (denied := await self._gate(request)) is not None:
            return denied
        missing = [name for name in ("model", "input", "voice") if not body.get(name)]
        if missing:
            message = f"Missing required parameter: '{missing[0]}'."
            return openai_error(400, message, "invalid_request_error")
        if body.get("response_format") == "mp3":
            return Response(MP3_FRAME * 4, media_type="audio/mpeg")
        return Response(wav_bytes(), media_type="audio/wav")

    # ------------------------------------------------------------------- tokenize

    async def _tokenize(self, request: Request) -> Response:
        body = await request.json()
        self._record(request, body)
        if self.tokenize_style == "llama_cpp":
            words = str(body.get("content", "")).split()
            return JSONResponse({"tokens": list(range(len(words)))})
        count = prompt_tokens(body.get("messages") or []) + 5  # + chat template tokens
        return JSONResponse(
            {
                "count": count,
                "max_model_len": 4096,
                "tokens": list(range(count)),
                "token_strs": None,
            }
        )


def _error_args(failure: str) -> tuple[int, str, str, str | None]:
    status, type_, code, message = _FAILURES[failure]
    return status, message, type_, code


def _tool_called(body: dict[str, Any]) -> str | None:
    """The name of the tool the answer calls, or None when it answers text."""
    tools, choice = body.get("tools"), body.get("tool_choice", "auto")
    messages = body.get("messages") or [{}]
    if not tools or choice == "none" or messages[-1].get("role") == "tool":
        return None
    if isinstance(choice, dict):
        return str(choice["function"]["name"])
    return str(tools[0]["function"]["name"])


def _tool_call_pieces(name: str, arguments: str, call_id: str) -> tuple[list[Piece], str]:
    """A streamed call of ``name``: the piece with the id and name, then the arguments in
    fragments of 4 characters."""
    head = {"index": 0, "id": call_id, "type": "function"}
    pieces: list[Piece] = [
        {"tool_calls": [{**head, "function": {"name": name, "arguments": ""}}]},
        *(
            {"tool_calls": [{"index": 0, "function": {"arguments": arguments[at : at + 4]}}]}
            for at in range(0, len(arguments), 4)
        ),
    ]
    return pieces, "tool_calls"


def _message(pieces: list[Piece]) -> dict[str, Any]:
    """A choice's ``message`` in a whole completion: its text, or its calls merged."""
    text = "".join(piece for piece in pieces if isinstance(piece, str))
    calls: list[dict[str, Any]] = []
    for piece in pieces:
        for call in piece["tool_calls"] if isinstance(piece, dict) else ():
            if "id" in call:
                calls.append({**call, "function": dict(call["function"])})
                del calls[-1]["index"]
            else:
                calls[-1]["function"]["arguments"] += call["function"]["arguments"]
    if calls:
        return {"role": "assistant", "content": None, "tool_calls": calls}
    return {"role": "assistant", "content": text}


def _completion(
    model: str, scripts: list[tuple[list[Piece], str]], usage: dict[str, int]
) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": index, "message": _message(pieces), "logprobs": None, "finish_reason": finish}
            for index, (pieces, finish) in enumerate(scripts)
        ],
        "usage": usage,
    }


def parse_multipart(
    content_type: str, body: bytes
) -> tuple[dict[str, Any], list[tuple[str, str, bytes]]]:
    """Form fields and ``(field, content type, bytes)`` files of a multipart/form-data body,
    parsed with the stdlib so the fake needs no multipart package."""
    head = f"Content-Type: {content_type}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    form: dict[str, Any] = {}
    files: list[tuple[str, str, bytes]] = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if not isinstance(name, str) or not isinstance(payload, bytes):
            continue
        if part.get_filename() is not None:
            files.append((name, part.get_content_type(), payload))
        else:
            form[name] = payload.decode()
    return form, files
