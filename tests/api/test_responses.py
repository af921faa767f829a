"""``FastJSONResponse`` (orjson) against Starlette's ``JSONResponse``: the same bytes for
what the routes answer with; Starlette's rendering (and its errors) for what orjson would
write differently or refuses."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.responses import JSONResponse

from hypereal.api.responses import FastJSONResponse

SAME = [
    {"id": "chatcmpl-1", "object": "chat.completion", "created": 1765000000},
    {"choices": [{"index": 0, "message": {"role": "assistant", "content": None}}]},
    {"text": 'quote " backslash \\ slash / newline \n tab \t nul \x00 us \x1f del \x7f'},
    {"unicode": "é 😀 \u2028 \u2029 中文"},
    {"floats": [0.1, 1.5, -0.0, 1e16, 1e300, 5e-324, 123456789.123, 2.0**70]},
    {"ints": [0, -1, 2**63 - 1, -(2**63)], "bools": [True, False], "none": None},
    [],
    {},
    "plain string",
]


@pytest.mark.parametrize("content", SAME)
def test_the_same_bytes_as_starlette(content: Any) -> None:
    assert FastJSONResponse(content).body == JSONResponse(content).body


def test_a_small_negative_exponent_is_the_same_number() -> None:
    fast = FastJSONResponse({"x": 1e-7}).body
    assert json.loads(fast) == json.loads(JSONResponse({"x": 1e-7}).body) == {"x": 1e-7}


@pytest.mark.parametrize(
    "content",
    [{1: "int key"}, {"big": 2**64}, {"nested": {(1, 2): "tuple key"}}],
    ids=["int-key", "big-int", "tuple-key"],
)
def test_what_orjson_refuses_is_rendered_as_starlette_renders_it(content: Any) -> None:
    try:
        expected: bytes | type[Exception] = JSONResponse(content).body
    except (TypeError, ValueError) as exc:
        expected = type(exc)
    if isinstance(expected, bytes):
        assert FastJSONResponse(content).body == expected
    else:
        with pytest.raises(expected):
            FastJSONResponse(content)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_nonfinite_float_is_refused_as_starlette_refuses_it(value: float) -> None:
    with pytest.raises(ValueError):
        JSONResponse({"x": [value]})
    with pytest.raises(ValueError):
        FastJSONResponse({"x": [value]})
    # A null that is a null stays one.
    assert FastJSONResponse({"x": None, "y": 1.0}).body == b'{"x":null,"y":1.0}'
