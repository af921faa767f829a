"""Documentation-only pydantic models: the bodies the routes really answer, for the OpenAPI
schema (``api/openapi.py``). No route validates or serializes through them at request time
(each is attached as ``responses={status: {"model": ...}}``); every model allows extra
fields, as clients must tolerate fields added later."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Doc(BaseModel):
    model_config = ConfigDict(extra="allow")


# ----------------------------------------------------------------------------- errors


class ErrorBody(Doc):
    """Every error on the Hypereal-shaped routes: one sentence naming what is wrong."""

    model_config = ConfigDict(
        extra="allow", json_schema_extra={"example": {"error": "Missing required field 'model'"}}
    )

    error: str = Field(description="What went wrong, naming the offending field")


class InsufficientCreditsBody(Doc):
    """402: the balance (or the key's own budget) cannot pay for the request; nothing was
    charged."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "example": {"error": "Insufficient credits", "required": 26, "available": 10}
        },
    )

    error: str
    required: int | None = Field(default=None, description="Credits the request costs")
    available: int | None = Field(default=None, description="Credits the account holds")


class OpenAIErrorDetail(Doc):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class OpenAIErrorBody(Doc):
    """Errors of the OpenAI-shaped routes (``/chat/completions``, ``/images/generations``,
    ``/images/edits``, ``/audio/speech``, ``/audio/transcriptions``)."""

    error: OpenAIErrorDetail


class AnthropicErrorDetail(Doc):
    type: str
    message: str


class AnthropicErrorBody(Doc):
    """Errors of the Anthropic-shaped ``/messages``."""

    type: Literal["error"]
    error: AnthropicErrorDetail


# ---------------------------------------------------------------------------- account


class Credits(Doc):
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={"example": {"accountId": "acct_x", "balance": 100, "credits": 100}},
    )

    accountId: str
    balance: int
    credits: int = Field(description="Same as balance")


class LedgerEntryDoc(Doc):
    id: int
    type: str = Field(description="grant | debit | refund")
    amount: int
    balanceAfter: int
    reference: str | None = None
    description: str | None = None
    refundOf: int | None = None
    createdAt: str | None = None


class LedgerPage(Doc):
    data: list[LedgerEntryDoc]
    hasMore: bool
    nextCursor: int | None = Field(description="Pass as ``before`` for the next page")


class UsageSummary(Doc):
    accountId: str
    groupBy: list[str]
    data: list[dict[str, Any]]
    total: dict[str, int]


# ----------------------------------------------------------------------------- models


class ModelDoc(Doc):
    id: str
    object: str
    slug: str
    name: str
    modality: str
    description: str
    params: list[dict[str, Any]]
    price: dict[str, Any]
    available: bool
    backend: str | None = None


class ModelList(Doc):
    object: str | None = None
    data: list[ModelDoc]


# ------------------------------------------------------------------------------ admin


class AccountBalance(Doc):
    accountId: str
    balance: int


class AccountList(Doc):
    data: list[dict[str, Any]]


class KeyDoc(Doc):
    id: str
    accountId: str
    name: str | None = None
    prefix: str
    rateLimitPerHour: int | None = None
    createdAt: str | None = None
    revokedAt: str | None = None
    active: bool


class CreatedKeyDoc(KeyDoc):
    key: str = Field(description="The secret, shown once")


class KeyList(Doc):
    data: list[KeyDoc]


class GrantResult(Doc):
    accountId: str
    balance: int
    entry: LedgerEntryDoc


class DataList(Doc):
    data: list[dict[str, Any]]


# ------------------------------------------------------------------------------- chat


class ChatMessageDoc(Doc):
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]


class ChatChoice(Doc):
    index: int
    message: dict[str, Any]
    finish_reason: str | None = None


class ChatCompletion(Doc):
    """A non-streamed answer; with ``stream`` the answer is ``text/event-stream`` chunks
    (``chat.completion.chunk``), the last with ``usage`` and ``creditsUsed``, then
    ``data: [DONE]``."""

    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: dict[str, int]
    creditsUsed: int


class AnthropicMessage(Doc):
    id: str
    type: str
    role: str
    model: str
    content: list[dict[str, Any]]
    stop_reason: str | None = None
    usage: dict[str, Any]


# ----------------------------------------------------------------------------- images


class ImageItem(Doc):
    url: str | None = None
    model: str | None = None
    b64_json: str | None = None


class ImageResultDoc(Doc):
    created: int
    data: list[ImageItem]
    resultId: str
    creditsUsed: int


class OpenAIImages(Doc):
    created: int
    data: list[ImageItem]


# ------------------------------------------------------------------------------- jobs


class JobAccepted(Doc):
    """202: the job is queued; poll ``pollUrl`` (or wait for the webhook). A synchronous
    model (or ``Prefer: wait=N``) answers 200 with the finished job instead."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "example": {
                "jobId": "job_x",
                "status": "processing",
                "message": "Generation started. Poll pollUrl for the result.",
                "creditsUsed": 26,
                "pollUrl": "http://127.0.0.1:8000/v1/jobs/job_x?model=camera-motion-i2v&type=video",
            }
        },
    )

    jobId: str
    status: str
    message: str | None = None
    creditsUsed: int
    pollUrl: str | None = None


class JobDoc(Doc):
    status: str = Field(description="processing | completed | failed | canceled")
    jobId: str
    outputUrl: str | None = None
    type: str
    model: str
    creditsUsed: int
    stage: str = Field(description="queued | running | completed | failed | canceled")
    progress: float
    createdAt: str | None = None
    startedAt: str | None = None
    completedAt: str | None = None
    error: str | None = None
    result: dict[str, Any] | None = None
    inputUrls: dict[str, str] | None = Field(
        default=None, description="The uploaded inputs, signed for an hour (owner only)"
    )


class JobPage(Doc):
    data: list[JobDoc]
    hasMore: bool
    nextCursor: str | None = None


class DeliveryList(Doc):
    data: list[dict[str, Any]]


class WebhookSecret(Doc):
    secret: str


class Health(Doc):
    status: str
