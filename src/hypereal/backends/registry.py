"""Backend instances from settings, and the binding of catalogue models to them.

Instances are named (``local-piper``, ``fal``, ...). Each has a ``type`` naming the class
that implements it; the built-in ``local-*`` instances need no configuration. An instance
is created on first use; a class that cannot serve here raises BackendUnavailable, and the
models bound only to unavailable instances answer 503 with that reason.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hypereal.backends import options
from hypereal.backends.base import (
    AudioBackend,
    BackendUnavailable,
    ChatBackend,
    ImageBackend,
    MeshBackend,
    VideoBackend,
)
from hypereal.backends.options import BackendOptions
from hypereal.domain.catalogue import Catalogue, ModelSpec
from hypereal.domain.errors import ModelUnavailable

# type name -> "module:Class"
BACKEND_TYPES: dict[str, str] = {
    "llama_cpp": "hypereal.backends.llama_cpp:LlamaCppChat",
    "piper": "hypereal.backends.piper:PiperSpeech",
    "pocketsphinx": "hypereal.backends.pocketsphinx_asr:PocketsphinxTranscription",
    "camera_motion": "hypereal.backends.camera_motion:CameraMotionVideo",
    "relief_mesh": "hypereal.backends.relief_mesh:ReliefMesh",
    "mediapipe_segmentation": "hypereal.backends.segmentation:SelfieSegmentationEdit",
    "image_ops": "hypereal.backends.image_ops:ImageOperations",
    "openai": "hypereal.backends.openai_compat:OpenAICompatible",
    "hypereal": "hypereal.backends.hypereal_hosted:HyperealHosted",
    "fal": "hypereal.backends.fal:FalQueue",
    "replicate": "hypereal.backends.replicate:ReplicatePredictions",
    "diffusers_image": "hypereal.backends.diffusers:DiffusersImage",
    "diffusers_video": "hypereal.backends.diffusers:DiffusersVideo",
}

# Types whose work happens at a provider: jobs of a model they serve may run this many at once
# unless the catalogue or the instance's ``concurrency`` option says otherwise. Local types
# run one job of a model at a time by default (one model resident, the CPU or GPU shared).
UPSTREAM_TYPES = frozenset({"openai", "hypereal", "fal", "replicate"})
UPSTREAM_CONCURRENCY = 16

# Offline instances every install has; settings may override their options.
BUILTIN_INSTANCES: dict[str, dict[str, Any]] = {
    "local-llama": {"type": "llama_cpp"},
    "local-piper": {"type": "piper"},
    "local-asr": {"type": "pocketsphinx"},
    "local-camera-motion": {"type": "camera_motion"},
    "local-relief-mesh": {"type": "relief_mesh"},
    "local-segmentation": {"type": "mediapipe_segmentation"},
    "local-image-ops": {"type": "image_ops"},
}

MODALITY_PROTOCOLS: dict[str, type] = {
    "chat": ChatBackend,
    "image": ImageBackend,
    "image-edit": ImageBackend,
    "video": VideoBackend,
    "audio": AudioBackend,
    "3d": MeshBackend,
}

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


class BackendRegistry:
    """Creates backend instances on demand and resolves models to them."""

    def __init__(
        self,
        instances: Mapping[str, Mapping[str, Any]],
        extra_types: Mapping[str, str] | None = None,
    ) -> None:
        """Check every instance's options against its type's model (``backends/options.py``).

        Raises BackendConfigError (one line: the backend, the option, the problem).
        """
        self.configs: dict[str, dict[str, Any]] = {
            name: dict(cfg) for name, cfg in BUILTIN_INSTANCES.items()
        }
        for name, cfg in instances.items():
            self.configs[name] = {**self.configs.get(name, {}), **cfg}
        self.types = {**BACKEND_TYPES, **(extra_types or {})}
        self.options: dict[str, BackendOptions] = {
            name: options.validate(name, config, self.types)
            for name, config in self.configs.items()
        }
        self._instances: dict[str, Any] = {}
        self._failures: dict[str, str] = {}
        self._protocol_checks: dict[tuple[str, type], bool] = {}

    def _create(self, name: str) -> Any:
        checked = self.options[name]
        module_name, _, class_name = self.types[checked.type].partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise BackendUnavailable(f"its Python package is not installed ({exc.name})") from exc
        config = self.configs[name]
        backend_options = {k: v for k, v in config.items() if k not in ("type", "concurrency")}
        return getattr(module, class_name)(backend_options)

    def instance(self, name: str) -> Any:
        """The instance named ``name``. Raises BackendUnavailable with the reason."""
        if name in self._instances:
            return self._instances[name]
        if name in self._failures:
            raise BackendUnavailable(self._failures[name])
        if name not in self.configs:
            raise BackendUnavailable(f"backend '{name}' is not configured")
        try:
            backend = self._create(name)
        except BackendUnavailable as exc:
            self._failures[name] = f"backend '{name}': {exc}"
            raise BackendUnavailable(self._failures[name]) from exc
        self._instances[name] = backend
        return backend

    def resolve(self, spec: ModelSpec) -> Resolved:
        """The first configured backend that can serve ``spec``.

        Raises ModelUnavailable (503) with the reasons when none can.
        """
        protocol = MODALITY_PROTOCOLS[spec.modality]
        reasons: list[str] = []
        for binding in spec.bindings:
            if binding.backend not in self.configs:
                continue
            try:
                backend = self.instance(binding.backend)
            except BackendUnavailable as exc:
                reasons.append(str(exc))
                continue
            if not self._serves(binding.backend, backend, protocol):
                reasons.append(f"backend '{binding.backend}' does not serve {spec.modality}")
                continue
            return Resolved(backend, binding.backend, binding.upstream_model)
        names = ", ".join(b.backend for b in spec.bindings) or "none listed"
        detail = "; ".join(reasons) if reasons else CONFIGURE_HINT.format(names=names)
        raise ModelUnavailable(f"Model {spec.slug} is not available on this server: {detail}")

    def _serves(self, name: str, backend: object, protocol: type) -> bool:
        """``isinstance(backend, protocol)``, remembered per instance: a runtime protocol
        check walks the protocol's members (tens of microseconds, on every request)."""
        key = (name, protocol)
        serves = self._protocol_checks.get(key)
        if serves is None:
            serves = self._protocol_checks[key] = isinstance(backend, protocol)
        return serves

    def concurrency(self, spec: ModelSpec) -> int:
        """How many jobs of ``spec`` may run at once, all workers together: the catalogue's
        ``concurrency`` when it sets one, else the ``concurrency`` option of the first
        configured backend of the model not known to be unavailable, else
        UPSTREAM_CONCURRENCY for an upstream type and 1 for a local one. Read from the
        checked options: no backend is built to answer."""
        if spec.concurrency is not None:
            return spec.concurrency
        for binding in spec.bindings:
            checked = self.options.get(binding.backend)
            if checked is None or binding.backend in self._failures:
                continue
            if checked.concurrency is not None:
                return checked.concurrency
            return UPSTREAM_CONCURRENCY if checked.type in UPSTREAM_TYPES else 1
        return 1

    def availability(self, spec: ModelSpec) -> tuple[bool, str | None, str | None]:
        """(available, serving instance, reason when unavailable) for model listings."""
        try:
            resolved = self.resolve(spec)
        except ModelUnavailable as exc:
            return False, None, exc.message
        return True, resolved.instance, None

    async def aclose(self) -> None:
        for backend in self._instances.values():
            close = getattr(backend, "aclose", None)
            if close is not None:
                await close()
        self._instances.clear()
        self._protocol_checks.clear()


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
