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


def chat_price(spec: ModelSpec, messages: int, prompt_tokens: int, completion_tokens: int) -> int:
    """Credits for a chat turn: ``base_credits`` per message of the conversation sent
    (``messages``), plus the token cost in whole credits (the fraction of a credit below one
    is not charged):

        base_credits * messages + floor((prompt * input_usd + completion * output_usd)
                                        / 1M / usd_per_credit)

    With the spec's prices (2 credits, $0.20 / $0.90 per 1M tokens, $0.01 a credit) one short
    message costs 2, three cost 6; a token cost of $0.01 or more adds whole credits.
    """
    rule = spec.price
    if rule.kind != "per_token":
        return price(spec, {})
    assert rule.base_credits is not None
    usd = (
        prompt_tokens * (rule.input_usd_per_million or 0.0)
        + completion_tokens * (rule.output_usd_per_million or 0.0)
    ) / 1_000_000
    # Round to 9 places first so a cost of exactly 20 credits is 20, not 19.999999999999996.
    return rule.base_credits * messages + math.floor(round(usd / rule.usd_per_credit, 9))
