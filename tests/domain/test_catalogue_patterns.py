"""Wildcard catalogue entries: a slug no model has is matched against the patterns in order,
becomes a model bound to the pattern's backend with the slug (or a template of it) as the
upstream id, is remembered per slug, and exact slugs always win; bad entries are refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hypereal.backends.registry import BackendRegistry
from hypereal.domain import catalogue as catalogue_module
from hypereal.domain.catalogue import PassThrough, load_catalogue, parse_catalogue
from hypereal.domain.errors import UnsupportedModel
from hypereal.domain.model_backends import check_patterns
from hypereal.services import build_services
from hypereal.settings import Settings

CHAT_PRICE = {"base_credits": 1, "input_usd_per_million": 1.0, "output_usd_per_million": 2.0}


def with_patterns(*patterns: dict[str, Any]) -> catalogue_module.Catalogue:
    return load_catalogue(patterns=list(patterns))


def test_a_pattern_serves_unknown_slugs_with_the_slug_as_upstream_model() -> None:
    catalogue = with_patterns(
        {
            "pattern": "claude-*",
            "backend": "openrouter",
            "upstream_model": "anthropic/{slug}",
            "price": CHAT_PRICE,
        },
        {"pattern": "*", "backend": "hypereal", "price": CHAT_PRICE},
    )
    spec = catalogue.get("claude-haiku-9", "chat")
    assert (spec.slug, spec.modality, spec.pattern) == ("claude-haiku-9", "chat", "claude-*")
    (binding,) = spec.bindings
    assert (binding.backend, binding.upstream_model) == ("openrouter", "anthropic/claude-haiku-9")
    assert spec.price.base_credits == 1
    other = catalogue.get("mistral-large", "chat")
    assert other.pattern == "*" and other.bindings[0].upstream_model == "mistral-large"
    # An exact slug always wins over a pattern that would match it.
    assert catalogue.get("claude-sonnet-4-6", "chat").pattern is None


def test_patterns_are_per_modality_and_a_miss_is_still_a_400() -> None:
    catalogue = with_patterns({"pattern": "gpt-*", "backend": "openai", "price": CHAT_PRICE})
    with pytest.raises(UnsupportedModel):
        catalogue.get("gpt-unknown", "image")
    with pytest.raises(UnsupportedModel):
        catalogue.get("kling-3-0-i2v-pro", "video")
    assert catalogue.find("gpt-unknown") is not None
    assert catalogue.find("nothing-like-it") is None


def test_a_media_pattern_takes_a_template_with_its_params() -> None:
    catalogue = with_patterns(
        {
            "pattern": "flux-*",
            "backend": "fal",
            "upstream_model": "fal-ai/{slug}",
            "template": "image-t2i",
            "price": {"credits": 7},
        }
    )
    spec = catalogue.get("flux-9-ultra", ("image", "image-edit"))
    assert spec.modality == "image" and spec.param("prompt") is not None
    assert spec.bindings[0].upstream_model == "fal-ai/flux-9-ultra"


def test_lookups_are_remembered_and_the_memory_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    catalogue = with_patterns({"pattern": "x-*", "backend": "hypereal", "price": CHAT_PRICE})
    first = catalogue.get("x-1", "chat")
    assert catalogue.get("x-1", "chat") is first  # the same object: not built again
    monkeypatch.setattr(catalogue_module, "PATTERN_CACHE_SIZE", 8)
    for index in range(50):
        catalogue.get(f"x-{index}", "chat")
    assert len(catalogue._matched) <= 8
    with pytest.raises(UnsupportedModel):  # no model id is this long: not matched, not kept
        catalogue.get("x-" + "a" * 10_000, "chat")
    assert all(len(slug) < 300 for slug, _ in catalogue._matched)


def test_pass_through_reserves_the_maximum_and_charges_credits_used_times_markup() -> None:
    catalogue = with_patterns(
        {
            "pattern": "*",
            "backend": "hypereal",
            "template": "image-t2i",
            "modality": "image",
            "pass_through": {"max_credits": 40, "markup": 1.5},
        }
    )
    spec = catalogue.get("brand-new-image-model", "image")
    assert spec.pass_through == PassThrough(max_credits=40, markup=1.5)
    assert spec.price.credits == 40
    assert spec.pass_through.charge(10) == 15
    assert spec.pass_through.charge(7) == 11  # rounded up
    assert spec.pass_through.charge(1000) == 40  # never more than reserved
    assert spec.pass_through.charge(None) == 40


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"backend": "hypereal", "price": {"credits": 1}}, "needs a `pattern`"),
        ({"pattern": "a-*", "price": {"credits": 1}}, "needs the `backend`"),
        ({"pattern": "a-*", "backend": "hypereal"}, "price needs"),
        ({"pattern": "a-*", "backend": "hypereal", "template": "nope"}, "unknown template"),
        (
            {"pattern": "a-*", "backend": "hypereal", "pass_through": {"max_credits": 0}},
            "max_credits",
        ),
        (
            {
                "pattern": "a-*",
                "backend": "hypereal",
                "pass_through": {"max_credits": 5, "markup": -1},
            },
            "markup",
        ),
    ],
)
def test_bad_pattern_entries_are_refused(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_catalogue({"models": [], "patterns": [entry]})


def test_pass_through_needs_a_hosted_hypereal_backend() -> None:
    catalogue = with_patterns(
        {"pattern": "*", "backend": "openai", "pass_through": {"max_credits": 5}}
    )
    with pytest.raises(ValueError, match="type 'hypereal'"):
        check_patterns(catalogue, BackendRegistry({"openai": {"type": "openai"}}))
    hosted = with_patterns(
        {"pattern": "*", "backend": "reseller", "pass_through": {"max_credits": 5}}
    )
    check_patterns(hosted, BackendRegistry({"reseller": {"type": "hypereal"}}))


def test_an_operator_catalogue_file_adds_patterns(tmp_path: Path) -> None:
    override = tmp_path / "catalogue.toml"
    override.write_text(
        '[[patterns]]\npattern = "gemini-*"\nbackend = "openrouter"\n'
        'upstream_model = "google/{slug}"\n'
        "price = { base_credits = 1, input_usd_per_million = 1.0, output_usd_per_million = 1.0 }\n"
    )
    catalogue = load_catalogue(override)
    assert catalogue.get("gemini-9-pro", "chat").bindings[0].upstream_model == (
        "google/gemini-9-pro"
    )


def test_the_settings_file_names_patterns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "hypereal.toml"
    config.write_text(
        '[backends.hypereal]\ntype = "hypereal"\napi_key = "ck_x"\n\n'
        '[[model_patterns]]\npattern = "*"\ntemplate = "video-i2v"\nbackend = "hypereal"\n'
        "pass_through = { max_credits = 400, markup = 1.2 }\n\n"
        '[[model_patterns]]\npattern = "*"\nbackend = "hypereal"\n'
        "pass_through = { max_credits = 100, markup = 1.2 }\n"
    )
    monkeypatch.setenv("HYPEREAL_CONFIG", str(config))
    settings = Settings(data_dir=tmp_path / "data")
    services = build_services(settings)
    video = services.catalogue.get("veo-4-i2v", "video")
    chat = services.catalogue.get("some-new-llm", "chat")
    assert video.pass_through == PassThrough(max_credits=400, markup=1.2)
    assert video.param("image") is not None
    assert chat.pass_through == PassThrough(max_credits=100, markup=1.2)
    assert services.backends.resolve(chat).upstream_model == "some-new-llm"
