"""``POST /webhooks/upstream/{backend}``: push notifications from upstream providers.

No API key: the provider signs each delivery and the backend instance named in the path
verifies it (see :class:`~hypereal.backends.base.WebhookReceiver`; Replicate's
``webhook_secret``). Outside ``/v1`` because it is not part of the Hypereal API: it is the
address operators give the provider.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from hypereal.api.deps import ServicesDep
from hypereal.backends.base import BackendUnavailable, WebhookReceiver, WebhookRejected
from hypereal.domain.errors import BadRequest, NotFound

router = APIRouter(tags=["upstream webhooks"])


@router.post("/webhooks/upstream/{backend}", include_in_schema=False)
async def receive(backend: str, request: Request, services: ServicesDep) -> dict[str, Any]:
    try:
        instance = services.backends.instance(backend)
    except BackendUnavailable:
        instance = None
    if not isinstance(instance, WebhookReceiver):
        raise NotFound(f"No backend named '{backend}' receives webhooks")
    body = await request.body()
    try:
        waiting = instance.accept_webhook(request.headers, body)
    except BackendUnavailable as exc:
        raise NotFound(f"Backend '{backend}' does not receive webhooks: {exc}") from exc
    except WebhookRejected as exc:
        raise BadRequest(str(exc)) from exc
    return {"received": True, "waiting": waiting}
