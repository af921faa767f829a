"""The OpenAPI schema tells the truth: a documented body and the real error bodies for every
operation, no 422, required fields marked, per-model input schemas from the catalogue, the
bearer scheme, /health and /files documented, and /docs served from local files."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from hypereal.services import Services

pytestmark = pytest.mark.asyncio


async def _schema(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    schema: dict[str, Any] = response.json()
    return schema


async def test_every_operation_documents_its_body_and_errors_and_no_422(
    client: httpx.AsyncClient,
) -> None:
    schema = await _schema(client)
    paths = schema["paths"]
    assert "/health" in paths and "/files/{key}" in paths
    assert "/v1/credits" in paths and "/api/v1/credits" in paths
    for path, item in paths.items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)
            success = [code for code in responses if code.startswith("2")]
            assert success, (method, path)
            for code in success:
                content = responses[code].get("content", {})
                assert content and all(c.get("schema") for c in content.values()), (path, code)
            if path in ("/health", "/files/{key}"):
                assert operation["security"] == []
                continue
            assert operation["security"] == [{"bearer": []}], (method, path)
            assert {"401", "429"} <= set(responses), (method, path)
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


async def test_errors_are_documented_in_the_shape_each_api_returns(
    client: httpx.AsyncClient,
) -> None:
    paths = (await _schema(client))["paths"]

    def error(path: str, status: str) -> str:
        content = paths[path]["post"]["responses"][status]["content"]
        ref: str = content["application/json"]["schema"]["$ref"]
        return ref.rsplit("/", 1)[1]

    assert error("/v1/videos/generate", "402") == "InsufficientCreditsBody"
    assert error("/v1/videos/generate", "400") == "ErrorBody"
    assert error("/v1/chat/completions", "402") == "OpenAIErrorBody"
    assert error("/api/v1/messages", "429") == "AnthropicErrorBody"
    for status in ("400", "401", "402", "403", "409", "413", "429", "503"):
        assert status in paths["/v1/videos/generate"]["post"]["responses"]


async def test_required_fields_and_per_model_inputs_come_from_the_catalogue(
    client: httpx.AsyncClient, services: Services
) -> None:
    schema = await _schema(client)
    schemas = schema["components"]["schemas"]
    assert schemas["ChatRequest"]["required"] == ["messages"]
    assert set(schemas["MessagesRequest"]["required"]) == {"model", "max_tokens", "messages"}
    sora = schemas["sora-2-i2v.input"]
    spec = services.catalogue.models["sora-2-i2v"]
    assert set(sora["properties"]) == {param.name for param in spec.params}
    assert sora["required"] == [param.name for param in spec.params if param.required]
    body = schema["paths"]["/v1/videos/generate"]["post"]["requestBody"]
    branches = body["content"]["application/json"]["schema"]["oneOf"]
    by_model = {branch["properties"]["model"]["enum"][0]: branch for branch in branches}
    assert set(by_model) == {spec.slug for spec in services.catalogue.of_modality("video")}
    assert by_model["sora-2-i2v"]["properties"]["input"] == {
        "$ref": "#/components/schemas/sora-2-i2v.input"
    }
    assert "model" in by_model["sora-2-i2v"]["required"]


async def test_docs_are_served_from_local_files_with_an_authorize_button(
    client: httpx.AsyncClient,
) -> None:
    page = await client.get("/docs")
    assert page.status_code == 200
    assert "cdn" not in page.text.lower() and "https://" not in page.text
    assert "/docs/static/swagger-ui-bundle.js" in page.text
    script = await client.get("/docs/static/swagger-ui-bundle.js")
    assert script.status_code == 200 and len(script.content) > 100_000
    assert script.headers["content-type"].startswith("text/javascript")
    css = await client.get("/docs/static/swagger-ui.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert (await client.get("/docs/static/../openapi.py")).status_code == 404
    assert (await client.get("/docs/static/index.html")).status_code == 404
