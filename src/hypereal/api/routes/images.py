"""Synchronous image generation and editing (the spec's Generate Images section)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict

from hypereal.api.deps import PrincipalDep, ServicesDep
from hypereal.api.idempotency import idempotent
from hypereal.api.responses import FastJSONResponse
from hypereal.domain import images
from hypereal.domain.errors import BadRequest
from hypereal.domain.keys import Principal
from hypereal.services import Services

router = APIRouter(tags=["images"])


class ImageBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: Any = None
    model: str | None = None
    size: Any = None
    aspect_ratio: Any = None
    output_format: Any = None
    image: Any = None
    images: Any = None
    seed: Any = None
    mode: Any = None


async def _run(
    request: Request,
    body: ImageBody,
    principal: Principal,
    services: Services,
    modalities: tuple[str, ...],
) -> Response:
    if body.model is None and "model" in body.model_fields_set:
        raise BadRequest("Invalid value for 'model': must be a string")
    spec = services.catalogue.get(body.model, modalities)
    values = {
        "prompt": body.prompt,
        "size": body.size,
        "aspect_ratio": body.aspect_ratio,
        "output_format": body.output_format,
        "seed": body.seed,
        "mode": body.mode,
        "images": images.source_urls(body.image, body.images),
    }

    async def produce() -> Response:
        result = await images.generate(services.pipeline, principal.account_id, spec, values)
        return FastJSONResponse(
            {
                "created": result.created,
                "data": [{"url": url, "model": result.model} for url in result.urls],
                "resultId": result.result_id,
                "creditsUsed": result.credits,
            }
        )

    return await idempotent(request, principal, services, produce)


@router.post("/images/generate")
async def generate_images(
    request: Request, body: ImageBody, principal: PrincipalDep, services: ServicesDep
) -> Response:
    """Generate (or, with an edit model and ``image``/``images``, edit) an image."""
    return await _run(request, body, principal, services, ("image", "image-edit"))


@router.post("/images/edit")
async def edit_images(
    request: Request, body: ImageBody, principal: PrincipalDep, services: ServicesDep
) -> Response:
    """Edit images; ``model`` defaults to the catalogue's default edit model."""
    return await _run(request, body, principal, services, ("image-edit",))
