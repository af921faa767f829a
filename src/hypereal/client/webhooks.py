"""Verifying the webhooks the server sends when a job ends (Standard Webhooks)."""

from __future__ import annotations

from collections.abc import Mapping

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from hypereal.client._errors import InvalidWebhook
from hypereal.client._types import Job


def verify_webhook(payload: bytes | str, headers: Mapping[str, str], secret: str) -> Job:
    """Check a webhook's signature and timestamp with the account's secret (``whsec_...``,
    from ``GET /v1/webhooks/secret``) and return the job it reports.

    ``payload`` is the raw request body, exactly as received; ``headers`` the request's
    headers (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``; any case).
    Raises :class:`InvalidWebhook` when the signature does not match, a header is missing or
    the timestamp is more than five minutes away."""
    body = payload.decode() if isinstance(payload, bytes) else payload
    try:
        data = Webhook(secret).verify(body, {str(k): str(v) for k, v in headers.items()})
    except WebhookVerificationError as exc:
        raise InvalidWebhook(f"Webhook not verified: {exc}") from exc
    except Exception as exc:  # a malformed secret, a body that is not JSON
        raise InvalidWebhook(f"Webhook not verified: {exc}") from exc
    if not isinstance(data, Mapping):
        raise InvalidWebhook("Webhook not verified: the payload is not a JSON object")
    return Job.from_json(data)
