"""The model catalogue with prices and availability (OpenAI-compatible list shape)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from hypereal.api.deps import PrincipalDep, ServicesDep
from hypereal.domain.catalogue import ModelPattern, ModelSpec
from hypereal.domain.errors import NotFound
from hypereal.services import Services

router = APIRouter(tags=["models"])


def model_json(spec: ModelSpec, services: Services) -> dict[str, Any]:
    available, backend, reason = services.backends.availability(spec)
    data: dict[str, Any] = {
        "id": spec.slug,
        "object": "model",
        "owned_by": "hypereal",
        "slug": spec.slug,
        "name": spec.name,
        "modality": spec.modality,
        "description": spec.description,
        "params": [p.public() for p in spec.params],
        "price": spec.price.public(),
        "available": available,
        "backend": backend,
    }
    if spec.sync:
        data["response"] = {"mode": "sync", "syncSeconds": spec.sync_seconds}
    if spec.context_tokens:
        data["contextTokens"] = spec.context_tokens
    if reason:
        data["unavailableReason"] = reason
    return data


def pattern_json(pattern: ModelPattern, services: Services) -> dict[str, Any]:
    """A pattern entry, listed as such: ``id`` is the pattern (``claude-*``), ``pattern``
    true, ``upstreamModel`` the id sent upstream (``{slug}``: the requested slug)."""
    data = model_json(pattern.spec_for(pattern.pattern), services)
    data.update(pattern=True, upstreamModel=pattern.upstream_model)
    if pattern.base.pass_through is not None:
        data["price"] = {"kind": "pass_through", **pattern.base.pass_through.public()}
    return data


@router.get("/models")
async def list_models(_: PrincipalDep, services: ServicesDep) -> dict[str, Any]:
    """Every model: modality, parameters, price, and whether a backend serves it here."""
    # Creating a backend may import a heavy library the first time: keep it off the loop.
    catalogue = services.catalogue
    models = await run_in_threadpool(
        lambda: (
            [model_json(spec, services) for spec in catalogue.models.values()]
            + [pattern_json(pattern, services) for pattern in catalogue.patterns]
        )
    )
    return {"object": "list", "data": models, "defaults": services.catalogue.defaults}


@router.get("/models/{slug}")
async def get_model(slug: str, _: PrincipalDep, services: ServicesDep) -> dict[str, Any]:
    spec = services.catalogue.find(slug)
    if spec is None:
        raise NotFound(f"Model not found: {slug}")
    return await run_in_threadpool(model_json, spec, services)
