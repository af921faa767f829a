"""The optional Python packages of the offline backends (the ``local`` extra)."""

from __future__ import annotations

from hypereal.backends.base import BackendUnavailable

LOCAL_EXTRA = "install the local extra: pip install 'hypereal[local]'"


def require_local_extra(backend: str, needs: str, missing: str | None) -> None:
    """Raise BackendUnavailable when ``missing`` (the module that failed to import) is set:
    ``backend`` needs ``needs`` (``"PyAV and numpy"``) from the ``local`` extra."""
    if missing is not None:
        raise BackendUnavailable(f"{backend} needs {needs} ({missing} is missing); {LOCAL_EXTRA}")
