"""The modality protocols every backend implements, and the plain data they exchange.

Backends know nothing about credits, HTTP routes or the database: they take a request
dataclass and return media. Blocking model calls must run off the event loop
(``anyio.to_thread.run_sync`` or a process pool). A backend that cannot serve (missing
package, missing weights, missing key) raises :class:`BackendUnavailable` from its
constructor; one that fails while serving raises :class:`BackendError`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from hypereal.media.blob import MediaBlob

__all__ = [
    "AudioBackend",
    "BackendError",
    "BackendUnavailable",
    "ChatBackend",
    "ChatDelta",
    "ChatMessage",
    "ChatRequest",
    "ImageBackend",
    "ImageRequest",
    "JobRequest",
    "JobResult",
    "MediaBlob",
    "MeshBackend",
    "ProgressCallback",
    "ToolCall",
    "VideoBackend",
    "WebhookReceiver",
    "WebhookRejected",
]


class BackendUnavailable(Exception):
    """The backend cannot be used here; the message says how to configure it."""


class BackendError(Exception):
    """Generation failed. ``client_error`` marks failures caused by the request itself
    (bad input image, text too long), which the API reports as 400 instead of 5xx."""

    def __init__(self, message: str, *, client_error: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.client_error = client_error


# ---------------------------------------------------------------------------- chat


@dataclass(frozen=True)
class ToolCall:
    """A function call the model asked for (an item of OpenAI's ``tool_calls``), or a piece
    of one while it streams: ``index`` says which call of the answer a piece belongs to; the
    first piece usually has the ``id`` and ``name``, the others more ``arguments`` text."""

    index: int = 0
    id: str | None = None
    name: str | None = None
    arguments: str = ""  # JSON text as the model writes it, in fragments while streaming

    def public(self) -> dict[str, Any]:
        """OpenAI's shape of a whole call: ``{"id", "type", "function": {"name",
        "arguments"}}``."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }

    def piece(self) -> dict[str, Any]:
        """OpenAI's shape of a streamed piece (``delta.tool_calls[i]``): ``index``, and of
        ``id``, ``type`` and ``function.name`` only what this piece carries."""
        function: dict[str, Any] = {"arguments": self.arguments}
        if self.name is not None:
            function = {"name": self.name, **function}
        head: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            head.update(id=self.id, type="function")
        return {**head, "function": function}


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant" | "tool"
    content: str
    # An assistant message's calls (its content may be empty), and for a ``tool`` message the
    # call it answers.
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


@dataclass(frozen=True)
class ChatRequest:
    messages: Sequence[ChatMessage]
    temperature: float
    max_tokens: int
    # Upstream model id from the catalogue entry (``upstream_model``), if any.
    upstream_model: str | None = None
    # The caller delivers the answer whole (a non-streamed request): a backend that declares
    # ``answers_whole = True`` then asks its upstream for one complete answer instead of a
    # stream of chunks, and yields it as one delta when it is done.
    whole: bool = False
    # Set by a caller that settles to the upstream's own bill (a pass-through model): the
    # backend records there what the upstream charged, ``credits_used``, when it says.
    upstream_bill: dict[str, Any] | None = field(default=None, compare=False)
    # OpenAI fields the client set that change how the upstream generates (``stop``, ``seed``,
    # ``response_format``, ``tools``, ``tool_choice``, ``n``), validated; given only to a
    # backend whose ``chat_options`` names them (the route answers 400 for the others).
    options: Mapping[str, Any] | None = None

    @property
    def choice_count(self) -> int:
        """How many answers are asked for (OpenAI's ``n``)."""
        return int((self.options or {}).get("n", 1))


@dataclass(frozen=True)
class ChatDelta:
    """One piece of a streamed answer. The last delta carries ``finish_reason`` and, when the
    backend knows them, the exact token counts (of all choices together). With ``n`` > 1,
    ``choice`` says which answer a delta belongs to, and each choice ends with a delta
    carrying its ``finish_reason``; the counts come on the very last one."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    choice: int = 0
    tool_calls: tuple[ToolCall, ...] = ()  # pieces of the function calls asked for


@runtime_checkable
class ChatBackend(Protocol):
    """A chat model. Optional: a backend that knows how many tokens of context its model
    holds (prompt and answer together) exposes it as ``context_length: int | None`` (None
    while unknown). It is read after :meth:`count_prompt_tokens`, which may load the model
    to learn it; the smaller of it and the catalogue's ``context_tokens`` is enforced.

    Optional too: ``answers_whole: bool``, True for a backend that honours
    ``ChatRequest.whole`` (an HTTP upstream asked for one complete answer). Such an answer is
    generated whole once asked for, so it is billed whole even if the client leaves first;
    a streaming backend stops when the client leaves and bills the part it generated.

    Optional: ``chat_options: frozenset[str]``, the OpenAI fields of ``ChatRequest.options``
    the backend passes on to its model (``stop``, ``seed``, ``response_format``, ``tools`` and
    ``tool_choice``, ``n``). Only a backend naming ``tools`` is given messages with tool calls
    and ``tool`` messages."""

    async def count_prompt_tokens(self, request: ChatRequest) -> int:
        """Tokens the prompt takes with the model's own tokenizer and chat template."""
        ...

    def stream(self, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        """Yield deltas as they are generated. Closing the iterator (client gone) must stop
        generation promptly."""
        ...


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    width: int | None = None
    height: int | None = None
    aspect_ratio: str | None = None
    output_format: str = "png"  # png | jpeg | webp
    images: Sequence[MediaBlob] = ()  # source images for edit models, already fetched
    upstream_model: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)  # other validated model params
    upstream_bill: dict[str, Any] | None = field(default=None, compare=False)  # see ChatRequest


@runtime_checkable
class ImageBackend(Protocol):
    async def generate_images(self, request: ImageRequest) -> list[MediaBlob]: ...


# ------------------------------------------------------- async jobs: video, audio, 3D

ProgressCallback = Callable[[float, str], Awaitable[None]]
"""``await progress(fraction_done_0_to_1, message)``; best-effort, never raises."""


@dataclass(frozen=True)
class JobRequest:
    """Input of one async generation. ``input`` holds the validated per-model fields
    (``prompt``, ``duration``, ``text``, ``voice`` ...); URLs/data URIs named by the model's
    media parameters are fetched by the engine and passed as ``media`` keyed by field name."""

    job_id: str
    input: Mapping[str, Any]
    media: Mapping[str, MediaBlob] = field(default_factory=dict)
    upstream_model: str | None = None
    upstream_bill: dict[str, Any] | None = field(default=None, compare=False)  # see ChatRequest


@dataclass(frozen=True)
class JobResult:
    output: MediaBlob
    # Extra structured result (e.g. a transcript with timings), returned with the job.
    data: Mapping[str, Any] | None = None
    # Credits to settle the job at (a pass-through model: set by the engine, not backends).
    credits: int | None = None


@runtime_checkable
class VideoBackend(Protocol):
    async def generate_video(
        self, request: JobRequest, progress: ProgressCallback
    ) -> JobResult: ...


@runtime_checkable
class AudioBackend(Protocol):
    async def generate_audio(
        self, request: JobRequest, progress: ProgressCallback
    ) -> JobResult: ...


@runtime_checkable
class MeshBackend(Protocol):
    async def generate_mesh(self, request: JobRequest, progress: ProgressCallback) -> JobResult: ...


class WebhookRejected(ValueError):
    """A provider webhook delivery that is not provably from the provider (bad or missing
    signature, stale timestamp, malformed body)."""


@runtime_checkable
class WebhookReceiver(Protocol):
    """A backend that takes its provider's push notifications at ``POST /webhooks/upstream/
    <backend name>``. ``accept_webhook`` verifies one delivery (the raw body, byte for byte)
    and returns whether work of ours was waiting for it. Raises WebhookRejected, or
    BackendUnavailable when this instance is not set up to receive webhooks."""

    def accept_webhook(self, headers: Mapping[str, str], body: bytes) -> bool: ...
