"""``JSONResponse`` rendered by orjson.

Starlette renders with ``json.dumps``, which builds an encoder per call; orjson renders the
same compact UTF-8 JSON several times faster. The bytes are the same for what the routes
answer with (string keys, strings, integers, booleans, null, lists and finite floats), except
that a float with a negative exponent is written ``1e-7`` rather than ``1e-07`` (the same
number). What orjson refuses (a key that is not a string, an integer past 64 bits, a
subclass it does not know) and a NaN or an infinity (which ``json.dumps(allow_nan=False)``
refuses, and orjson would write as ``null``) go through Starlette's rendering, as before."""

from __future__ import annotations

import math
from typing import Any

import orjson
from fastapi.responses import JSONResponse


class FastJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        try:
            rendered = orjson.dumps(content)
        except (TypeError, orjson.JSONEncodeError):
            return super().render(content)
        if b"null" in rendered and _has_nonfinite(content):
            return super().render(content)  # raises, as Starlette's does
        return rendered


def _has_nonfinite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_nonfinite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_nonfinite(v) for v in value)
    return False
