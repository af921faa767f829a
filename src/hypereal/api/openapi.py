"""Documentation-only models of the error bodies the API really returns, and the ``responses``
tables routes attach for the OpenAPI schema. Nothing here runs per request."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    """Every error: one sentence naming what is wrong (and the field, when one is)."""

    model_config = ConfigDict(
        extra="allow", json_schema_extra={"example": {"error": "Missing required field 'model'"}}
    )

    error: str = Field(description="What went wrong, naming the offending field")


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody, "description": f"Error {status}"} for status in statuses}


FILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The file, with the content type its bytes are",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    **error_responses(403, 404),
}
