"""The backend instances from settings, and the models bound to them: which instance serves a
model, and how many of its jobs may run at once (the catalogue's limit, else the backend's)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hypereal.backends.base import BackendUnavailable
from hypereal.backends.options import OPTIONS, BackendConfigError
from hypereal.backends.registry import BACKEND_TYPES, UPSTREAM_CONCURRENCY, BackendRegistry
from hypereal.domain.catalogue import Binding, ModelSpec, PriceRule
from hypereal.domain.errors import ModelUnavailable
from hypereal.domain.model_backends import ModelBackends


def video_model(*backends: str, concurrency: int | None = None) -> ModelSpec:
    return ModelSpec(
        slug="m",
        name="m",
        modality="video",
        description="",
        price=PriceRule(credits=1),
        params=(),
        bindings=tuple(Binding(backend=b) for b in backends),
        concurrency=concurrency,
    )


REGISTRY = BackendRegistry(
    {
        "fal": {"type": "fal", "api_key": "k"},
        "fal-small": {"type": "fal", "api_key": "k", "concurrency": 2},
        # Well-formed options, but nothing to serve with on this host.
        "llama-missing": {"type": "llama_cpp", "model_path": "/nonexistent/model.gguf"},
    }
)
BACKENDS = ModelBackends(REGISTRY)


def test_an_upstream_backend_runs_many_jobs_of_a_model_at_once() -> None:
    assert BACKENDS.concurrency(video_model("fal")) == UPSTREAM_CONCURRENCY == 16


def test_a_local_backend_runs_one_at_a_time() -> None:
    assert BACKENDS.concurrency(video_model("local-camera-motion")) == 1


def test_the_instance_option_and_then_the_catalogue_win() -> None:
    assert BACKENDS.concurrency(video_model("fal-small")) == 2
    assert BACKENDS.concurrency(video_model("fal-small", concurrency=5)) == 5
    assert BACKENDS.concurrency(video_model("fal", concurrency=1)) == 1


def test_the_first_configured_binding_decides_without_building_it() -> None:
    assert BACKENDS.concurrency(video_model("nowhere", "fal-small", "fal")) == 2
    assert BACKENDS.concurrency(video_model("nowhere")) == 1  # unavailable: 503 anyway
    assert "fal-small" not in REGISTRY._instances  # a configuration question builds nothing


def test_a_binding_whose_backend_failed_to_load_is_skipped() -> None:
    with pytest.raises(BackendUnavailable, match="does not exist"):
        REGISTRY.instance("llama-missing")
    assert BACKENDS.concurrency(video_model("llama-missing", "fal-small")) == 2


@pytest.mark.parametrize(
    ("config", "line"),
    [
        (
            {"type": "fall", "api_key": "k"},
            "backend 'b': option 'type': unknown backend type 'fall', did you mean 'fal'?",
        ),
        (
            {"type": "fal", "api_key": "k", "timout": 5},
            "backend 'b': option 'timout': unknown option, did you mean 'timeout'?",
        ),
        ({"type": "replicate"}, "backend 'b': option 'api_key': required for type 'replicate'"),
        ({"type": "fal", "api_key": "k", "concurrency": 0}, "backend 'b': option 'concurrency'"),
        ({"type": "fal", "api_key": 5}, "backend 'b': option 'api_key': Input should be a"),
        ({"type": "image_ops", "max_images": True}, "backend 'b': option 'max_images'"),
        ({"type": "diffusers_video"}, "backend 'b': option 'weights_dir': required"),
    ],
)
def test_a_bad_backend_setting_is_refused_when_the_registry_is_built(
    config: dict[str, object], line: str
) -> None:
    with pytest.raises(BackendConfigError) as refused:
        BackendRegistry({"b": config})
    message = str(refused.value)
    assert message.startswith(line) and "\n" not in message


def test_a_builtin_instance_takes_only_its_own_options() -> None:
    BackendRegistry({"local-image-ops": {"max_images": 2}})
    with pytest.raises(BackendConfigError, match="'local-image-ops': option 'voices'"):
        BackendRegistry({"local-image-ops": {"voices": {}}})


def test_every_backend_type_has_an_options_model() -> None:
    assert set(BACKEND_TYPES) <= set(OPTIONS)


def test_a_model_is_served_by_its_first_configured_binding_that_serves_it() -> None:
    assert BACKENDS.resolve(video_model("nowhere", "llama-missing", "fal")).instance == "fal"
    chat = replace(video_model("fal", "llama-missing"), modality="chat")
    with pytest.raises(ModelUnavailable) as refused:
        BACKENDS.resolve(chat)
    assert "backend 'fal' does not serve chat; backend 'llama-missing':" in refused.value.message
    with pytest.raises(ModelUnavailable, match=r"Configure one of its backends \(nowhere\)"):
        BACKENDS.resolve(video_model("nowhere"))
    assert BACKENDS.availability(video_model("nowhere"))[:2] == (False, None)
