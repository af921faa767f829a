"""How many jobs of a model may run at once: the catalogue's limit, else the serving backend's."""

from __future__ import annotations

import pytest

from hypereal.backends.base import BackendUnavailable
from hypereal.backends.registry import UPSTREAM_CONCURRENCY, BackendRegistry
from hypereal.domain.catalogue import Binding, ModelSpec, PriceRule


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
        "fal-bad": {"type": "fal", "api_key": "k", "concurrency": 0},
    }
)


def test_an_upstream_backend_runs_many_jobs_of_a_model_at_once() -> None:
    assert REGISTRY.concurrency(video_model("fal")) == UPSTREAM_CONCURRENCY == 16


def test_a_local_backend_runs_one_at_a_time() -> None:
    assert REGISTRY.concurrency(video_model("local-camera-motion")) == 1


def test_the_instance_option_and_then_the_catalogue_win() -> None:
    assert REGISTRY.concurrency(video_model("fal-small")) == 2
    assert REGISTRY.concurrency(video_model("fal-small", concurrency=5)) == 5
    assert REGISTRY.concurrency(video_model("fal", concurrency=1)) == 1


def test_the_first_available_binding_decides() -> None:
    # Unconfigured and broken bindings are skipped, as when the job is run.
    assert REGISTRY.concurrency(video_model("nowhere", "fal-bad", "fal-small")) == 2
    assert REGISTRY.concurrency(video_model("nowhere")) == 1  # unavailable: 503 anyway


def test_a_bad_concurrency_option_makes_the_instance_unavailable() -> None:
    with pytest.raises(BackendUnavailable, match="`concurrency` must be a whole number"):
        REGISTRY.instance("fal-bad")
