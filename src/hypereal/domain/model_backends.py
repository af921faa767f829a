"""The catalogue's models bound to backend instances.

A model lists its bindings (instance name, the model's id there); it is served by the first
of them that is configured, loads and serves its modality, and answers 503 with the reasons
when none does. The instances come from the BackendRegistry (``backends/registry.py``),
which knows nothing of the catalogue.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hypereal.backends.base import BackendUnavailable
from hypereal.backends.registry import BackendRegistry
from hypereal.domain.catalogue import Catalogue, ModelSpec
from hypereal.domain.errors import ModelUnavailable

CONFIGURE_HINT = (
    "Configure one of its backends ({names}) in the server settings; see the README section "
    "'Backends'."
)


@dataclass(frozen=True)
class Resolved:
    """The backend instance serving a model, and the model's id on that backend."""

    backend: Any
    instance: str
    upstream_model: str | None


class ModelBackends:
    """Resolves catalogue models to the instances of a BackendRegistry."""

    def __init__(self, registry: BackendRegistry) -> None:
        self.registry = registry

    @property
    def configs(self) -> Mapping[str, Mapping[str, Any]]:
        """Every configured instance's settings, by name."""
        return self.registry.configs

    def instance(self, name: str) -> Any:
        """The instance named ``name``. Raises BackendUnavailable with the reason."""
        return self.registry.instance(name)

    def resolve(self, spec: ModelSpec) -> Resolved:
        """The first configured backend that can serve ``spec``.

        Raises ModelUnavailable (503) with the reasons when none can.
        """
        reasons: list[str] = []
        for binding in spec.bindings:
            if binding.backend not in self.registry.configs:
                continue
            try:
                backend = self.registry.serving(binding.backend, spec.modality)
            except BackendUnavailable as exc:
                reasons.append(str(exc))
                continue
            return Resolved(backend, binding.backend, binding.upstream_model)
        names = ", ".join(b.backend for b in spec.bindings) or "none listed"
        detail = "; ".join(reasons) if reasons else CONFIGURE_HINT.format(names=names)
        raise ModelUnavailable(f"Model {spec.slug} is not available on this server: {detail}")

    def concurrency(self, spec: ModelSpec) -> int:
        """How many jobs of ``spec`` may run at once, all workers together: the catalogue's
        ``concurrency`` when it sets one, else that of the first configured backend of the
        model not known to be unavailable (``BackendRegistry.concurrency``), else 1."""
        if spec.concurrency is not None:
            return spec.concurrency
        for binding in spec.bindings:
            limit = self.registry.concurrency(binding.backend)
            if limit is not None:
                return limit
        return 1

    def availability(self, spec: ModelSpec) -> tuple[bool, str | None, str | None]:
        """(available, serving instance, reason when unavailable) for model listings."""
        try:
            resolved = self.resolve(spec)
        except ModelUnavailable as exc:
            return False, None, exc.message
        return True, resolved.instance, None

    async def aclose(self) -> None:
        """Close every instance built so far."""
        await self.registry.aclose()


def check_patterns(catalogue: Catalogue, registry: BackendRegistry) -> None:
    """Refuse (ValueError) a pass-through pattern whose backend is not a hosted Hypereal
    instance: only that upstream answers with the ``creditsUsed`` the charge settles to."""
    for pattern in catalogue.patterns:
        if pattern.base.pass_through is None:
            continue
        config = registry.configs.get(pattern.backend, {})
        if config.get("type", pattern.backend) != "hypereal":
            raise ValueError(
                f"model pattern {pattern.pattern!r}: pass_through needs a backend of type "
                f"'hypereal' (a hosted Hypereal account); {pattern.backend!r} is not one"
            )
