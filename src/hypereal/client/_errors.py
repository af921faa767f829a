"""The client's typed errors, one per way a call can fail, and the mapping from an HTTP
answer (status, ``{"error": ...}`` body, headers) to them."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hypereal.client._types import Job


class HyperealError(Exception):
    """Base of every error the client raises. ``status`` is the HTTP status when the server
    answered (None for network failures and local checks), ``body`` its JSON body."""

    def __init__(
        self, message: str, *, status: int | None = None, body: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.body: dict[str, Any] = dict(body or {})

    def __str__(self) -> str:
        return self.message


class APIConnectionError(HyperealError):
    """The server could not be reached (or the connection broke) and retries ran out."""


class AuthenticationError(HyperealError):
    """401: no API key, or a key the server does not accept (revoked, unknown)."""


class PermissionDenied(HyperealError):
    """403: the key may not do this (admin routes)."""


class BadRequest(HyperealError):
    """400 (or 413/422): the request is invalid; ``message`` names the field."""


class InsufficientCredits(HyperealError):
    """402: the call costs ``required`` credits and the account has ``available``.
    Nothing was charged."""

    def __init__(
        self,
        message: str,
        *,
        required: int | None,
        available: int | None,
        status: int | None = 402,
        body: Mapping[str, Any] | None = None,
    ) -> None:
        if required is not None and available is not None:
            message = f"{message}: {required} required, {available} available"
        super().__init__(message, status=status, body=body)
        self.required = required
        self.available = available


class NotFound(HyperealError):
    """404: no such job or model (or another account's job)."""


class Conflict(HyperealError):
    """409: e.g. cancelling a finished job, or an Idempotency-Key reused for another request."""


class RateLimited(HyperealError):
    """429 after the retries: the key's hourly limit is used up. ``retry_after`` is the
    number of seconds the server asked to wait (None when it did not say)."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None,
        status: int | None = 429,
        body: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message, status=status, body=body)
        self.retry_after = retry_after


class ModelUnavailable(HyperealError):
    """503 for a model: in the catalogue, but no backend serves it on this server."""


class ServerError(HyperealError):
    """5xx after the retries (a failed generation is refunded). ``retry_after``: the
    seconds the server asked to wait, if it said."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        status: int | None = 500,
        body: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message, status=status, body=body)
        self.retry_after = retry_after


class JobFailed(HyperealError):
    """The job ended ``failed``; ``error`` is the server's reason, ``job`` the final state.
    Its credits were refunded."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.error = job.error or "the job failed"
        super().__init__(f"Job {job.id} failed: {self.error}")


class JobCanceled(JobFailed):
    """The job was canceled (and refunded) before it finished."""

    def __init__(self, job: Job) -> None:
        super().__init__(job)
        self.message = f"Job {job.id} was canceled"
        self.args = (self.message,)


class WaitTimeout(HyperealError, TimeoutError):
    """``wait(timeout=...)`` ran out before the job finished; ``job`` is its last state (the
    job goes on running on the server)."""

    def __init__(self, job: Job, timeout: float) -> None:
        super().__init__(f"Job {job.id} still {job.stage} after {timeout:g} s")
        self.job = job


class InvalidWebhook(HyperealError):
    """A webhook whose Standard Webhooks signature or timestamp does not verify."""


def error_message(body: Mapping[str, Any], fallback: str) -> str:
    """The message of ``{"error": "..."}`` or OpenAI's ``{"error": {"message": ...}}``."""
    error = body.get("error")
    if isinstance(error, str) and error:
        return error
    if isinstance(error, Mapping) and isinstance(error.get("message"), str):
        return str(error["message"])
    return fallback


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (a number, or an HTTP date); None when absent or invalid."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())


def error_for_status(
    status: int,
    body: Mapping[str, Any],
    headers: Mapping[str, str] | None = None,
    *,
    json_body: bool = True,
) -> HyperealError:
    """The typed error for an HTTP error answer. ``json_body`` is false when the body was
    not JSON (a proxy's page): a 503 then is an outage, not an unavailable model."""
    headers = headers or {}
    message = error_message(body, f"HTTP {status}")
    if status == 401:
        return AuthenticationError(message, status=status, body=body)
    if status == 402:
        return InsufficientCredits(
            message,
            required=_int_or_none(body.get("required")),
            available=_int_or_none(body.get("available")),
            body=body,
        )
    if status == 403:
        return PermissionDenied(message, status=status, body=body)
    if status == 404:
        return NotFound(message, status=status, body=body)
    if status == 409:
        return Conflict(message, status=status, body=body)
    if status == 429:
        return RateLimited(
            message, retry_after=parse_retry_after(headers.get("retry-after")), body=body
        )
    if status == 503 and json_body and "retry-after" not in headers:
        return ModelUnavailable(message, status=status, body=body)
    if status >= 500:
        retry_after = parse_retry_after(headers.get("retry-after"))
        return ServerError(message, retry_after=retry_after, status=status, body=body)
    if 400 <= status < 500:
        return BadRequest(message, status=status, body=body)
    return HyperealError(message, status=status, body=body)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
