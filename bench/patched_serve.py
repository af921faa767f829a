"""``hypereal serve`` with candidate hot-path fixes applied as patches at start-up, so that their
effect can be measured before anyone changes src/ (see bench/experiments.py). Bench only.

``python -m bench.patched_serve --port P --patches auth-cache,no-access-log``

Two earlier candidates were measured here and then adopted in src/ (async FastAPI dependencies,
an upstream pool that keeps its connections); the two left are measured but not adopted:

- ``auth-cache``: API key lookups cached for 5 s per key hash. Not adopted: a revocation must
  take effect on the next request, in every API process, and a cache cannot promise that.
- ``no-access-log``: uvicorn without its per-request access log line. Not adopted: operators
  expect the access log.
"""

from __future__ import annotations

import argparse
import time
from typing import Any


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
