"""The catalogue on its own (``domain/catalogue.py``): parsing a document (templates,
defaults, the errors an operator's file can make), looking models up, and checking a
request's parameters against a model's."""

from __future__ import annotations

from typing import Any

import pytest

from hypereal.domain.catalogue import load_catalogue, parse_catalogue, validate_params
from hypereal.domain.errors import BadRequest, ModelRequired, UnsupportedModel

DOCUMENT: dict[str, Any] = {
    "defaults": {"video": "clip"},
    "templates": {
        "video": {
            "modality": "video",
            "price": {"credits_per_second": 2},
            "params": [
                {"name": "prompt", "type": "string", "required": True, "max_length": 20},
                {"name": "duration", "type": "integer", "default": 5, "minimum": 1, "maximum": 10},
                {"name": "resolution", "type": "string", "choices": ["480p", "720p"]},
                {"name": "image", "type": "media"},
                {"name": "loop", "type": "boolean"},
                {"name": "strength", "type": "number", "minimum": 0, "maximum": 1},
            ],
            "bindings": [{"backend": "fal", "upstream_model": "vendor/clip"}],
        }
    },
    "models": [
        {"slug": "clip", "template": "video", "name": "Clip", "concurrency": 2},
        {"slug": "picture", "modality": "image", "price": {"credits": 3}},
        {"slug": "speech", "modality": "audio", "price": {"credits": 1}, "response": "sync"},
    ],
}


def test_a_template_gives_a_model_its_fields_and_the_entry_wins() -> None:
    catalogue = parse_catalogue(DOCUMENT)
    clip = catalogue.models["clip"]
    assert (clip.name, clip.modality, clip.concurrency) == ("Clip", "video", 2)
    assert [p.name for p in clip.params][:2] == ["prompt", "duration"]
    assert clip.bindings[0].backend == "fal" and clip.bindings[0].upstream_model == "vendor/clip"
    assert clip.price.kind == "per_second" and clip.price.credits_per_second == 2
    assert catalogue.models["speech"].sync and catalogue.models["speech"].sync_seconds > 0
    assert not clip.sync


def test_lookups_by_slug_modality_and_default() -> None:
    catalogue = parse_catalogue(DOCUMENT)
    assert catalogue.get("clip", "video").slug == "clip"
    assert catalogue.get(None, "video").slug == "clip"  # the modality's default
    assert catalogue.get("picture", ("image", "image-edit")).slug == "picture"
    with pytest.raises(ModelRequired):
        catalogue.get("", "image")  # no default image model
    with pytest.raises(UnsupportedModel):
        catalogue.get("picture", "video")  # another modality
    with pytest.raises(UnsupportedModel):
        catalogue.get("nothing", "video")
    assert catalogue.find("speech") is not None and catalogue.find("nothing") is None
    assert [m.slug for m in catalogue.of_modality("image")] == ["picture"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"models": [{"slug": "x", "modality": "hologram"}]}, "modality must be one of"),
        ({"models": [{"slug": "x", "modality": "image"}]}, "price needs credits"),
        ({"models": [{"slug": "x", "template": "nope"}]}, "unknown template 'nope'"),
        ({"defaults": {"video": "missing"}}, "default video model 'missing'"),
        (
            {"models": [{"slug": "x", "template": "video", "concurrency": 0}]},
            "concurrency must be a whole number",
        ),
        (
            {
                "models": [
                    {"slug": "x", "modality": "image", "price": {"credits": 1}, "response": "sync"}
                ]
            },
            "applies to job models only",
        ),
        (
            {
                "models": [
                    {"slug": "x", "template": "video", "params": [{"name": "p", "type": "x"}]}
                ]
            },
            "type must be one of",
        ),
    ],
)
def test_a_bad_document_names_the_model_and_the_problem(
    change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        parse_catalogue({**DOCUMENT, **change})


def test_the_shipped_catalogue_loads_and_its_defaults_exist() -> None:
    catalogue = load_catalogue()
    assert catalogue.models
    for modality, slug in catalogue.defaults.items():
        assert catalogue.models[slug].modality == modality


def test_parameters_get_their_defaults_and_unknown_fields_are_dropped() -> None:
    clip = parse_catalogue(DOCUMENT).models["clip"]
    cleaned = validate_params(clip, {"prompt": "a cat", "duration": 3.0, "extra": 1, "loop": None})
    assert cleaned == {"prompt": "a cat", "duration": 3}  # 3.0 is the integer 3


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "Missing required field 'input.prompt'"),
        ({"prompt": 5}, "'input.prompt': must be a string"),
        ({"prompt": "x" * 21}, "must be at most 20 characters"),
        ({"prompt": "x", "duration": 11}, "'input.duration': must be <= 10"),
        ({"prompt": "x", "duration": 2.5}, "must be an integer"),
        ({"prompt": "x", "duration": True}, "must be an integer"),
        ({"prompt": "x", "duration": float("inf")}, "must be a finite number"),
        ({"prompt": "x", "resolution": "4k"}, "must be one of: 480p, 720p"),
        ({"prompt": "x", "loop": "yes"}, "must be true or false"),
        ({"prompt": "x", "strength": -0.1}, "must be >= 0"),
        ({"prompt": "\ud800"}, "not valid Unicode text"),
    ],
)
def test_a_bad_parameter_is_a_400_naming_the_field(values: dict[str, Any], message: str) -> None:
    clip = parse_catalogue(DOCUMENT).models["clip"]
    with pytest.raises(BadRequest, match=message):
        validate_params(clip, values, prefix="input.")
