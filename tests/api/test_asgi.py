"""The app's own request path (``api/asgi.py``): the app's exception handlers answer inside
every middleware, an error after the response started ends the connection, the routes
FastAPI's handler runs still get their exit stack (uploaded files are closed), and FastAPI's
telemetry layers come back when telemetry is on."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import APIRouter, FastAPI, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.telemetry._asgi import ExceptionTelemetryMiddleware
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware

from hypereal.api.asgi import ErrorMiddleware
from hypereal.app import create_app
from hypereal.domain import keys
from hypereal.services import Services
from tests.conftest import auth


class TeapotError(Exception):
    pass


def routes(uploads: list[UploadFile]) -> APIRouter:
    router = APIRouter()

    @router.get("/teapot")
    async def _teapot() -> None:
        raise TeapotError("short and stout")

    @router.get("/midstream")
    async def _midstream() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"first part"
            raise RuntimeError("broke after the start")

        return StreamingResponse(body(), media_type="text/plain")

    @router.post("/upload")
    async def _upload(file: UploadFile) -> dict[str, int]:
        uploads.append(file)
        return {"size": len(await file.read())}

    return router


async def key_of(services: Services) -> str:
    account = await keys.create_account(services.db, "asgi")
    return (await keys.create_key(services.db, account)).secret


def app_with(services: Services, uploads: list[UploadFile]) -> FastAPI:
    app = create_app(services.settings, services=services, extra_routers=[routes(uploads)])

    @app.exception_handler(TeapotError)
    async def _teapot(_: object, exc: TeapotError) -> JSONResponse:
        return JSONResponse({"error": f"teapot: {exc}"}, status_code=418)

    return app


async def test_a_registered_handler_answers_inside_every_middleware(services: Services) -> None:
    app = app_with(services, [])
    key = await key_of(services)
    transport = httpx.ASGITransport(app=app)
    headers = {**auth(key), "Origin": "https://app.example"}
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/v1/teapot", headers=headers)
        missing = await client.get("/v1/no-such-route", headers=headers)
    assert response.status_code == 418
    assert response.json() == {"error": "teapot: short and stout"}
    # Answered inside the CORS and rate-limit middleware: their headers are on it.
    assert response.headers["access-control-allow-origin"] == "*"
    assert response.headers["x-ratelimit-limit"] == "1000"
    assert response.headers["x-request-id"]
    # An HTTPException of the router (404) goes to the app's handler too.
    assert missing.status_code == 404 and missing.json() == {"error": "Not found"}


async def test_an_error_after_the_response_started_ends_it_and_is_logged_once(
    services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    app = app_with(services, [])
    key = await key_of(services)
    transport = httpx.ASGITransport(app=app)
    with caplog.at_level(logging.ERROR, logger="hypereal.api"):
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            with pytest.raises(RuntimeError, match="broke after the start"):
                await client.get("/v1/midstream", headers=auth(key))
    logged = [r for r in caplog.records if r.name == "hypereal.api" and r.exc_info]
    assert len(logged) == 1 and "unhandled error on GET /v1/midstream" in logged[0].getMessage()


async def test_an_upload_route_run_by_fastapi_gets_its_files_closed(services: Services) -> None:
    uploads: list[UploadFile] = []
    app = app_with(services, uploads)
    key = await key_of(services)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.post(
            "/v1/upload", headers=auth(key), files={"file": ("a.txt", b"12345", "text/plain")}
        )
    assert response.status_code == 200 and response.json() == {"size": 5}
    assert len(uploads) == 1 and uploads[0].file.closed


def layers(app: FastAPI) -> list[type]:
    stack, found = app.build_middleware_stack(), []
    while stack is not None and not isinstance(stack, APIRouter):
        found.append(type(stack))
        stack = getattr(stack, "app", None)
    return found


async def test_the_stack_has_one_error_layer_inside_and_telemetry_only_when_on(
    services: Services,
) -> None:
    plain = layers(create_app(services.settings, services=services))
    assert plain[0] is ServerErrorMiddleware and plain[-1] is ErrorMiddleware
    assert ExceptionMiddleware not in plain and ExceptionTelemetryMiddleware not in plain
    assert not any(layer.__name__ == "AsyncExitStackMiddleware" for layer in plain)
    settings = services.settings.model_copy(update={"opentelemetry": True})
    traced = layers(create_app(settings, services=services))
    assert traced[:2] == [ServerErrorMiddleware, ExceptionTelemetryMiddleware]
    assert traced[-1] is ErrorMiddleware
