"""What the job engine needs from the process around it, as a protocol: the engine is handed
these parts (``hypereal.services.Services`` has them) instead of importing the container
that sits above it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from hypereal.domain.catalogue import Catalogue
    from hypereal.domain.generation import Pipeline
    from hypereal.domain.model_backends import ModelBackends
    from hypereal.settings import Settings
    from hypereal.store.db import Database


class JobServices(Protocol):
    """The settings, the database, the catalogue, the backends and the generation pipeline."""

    @property
    def settings(self) -> Settings: ...

    @property
    def db(self) -> Database: ...

    @property
    def catalogue(self) -> Catalogue: ...

    @property
    def backends(self) -> ModelBackends: ...

    @property
    def pipeline(self) -> Pipeline: ...

    async def close(self) -> None:
        """Release the database and the backends (a worker's services, at its end)."""
        ...
