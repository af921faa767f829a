"""Typed results: what the API answers, as frozen dataclasses (``raw`` keeps the wire JSON).

Results with output files (:class:`Job`, :class:`ImageResult`) download them with
``save(path)`` (or ``await asave(path)`` in async code); :class:`ChatResult` saves its text.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from hypereal.client._errors import HyperealError

TERMINAL_STATUSES = frozenset({"completed", "failed", "canceled"})


@dataclass(frozen=True)
class Connection:
    """Where results download from: the client's base URL, key and timeout. The key is sent
    only to the client's own origin (the server's ``/files``), never to a CDN or bucket."""

    base_url: str
    api_key: str | None
    timeout: float | httpx.Timeout | None = 300.0

    def resolve(self, url: str) -> str:
        return urljoin(self.base_url + "/", url)

    def headers_for(self, url: str) -> dict[str, str]:
        mine, theirs = urlsplit(self.base_url), urlsplit(url)
        same = (mine.scheme, mine.netloc) == (theirs.scheme, theirs.netloc)
        return {"Authorization": f"Bearer {self.api_key}"} if same and self.api_key else {}


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _int(value: Any, default: int = 0) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    return default


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _target(path: str | os.PathLike[str], url: str) -> Path:
    """``path``, or the URL's file name inside ``path`` when it is a directory."""
    target = Path(path)
    if target.is_dir():
        name = Path(urlsplit(url).path).name or "output"
        target = target / name
    return target


class _Outputs(ABC):
    """``save`` / ``asave`` for results whose outputs are URLs."""

    _connection: Connection | None

    @property
    @abstractmethod
    def output_urls(self) -> tuple[str, ...]:
        """The result's output URLs, in order."""

    def _url(self, index: int) -> str:
        urls = self.output_urls
        if not urls:
            raise HyperealError("This result has no output to save")
        if not -len(urls) <= index < len(urls):
            raise HyperealError(f"No output {index}: this result has {len(urls)}")
        return urls[index]

    def _request(self, index: int) -> tuple[str, dict[str, str], float | httpx.Timeout | None]:
        url = self._url(index)
        connection = self._connection
        if connection is None:
            return url, {}, 300.0
        url = connection.resolve(url)
        return url, connection.headers_for(url), connection.timeout

    def save(self, path: str | os.PathLike[str], index: int = 0) -> Path:
        """Download output ``index`` (default the first) to ``path`` (a file, or a directory
        to keep the URL's file name); returns the file written."""
        url, headers, timeout = self._request(index)
        target = _target(path, url)
        try:
            with httpx.stream(
                "GET", url, headers=headers, timeout=timeout, follow_redirects=True
            ) as response:
                if response.status_code >= 400:
                    raise HyperealError(
                        f"Downloading {url} failed: HTTP {response.status_code}",
                        status=response.status_code,
                    )
                with target.open("wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
        except httpx.HTTPError as exc:
            raise HyperealError(f"Downloading {url} failed: {exc}") from exc
        return target

    async def asave(self, path: str | os.PathLike[str], index: int = 0) -> Path:
        """:meth:`save` for async code."""
        url, headers, timeout = self._request(index)
        target = _target(path, url)
        try:
            async with (
                httpx.AsyncClient(timeout=timeout, follow_redirects=True) as http,
                http.stream("GET", url, headers=headers) as response,
            ):
                if response.status_code >= 400:
                    raise HyperealError(
                        f"Downloading {url} failed: HTTP {response.status_code}",
                        status=response.status_code,
                    )
                with target.open("wb") as out:
                    async for chunk in response.aiter_bytes():
                        out.write(chunk)
        except httpx.HTTPError as exc:
            raise HyperealError(f"Downloading {url} failed: {exc}") from exc
        return target


@dataclass(frozen=True)
class Job(_Outputs):
    """A video, audio or 3D job. ``status`` is ``processing`` until it is ``completed``,
    ``failed`` or ``canceled``; ``stage`` is the finer state (``queued``, ``running``, ...)
    and ``progress`` goes from 0.0 to 1.0."""

    id: str
    status: str
    stage: str
    progress: float
    model: str | None
    type: str | None
    output_url: str | None
    credits_used: int
    error: str | None = None
    result: Mapping[str, Any] | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    poll_url: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    _connection: Connection | None = field(default=None, repr=False, compare=False)

    @property
    def done(self) -> bool:
        """True once the job has ended (completed, failed or canceled)."""
        return self.status in TERMINAL_STATUSES

    @property
    def output_urls(self) -> tuple[str, ...]:
        return (self.output_url,) if self.output_url else ()

    @classmethod
    def from_json(
        cls,
        data: Mapping[str, Any],
        connection: Connection | None = None,
        *,
        model: str | None = None,
        type: str | None = None,
    ) -> Job:
        """A job from ``GET /v1/jobs/{id}``, a submission answer (``202 {"jobId", ...}``,
        or a synchronous ``200``) or a webhook payload."""
        status = _str(data.get("status")) or "processing"
        raw_progress = data.get("progress")
        if isinstance(raw_progress, int | float) and not isinstance(raw_progress, bool):
            progress = float(raw_progress)
        else:
            progress = 1.0 if status == "completed" else 0.0
        result = data.get("result")
        return cls(
            id=str(data.get("jobId") or data.get("id") or ""),
            status=status,
            stage=_str(data.get("stage")) or status,
            progress=progress,
            model=_str(data.get("model")) or model,
            type=_str(data.get("type")) or type,
            output_url=_str(data.get("outputUrl")) or _str(data.get("url")),
            credits_used=_int(data.get("creditsUsed")),
            error=_str(data.get("error")),
            result=result if isinstance(result, Mapping) else None,
            created_at=parse_time(data.get("createdAt")),
            started_at=parse_time(data.get("startedAt")),
            completed_at=parse_time(data.get("completedAt")),
            poll_url=_str(data.get("pollUrl")),
            raw=dict(data),
            _connection=connection,
        )


@dataclass(frozen=True)
class ImageResult(_Outputs):
    """A synchronous image generation or edit: its image URL(s) and cost."""

    model: str | None
    urls: tuple[str, ...]
    credits_used: int
    result_id: str | None = None
    created: int | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    _connection: Connection | None = field(default=None, repr=False, compare=False)

    @property
    def output_urls(self) -> tuple[str, ...]:
        return self.urls

    @property
    def output_url(self) -> str | None:
        return self.urls[0] if self.urls else None

    @classmethod
    def from_json(
        cls, data: Mapping[str, Any], connection: Connection | None = None
    ) -> ImageResult:
        items = data.get("data")
        entries = [item for item in items if isinstance(item, Mapping)] if items else []
        urls = tuple(str(item["url"]) for item in entries if isinstance(item.get("url"), str))
        model = next((str(item["model"]) for item in entries if item.get("model")), None)
        created = data.get("created")
        return cls(
            model=model,
            urls=urls,
            credits_used=_int(data.get("creditsUsed")),
            result_id=_str(data.get("resultId")),
            created=created if isinstance(created, int) else None,
            raw=dict(data),
            _connection=connection,
        )


@dataclass(frozen=True)
class Usage:
    """Token counts of a chat turn."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def from_json(cls, data: Any) -> Usage | None:
        if not isinstance(data, Mapping):
            return None
        prompt, completion = _int(data.get("prompt_tokens")), _int(data.get("completion_tokens"))
        return cls(prompt, completion, _int(data.get("total_tokens"), prompt + completion))


@dataclass(frozen=True)
class ChatResult:
    """A whole chat answer (or a finished stream): text, why it stopped, tokens, cost."""

    id: str | None
    model: str | None
    content: str
    finish_reason: str | None
    usage: Usage | None
    credits_used: int
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def output_urls(self) -> tuple[str, ...]:
        return ()

    @property
    def output_url(self) -> str | None:
        return None

    def save(self, path: str | os.PathLike[str], index: int = 0) -> Path:
        """Write the answer's text to ``path``."""
        target = Path(path)
        target.write_text(self.content, encoding="utf-8")
        return target

    async def asave(self, path: str | os.PathLike[str], index: int = 0) -> Path:
        return self.save(path, index)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ChatResult:
        choices = data.get("choices")
        choice: Mapping[str, Any] = {}
        if isinstance(choices, Sequence) and choices and isinstance(choices[0], Mapping):
            choice = choices[0]
        message = choice.get("message")
        content = message.get("content") if isinstance(message, Mapping) else None
        return cls(
            id=_str(data.get("id")),
            model=_str(data.get("model")),
            content=content if isinstance(content, str) else "",
            finish_reason=_str(choice.get("finish_reason")),
            usage=Usage.from_json(data.get("usage")),
            credits_used=_int(data.get("creditsUsed")),
            raw=dict(data),
        )


@dataclass(frozen=True)
class Balance:
    """The caller's credits."""

    account_id: str
    balance: int
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Balance:
        return cls(
            account_id=str(data.get("accountId") or ""),
            balance=_int(data.get("balance", data.get("credits"))),
            raw=dict(data),
        )


@dataclass(frozen=True)
class LedgerEntry:
    """One line of the caller's ledger: a ``grant``, ``debit`` or ``refund``."""

    id: int
    type: str
    amount: int
    balance_after: int
    reference: str | None
    description: str
    refund_of: int | None
    created_at: datetime | None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LedgerEntry:
        refund_of = data.get("refundOf")
        return cls(
            id=_int(data.get("id")),
            type=str(data.get("type") or ""),
            amount=_int(data.get("amount")),
            balance_after=_int(data.get("balanceAfter")),
            reference=_str(data.get("reference")),
            description=str(data.get("description") or ""),
            refund_of=refund_of if isinstance(refund_of, int) else None,
            created_at=parse_time(data.get("createdAt")),
            raw=dict(data),
        )


@dataclass(frozen=True)
class ModelParam:
    """One input parameter of a model (validated by the server)."""

    name: str
    type: str
    required: bool
    default: Any = None
    choices: tuple[Any, ...] | None = None
    description: str = ""

    @property
    def is_media(self) -> bool:
        """A file input: a URL or a ``data:`` URI (the client makes one from a path)."""
        return self.type in ("media", "media-list")


@dataclass(frozen=True)
class Model:
    """A catalogue entry of ``GET /v1/models``."""

    slug: str
    name: str
    modality: str
    description: str
    params: tuple[ModelParam, ...]
    price: Mapping[str, Any]
    available: bool
    backend: str | None
    unavailable_reason: str | None = None
    context_tokens: int | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def param(self, name: str) -> ModelParam | None:
        return next((p for p in self.params if p.name == name), None)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Model:
        params = []
        for item in data.get("params") or ():
            if isinstance(item, Mapping) and isinstance(item.get("name"), str):
                choices = item.get("choices")
                params.append(
                    ModelParam(
                        name=item["name"],
                        type=str(item.get("type") or "string"),
                        required=bool(item.get("required")),
                        default=item.get("default"),
                        choices=tuple(choices) if isinstance(choices, list) else None,
                        description=str(item.get("description") or ""),
                    )
                )
        price = data.get("price")
        context = data.get("contextTokens")
        return cls(
            slug=str(data.get("slug") or data.get("id") or ""),
            name=str(data.get("name") or ""),
            modality=str(data.get("modality") or ""),
            description=str(data.get("description") or ""),
            params=tuple(params),
            price=dict(price) if isinstance(price, Mapping) else {},
            available=bool(data.get("available", True)),
            backend=_str(data.get("backend")),
            unavailable_reason=_str(data.get("unavailableReason")),
            context_tokens=context if isinstance(context, int) else None,
            raw=dict(data),
        )


#: What :meth:`Client.run` returns, by the model's modality.
RunResult = Job | ImageResult | ChatResult
