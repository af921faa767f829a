"""The OpenAPI schema the API really follows, built once (``app.openapi()``), and ``/docs``
served from local assets.

FastAPI's own schema has ``{}`` for every response, a 422 on every operation (the app answers
400 instead), nothing marked required in the bodies it reads loosely, and no security. Here
every operation gets, from one table:

- its success body (``api/doc_models.py``: documentation-only models; no route validates or
  serializes through them at request time, so the hot routes stay as they are);
- the errors it really returns (400/401/402/403/404/409/413/429/500/503 ...), each in the
  shape of its API (Hypereal ``{"error"}``, OpenAI's error object, Anthropic's);
- the bearer security scheme (so ``/docs`` has an Authorize button), except the public routes;
- request bodies with their required fields, and per-model ``input`` schemas generated from
  the catalogue (``/docs`` shows what ``sora-2-i2v`` takes).

Swagger UI's files come from the pinned ``swagger-ui-py`` package: nothing is loaded from a
CDN, so ``/docs`` works on an offline server.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse
from pydantic import BaseModel

from hypereal.api import doc_models as m
from hypereal.api.doc_models import ErrorBody
from hypereal.api.openapi_requests import request_bodies
from hypereal.domain.catalogue import Catalogue
from hypereal.domain.errors import NotFound

__all__ = ["FILE_RESPONSES", "ErrorBody", "error_responses", "install_openapi"]

PREFIXES = ("/v1", "/api/v1")
OPENAI = (
    "/chat/completions",
    "/images/generations",
    "/images/edits",
    "/audio/speech",
    "/audio/transcriptions",
)
ANTHROPIC = ("/messages",)
PUBLIC = ("/health", "/files/{key}")

DESCRIPTIONS = {
    400: "Invalid request: a field is missing or has a bad value (the message names it)",
    401: "Missing, unknown or revoked API key",
    402: "Insufficient credits (or the key's own budget); nothing was charged",
    403: "Not allowed: an admin-only route, a model the key may not use, a bad signature",
    404: "Not found (or not this account's)",
    405: "Method not allowed",
    409: "Conflict: the job has ended, or an Idempotency-Key is in use or reused",
    413: "Request body over the server's limit",
    429: "Rate limit exceeded; see Retry-After",
    500: "The generation failed (refunded in full)",
    502: "The upstream provider failed (refunded in full)",
    503: "No backend serves this model here, or the job engine is not running",
}

AUTH = (401, 429)
READ = (*AUTH, 400)
BODY = (*READ, 413)
CHARGED = (*BODY, 402, 403, 409, 503)


@dataclass(frozen=True)
class Op:
    """An operation's documentation: success status and body, the errors it returns."""

    status: int
    body: type[BaseModel] | None
    errors: tuple[int, ...]
    content: str = "application/json"
    description: str = "Success"


OPS: dict[tuple[str, str], Op] = {
    ("get", "/credits"): Op(200, m.Credits, AUTH),
    ("get", "/usage"): Op(200, m.LedgerPage, READ),
    ("get", "/usage/summary"): Op(200, m.UsageSummary, (*READ, 403, 404)),
    ("get", "/models"): Op(200, m.ModelList, AUTH),
    ("get", "/models/{slug}"): Op(200, m.ModelDoc, (*READ, 404)),
    ("get", "/admin/accounts"): Op(200, m.AccountList, (*READ, 403)),
    ("post", "/admin/accounts"): Op(201, m.AccountBalance, (*BODY, 403)),
    ("post", "/admin/keys"): Op(201, m.CreatedKeyDoc, (*BODY, 403, 404)),
    ("get", "/admin/keys"): Op(200, m.KeyList, (*READ, 403)),
    ("post", "/admin/keys/{key_id}/revoke"): Op(200, m.KeyDoc, (*READ, 403, 404)),
    ("delete", "/admin/keys/{key_id}"): Op(200, m.KeyDoc, (*READ, 403, 404)),
    ("patch", "/admin/keys/{key_id}"): Op(200, m.KeyDoc, (*BODY, 403, 404)),
    ("post", "/admin/accounts/{account_id}/credits"): Op(200, m.GrantResult, (*BODY, 403, 404)),
    ("get", "/admin/accounts/{account_id}/balance"): Op(200, m.AccountBalance, (*READ, 403, 404)),
    ("get", "/admin/accounts/{account_id}/ledger"): Op(200, m.LedgerPage, (*READ, 403, 404)),
    ("get", "/admin/audit"): Op(200, m.DataList, (*READ, 403)),
    ("post", "/spicy-chat"): Op(200, m.ChatCompletion, (*CHARGED, 500, 502)),
    ("post", "/chat"): Op(200, m.ChatCompletion, (*CHARGED, 500, 502)),
    ("post", "/chat/completions"): Op(200, m.ChatCompletion, (*CHARGED, 500, 502)),
    ("post", "/messages"): Op(200, m.AnthropicMessage, (*CHARGED, 500, 502)),
    ("post", "/images/generate"): Op(200, m.ImageResultDoc, (*CHARGED, 500, 502)),
    ("post", "/images/edit"): Op(200, m.ImageResultDoc, (*CHARGED, 500, 502)),
    ("post", "/images/generations"): Op(200, m.OpenAIImages, (*CHARGED, 500, 502)),
    ("post", "/images/edits"): Op(200, m.OpenAIImages, (*CHARGED, 500, 502)),
    ("post", "/audio/speech"): Op(
        200, None, (*CHARGED, 500), "audio/mpeg", "The speech audio (mp3 or wav)"
    ),
    ("post", "/audio/transcriptions"): Op(200, None, (*CHARGED, 500), "application/json"),
    ("post", "/videos/generate"): Op(202, m.JobAccepted, CHARGED),
    ("post", "/audio/generate"): Op(202, m.JobAccepted, (*CHARGED, 500)),
    ("post", "/3d/generate"): Op(202, m.JobAccepted, CHARGED),
    ("get", "/jobs"): Op(200, m.JobPage, READ),
    ("get", "/jobs/{job_id}"): Op(200, m.JobDoc, (*READ, 404)),
    ("post", "/jobs/{job_id}/cancel"): Op(200, m.JobDoc, (*READ, 404, 409, 503)),
    ("get", "/jobs/{job_id}/deliveries"): Op(200, m.DeliveryList, (*READ, 404)),
    ("get", "/webhooks/secret"): Op(200, m.WebhookSecret, AUTH),
    ("post", "/webhooks/secret/rotate"): Op(200, m.WebhookSecret, AUTH),
    ("get", "/health"): Op(200, m.Health, ()),
}
# An operation missing from OPS (a route added later) is still documented honestly: any
# JSON object, and the errors every authenticated route can return.
DEFAULT_OP = Op(200, m.Doc, (*BODY, 403, 404))
STATUS_OK = {"get": 200, "head": 200, "delete": 200, "patch": 200, "put": 200, "post": 200}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for ``statuses`` in the Hypereal error shape."""
    return {
        status: {"model": ErrorBody, "description": DESCRIPTIONS[status]} for status in statuses
    }


FILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The file, with the content type its bytes are",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    **error_responses(400, 403, 404),
}


def _bare(path: str) -> str:
    for prefix in PREFIXES:
        if path.startswith(prefix + "/"):
            return path[len(prefix) :]
    return path


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _add_models(schemas: dict[str, Any], models: Iterable[type[BaseModel]]) -> None:
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in schema.pop("$defs", {}).items():
            schemas.setdefault(name, definition)
        schemas[model.__name__] = schema


def _error_schema(bare: str, status: int) -> dict[str, str]:
    if bare in OPENAI:
        return _ref("OpenAIErrorBody")
    if bare in ANTHROPIC:
        return _ref("AnthropicErrorBody")
    return _ref("InsufficientCreditsBody" if status == 402 else "ErrorBody")


def _responses(bare: str, method: str, op: Op) -> dict[str, Any]:
    status = op.status if op is not DEFAULT_OP else STATUS_OK.get(method, 200)
    if op.body is not None:
        content: dict[str, Any] = {op.content: {"schema": _ref(op.body.__name__)}}
    elif op.content == "audio/mpeg":
        binary = {"schema": {"type": "string", "format": "binary"}}
        content = {"audio/mpeg": binary, "audio/wav": binary}
    else:  # transcriptions: JSON, or text/srt/vtt as plain text
        content = {
            "application/json": {"schema": {"type": "object"}},
            "text/plain": {"schema": {"type": "string"}},
        }
    if bare in ("/chat", "/spicy-chat", "/chat/completions", "/messages"):
        content["text/event-stream"] = {"schema": {"type": "string"}}
    responses: dict[str, Any] = {str(status): {"description": op.description, "content": content}}
    if bare in ("/videos/generate", "/audio/generate", "/3d/generate"):
        responses["200"] = {
            "description": "A synchronous model (or Prefer: wait=N) finished in time",
            "content": {"application/json": {"schema": _ref("JobDoc")}},
        }
    for code in sorted(set(op.errors)):
        schema = {"schema": _error_schema(bare, code)}
        responses[str(code)] = {
            "description": DESCRIPTIONS[code],
            "content": {"application/json": schema},
        }
    return responses


def build_openapi(app: FastAPI, catalogue: Catalogue) -> dict[str, Any]:
    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
        tags=[
            {"name": "account", "description": "Balance and ledger"},
            {"name": "chat", "description": "LLM chat (Hypereal, OpenAI and Anthropic shapes)"},
            {"name": "images", "description": "Synchronous image generation and edits"},
            {"name": "jobs", "description": "Async video, audio and 3D jobs"},
        ],
    )
    components = schema.setdefault("components", {})
    schemas: dict[str, Any] = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    _add_models(schemas, _all_doc_models())
    components["securitySchemes"] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key: `Authorization: Bearer ck_...`",
        }
    }
    bodies = request_bodies(catalogue, schemas)
    paths = schema.setdefault("paths", {})
    if "/health" not in paths:  # the ops router keeps its routes out of the schema
        paths["/health"] = {
            "get": {"tags": ["health"], "summary": "Liveness", "operationId": "health"}
        }
    for path, item in schema.get("paths", {}).items():
        bare = _bare(path)
        for method, operation in item.items():
            if bare == "/files/{key}":  # the route's own table (FILE_RESPONSES): bytes
                operation["responses"].pop("422", None)
                operation["responses"]["200"]["content"].pop("application/json", None)
            else:
                op = OPS.get((method, bare), DEFAULT_OP)
                operation["responses"] = _responses(bare, method, op)
            if bare in PUBLIC:
                operation["security"] = []
            else:
                operation["security"] = [{"bearer": []}]
            body = bodies.get((method, bare))
            if body is not None:
                operation["requestBody"] = body
    return schema


def _all_doc_models() -> list[type[BaseModel]]:
    found = [value for value in vars(m).values() if isinstance(value, type)]
    return [model for model in found if issubclass(model, BaseModel) and model is not BaseModel]


def _swagger_static() -> Path:
    spec = importlib.util.find_spec("swagger_ui")  # the files only: the package isn't imported
    if spec is None or spec.origin is None:
        raise RuntimeError("swagger-ui-py is not installed")
    return Path(spec.origin).parent / "static"


DOCS_FILES: Mapping[str, str] = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}


def install_openapi(app: FastAPI, catalogue: Catalogue) -> None:
    """Replace FastAPI's schema by :func:`build_openapi` and serve ``/docs`` locally."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, catalogue)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    static = _swagger_static()

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_json() -> dict[str, Any]:
        return openapi()

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url="/docs/static/swagger-ui-bundle.js",
            swagger_css_url="/docs/static/swagger-ui.css",
            swagger_favicon_url="/docs/static/favicon-32x32.png",
            swagger_ui_parameters={"persistAuthorization": True},
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/docs/static/{name}", include_in_schema=False)
    async def docs_static(name: str) -> FileResponse:
        media_type = DOCS_FILES.get(name)
        if media_type is None:
            raise NotFound("File not found")
        return FileResponse(
            static / name,
            media_type=media_type,
            headers={"Cache-Control": "public, max-age=86400"},
        )
