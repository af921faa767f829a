"""A verifying webhook receiver for scenario 4 (a raw ASGI app in its own process).

Every POST is checked with ``standardwebhooks`` against ``--secret``. A fraction
``--fail-rate`` of the valid deliveries is answered 500 (seeded, so reproducible); the rest
200. ``GET /stats`` answers the counts: received, injected 500s, delivered (unique
``webhook-id`` answered 2xx), duplicates (a ``webhook-id`` answered 2xx again), invalid
signatures, and the time of the last 2xx. Run:
``python -m bench.receiver --port P --secret whsec_... [--fail-rate 0.2] [--seed 1]``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

import uvicorn
from standardwebhooks import Webhook


def make_app(secret: str, fail_rate: float, seed: int) -> Any:
    verifier = Webhook(secret)
    rng = random.Random(seed)
    stats: dict[str, Any] = {
        "received": 0,
        "injected_500": 0,
        "delivered": 0,
        "duplicates": 0,
        "invalid_signatures": 0,
        "first_ok_at": None,
        "last_ok_at": None,
    }
    seen: set[str] = set()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] == "GET":
            body = json.dumps(stats).encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})
            return
        parts = []
        while True:
            message = await receive()
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        payload = b"".join(parts)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        stats["received"] += 1
        status = 200
        try:
            verifier.verify(payload, headers)
        except Exception:
            stats["invalid_signatures"] += 1
            status = 400
        else:
            if rng.random() < fail_rate:
                stats["injected_500"] += 1
                status = 500
            else:
                message_id = headers.get("webhook-id", "")
                if message_id in seen:
                    stats["duplicates"] += 1
                else:
                    seen.add(message_id)
                    stats["delivered"] += 1
                now = time.time()
                stats["first_ok_at"] = stats["first_ok_at"] or now
                stats["last_ok_at"] = now
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--fail-rate", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    uvicorn.run(
        make_app(args.secret, args.fail_rate, args.seed),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )


if __name__ == "__main__":
    main()
