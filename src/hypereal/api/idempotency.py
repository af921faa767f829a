"""Applies ``Idempotency-Key`` to a charging POST: replay, conflict, or run and remember."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from hypereal.api.responses import FastJSONResponse
from hypereal.domain import idempotency
from hypereal.domain.errors import Conflict, HyperealError
from hypereal.domain.keys import Principal
from hypereal.services import Services

HEADER = "idempotency-key"
STREAMED = Conflict(
    "The first request with this Idempotency-Key was streamed and cannot be replayed; "
    "its result was delivered on that stream"
)


def _api_path(request: Request) -> str:
    # /api/v1/x and /v1/x are the same endpoint.
    path: str = request.scope["path"]
    return path[len("/api") :] if path.startswith("/api/v1") else path


async def idempotent(
    request: Request,
    principal: Principal,
    services: Services,
    produce: Callable[[], Awaitable[Response]],
) -> Response:
    """Run ``produce`` at most once per (account, Idempotency-Key).

    Successful responses with a whole body (JSON, audio, text) are stored and replayed byte
    for byte (with ``Idempotent-Replayed: true``); a streamed one replays as a 409; failures
    release the key so the client can retry.
    """
    key = request.headers.get(HEADER)
    if key is None:
        return await produce()
    fingerprint = idempotency.request_fingerprint(
        request.method, _api_path(request), await request.body()
    )
    outcome = await idempotency.claim(services.db, principal.account_id, key, fingerprint)
    if isinstance(outcome, idempotency.StoredResponse):
        return Response(
            content=outcome.body,
            status_code=outcome.status_code,
            media_type=outcome.content_type,
            headers={"Idempotent-Replayed": "true"},
        )
    try:
        response = await produce()
    except BaseException:
        await idempotency.release(services.db, outcome)
        raise
    if not 200 <= response.status_code < 300:
        await idempotency.release(services.db, outcome)
        return response
    if isinstance(response, JSONResponse):
        stored = idempotency.StoredResponse(
            response.status_code, bytes(response.body), "application/json"
        )
    elif isinstance(response.__dict__.get("body"), bytes):  # whole bytes (speech, text)
        content_type = response.headers.get("content-type", "application/octet-stream")
        stored = idempotency.StoredResponse(
            response.status_code, bytes(response.body), content_type
        )
    else:
        stored = idempotency.StoredResponse(
            STREAMED.status, bytes(FastJSONResponse(STREAMED.body()).body), "application/json"
        )
    await idempotency.save(services.db, outcome, stored)
    return response


def domain_error_response(exc: HyperealError) -> JSONResponse:
    return FastJSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())
