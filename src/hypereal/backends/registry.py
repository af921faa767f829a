"""Backend instances from settings.

Instances are named (``local-piper``, ``fal``, ...). Each has a ``type`` naming the class
that implements it; the built-in ``local-*`` instances need no configuration. An instance
is created on first use; a class that cannot serve here raises BackendUnavailable with the
reason. The registry knows instance names and modalities, not the catalogue: binding models
to instances is the domain's (``domain/model_backends.py``).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
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


class BackendRegistry:
    """Creates backend instances on demand, and answers which serve a modality."""

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

    def serving(self, name: str, modality: str) -> Any:
        """The instance named ``name`` when it serves ``modality`` (a catalogue modality:
        ``chat``, ``image``, ...). Raises BackendUnavailable with the reason."""
        backend = self.instance(name)
        if not self._serves(name, backend, MODALITY_PROTOCOLS[modality]):
            raise BackendUnavailable(f"backend '{name}' does not serve {modality}")
        return backend

    def _serves(self, name: str, backend: object, protocol: type) -> bool:
        """``isinstance(backend, protocol)``, remembered per instance: a runtime protocol
        check walks the protocol's members (tens of microseconds, on every request)."""
        key = (name, protocol)
        serves = self._protocol_checks.get(key)
        if serves is None:
            serves = self._protocol_checks[key] = isinstance(backend, protocol)
        return serves

    def concurrency(self, name: str) -> int | None:
        """How many jobs of one model instance ``name`` runs at once: its ``concurrency``
        option, else UPSTREAM_CONCURRENCY for an upstream type and 1 for a local one; None
        when ``name`` is not configured or is known to be unavailable. Read from the
        checked options: no backend is built to answer."""
        checked = self.options.get(name)
        if checked is None or name in self._failures:
            return None
        if checked.concurrency is not None:
            return checked.concurrency
        return UPSTREAM_CONCURRENCY if checked.type in UPSTREAM_TYPES else 1

    async def aclose(self) -> None:
        for backend in self._instances.values():
            close = getattr(backend, "aclose", None)
            if close is not None:
                await close()
        self._instances.clear()
        self._protocol_checks.clear()
