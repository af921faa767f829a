"""Credits for a request, from the model's price rule (1 credit = $0.01 by default)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from hypereal.domain.catalogue import ModelSpec


def price(spec: ModelSpec, params: Mapping[str, Any]) -> int:
    """Credits for one fixed-price or per-second request with validated ``params``."""
    rule = spec.price
    if rule.kind == "per_second":
        duration = float(params.get("duration") or 0)
        assert rule.credits_per_second is not None
        # Round to 6 places first so 13.8 * 5 is 69, not 69.00000000000001 -> 70.
        return max(rule.minimum, math.ceil(round(rule.credits_per_second * duration, 6)))
    if rule.kind == "per_token":
        raise ValueError(f"{spec.slug} is priced per token; use chat_price")
    assert rule.credits is not None
    return rule.credits


def chat_price(spec: ModelSpec, prompt_tokens: int, completion_tokens: int) -> int:
    """Credits for a chat turn: the base per message plus the token cost, rounded up."""
    rule = spec.price
    if rule.kind != "per_token":
        return price(spec, {})
    assert rule.base_credits is not None
    usd = (
        prompt_tokens * (rule.input_usd_per_million or 0.0)
        + completion_tokens * (rule.output_usd_per_million or 0.0)
    ) / 1_000_000
    return rule.base_credits + math.ceil(round(usd / rule.usd_per_credit, 9))
