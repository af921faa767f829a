"""The chat price rule: base_credits per message sent + the token cost in whole credits."""

from __future__ import annotations

import pytest

from hypereal.domain.catalogue import ModelSpec, load_catalogue
from hypereal.domain.pricing import chat_price


@pytest.fixture(scope="module")
def smollm() -> ModelSpec:
    return load_catalogue().models["smollm2-135m-instruct"]


def test_shipped_chat_model_has_the_spec_prices(smollm: ModelSpec) -> None:
    rule = smollm.price
    assert rule.kind == "per_token"
    assert (rule.base_credits, rule.input_usd_per_million, rule.output_usd_per_million) == (
        2,
        0.20,
        0.90,
    )
    assert rule.usd_per_credit == 0.01


def test_spec_example_one_message_costs_2(smollm: ModelSpec) -> None:
    # {"role": "user", "content": "Hello, how are you?"} and a short answer: "creditsUsed": 2.
    assert chat_price(smollm, 1, 36, 30) == 2
    # Also with the whole default max_tokens reserved: 4096 * $0.90/1M is under one credit.
    assert chat_price(smollm, 1, 36, 4096) == 2


def test_base_scales_with_the_messages_sent(smollm: ModelSpec) -> None:
    assert chat_price(smollm, 3, 100, 100) == 6
    assert chat_price(smollm, 10, 100, 100) == 20


@pytest.mark.parametrize(
    ("prompt", "completion", "credits"),
    [
        (50_000, 0, 2 + 1),  # exactly $0.01: one whole credit (no float rounding down to 0)
        (49_999, 0, 2 + 0),  # just under a credit: the fraction is not charged
        (0, 11_112, 2 + 1),  # $0.0100008
        (0, 100_000, 2 + 9),  # $0.09
        (8192, 32768, 2 + 3),  # $0.0016384 + $0.0294912
        (1_000_000, 0, 2 + 20),  # $0.20
        (0, 1_000_000, 2 + 90),  # $0.90
        (1_000_000, 1_000_000, 2 + 110),
    ],
)
def test_token_cost_adds_whole_credits(
    smollm: ModelSpec, prompt: int, completion: int, credits: int
) -> None:
    assert chat_price(smollm, 1, prompt, completion) == credits


def test_non_token_models_keep_their_fixed_price() -> None:
    image = load_catalogue().models["flux-1-schnell"]
    assert chat_price(image, 3, 1000, 1000) == image.price.credits
