"""``hypereal serve`` with candidate hot-path fixes applied as patches at start-up, so that their
effect can be measured before anyone changes src/ (see bench/experiments.py). Bench only.

``python -m bench.patched_serve --port P --patches async-deps,upstream-pool,auth-cache,...``

- ``async-deps``: the FastAPI dependencies of hypereal.api.deps as ``async def`` (FastAPI runs a
  plain ``def`` dependency in the thread pool: two thread hops per request).
- ``upstream-pool``: the upstream httpx client keeps as many connections alive as it opens
  (httpx keeps 20 by default, so at concurrency 64 most upstream calls open a new one).
- ``auth-cache``: API key lookups cached for 5 s per key hash (a revocation then takes up to
  5 s to apply in another process).
- ``no-access-log``: uvicorn without its per-request access log line.
"""

from __future__ import annotations

import argparse
import time
from typing import Annotated, Any

# Module level: FastAPI resolves the patched dependencies' (string) annotations here.
from fastapi import Depends, Request


def patch_async_deps() -> None:
    import hypereal.api.deps as deps

    sync_services, sync_principal, sync_admin = (
        deps.get_services,
        deps.get_principal,
        deps.get_admin,
    )

    async def get_services(request: Request) -> Any:
        return sync_services(request)

    async def get_principal(request: Request) -> Any:
        return sync_principal(request)

    async def get_admin(principal: Annotated[Any, Depends(get_principal)]) -> Any:
        return sync_admin(principal)

    vars(deps).update(
        get_services=get_services,
        get_principal=get_principal,
        get_admin=get_admin,
        ServicesDep=Annotated[Any, Depends(get_services)],
        PrincipalDep=Annotated[Any, Depends(get_principal)],
        AdminDep=Annotated[Any, Depends(get_admin)],
    )


def patch_upstream_pool() -> None:
    import httpx

    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)

    class PooledTransport(httpx.AsyncHTTPTransport):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("limits", limits)
            super().__init__(*args, **kwargs)

    vars(httpx).update(AsyncHTTPTransport=PooledTransport)


def patch_auth_cache(ttl: float = 5.0) -> None:
    from hypereal.domain import keys

    original = keys.authenticate
    cache: dict[str | None, tuple[float, Any]] = {}

    async def authenticate(db: Any, authorization: str | None) -> Any:
        hit = cache.get(authorization)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        principal = await original(db, authorization)
        if len(cache) > 10_000:
            cache.clear()
        cache[authorization] = (now + ttl, principal)
        return principal

    vars(keys).update(authenticate=authenticate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--patches", default="")
    args = parser.parse_args()
    patches = {p for p in args.patches.split(",") if p}
    if "async-deps" in patches:
        patch_async_deps()
    if "upstream-pool" in patches:
        patch_upstream_pool()
    if "auth-cache" in patches:
        patch_auth_cache()

    import uvicorn

    from hypereal.app import create_app
    from hypereal.settings import Settings

    settings = Settings(port=args.port)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log="no-access-log" not in patches,
    )


if __name__ == "__main__":
    main()
