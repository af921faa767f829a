"""Domain exceptions. ``api/errors.py`` turns each into the spec's JSON body and status."""

from __future__ import annotations

from typing import Any


class HyperealError(Exception):
    """Base of every error a client may see; ``status`` is the HTTP status it maps to."""

    status: int = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"error": self.message}

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(HyperealError):
    status = 400


class ModelRequired(BadRequest):
    def __init__(self) -> None:
        super().__init__("Model is required")


class UnsupportedModel(BadRequest):
    def __init__(self, modality: str, slug: str) -> None:
        super().__init__(f"Unsupported {modality} model: {slug}")
        self.modality = modality
        self.slug = slug


class Unauthorized(HyperealError):
    status = 401

    def __init__(self, detail: str = "Please provide a valid API key") -> None:
        super().__init__(f"Unauthorized. {detail}")


class Forbidden(HyperealError):
    status = 403


class InsufficientCredits(HyperealError):
    status = 402

    def __init__(self, required: int, available: int) -> None:
        super().__init__("Insufficient credits")
        self.required = required
        self.available = available

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "required": self.required, "available": self.available}


class NotFound(HyperealError):
    status = 404


class JobNotFound(NotFound):
    def __init__(self) -> None:
        super().__init__("Job not found")


class Conflict(HyperealError):
    status = 409


class RateLimited(HyperealError):
    status = 429

    def __init__(self, limit: int, retry_after: int) -> None:
        super().__init__(
            f"Rate limit exceeded: {limit} requests per hour. Retry after {retry_after} seconds."
        )
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class ModelUnavailable(HyperealError):
    """The model is in the catalogue but no backend is configured (or loadable) for it."""

    status = 503


class UpstreamError(HyperealError):
    """An upstream provider failed or answered with an error."""

    status = 502


class GenerationFailed(HyperealError):
    """A backend failed to produce a result; credits are refunded by the caller."""

    status = 500


class ModelNotAllowed(Forbidden):
    """The API key's model allow-list does not name the model."""

    def __init__(self, slug: str, allowed: tuple[str, ...]) -> None:
        shown = ", ".join(allowed) if allowed else "none"
        super().__init__(f"This API key may not use the model '{slug}' (allowed: {shown})")


class KeyBudgetExceeded(HyperealError):
    """The API key's own budget (not the account balance) cannot cover the cost."""

    status = 402

    def __init__(self, budget: str, limit: int, spent: int, required: int) -> None:
        super().__init__(f"This API key's {budget} budget is exhausted")
        self.budget = budget
        self.limit = limit
        self.spent = spent
        self.required = required

    def body(self) -> dict[str, Any]:
        return {
            "error": self.message,
            "budget": self.budget,
            "limit": self.limit,
            "spent": self.spent,
            "required": self.required,
        }
