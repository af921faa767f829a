"""Everything a request, a CLI command or a worker needs, built once from the settings."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from hypereal.backends.registry import BackendRegistry
from hypereal.domain import keys, ledger
from hypereal.domain.catalogue import Catalogue, load_catalogue, parse_catalogue
from hypereal.domain.generation import Pipeline
from hypereal.domain.model_backends import ModelBackends, check_patterns
from hypereal.domain.ratelimit import RateLimiter
from hypereal.media.signing import MediaSigner, load_secret
from hypereal.media.store import LocalMediaStore, MediaStore, S3MediaStore
from hypereal.settings import Settings
from hypereal.store.db import Database
from hypereal.store.migrate import upgrade_to_head

log = logging.getLogger("hypereal")


@dataclass
class Services:
    settings: Settings
    db: Database
    catalogue: Catalogue
    backends: ModelBackends
    media: MediaStore
    limiter: RateLimiter

    @cached_property
    def pipeline(self) -> Pipeline:
        """The generation pipeline's view of these services (``domain/generation.py``)."""
        return Pipeline(
            db=self.db, media=self.media, backends=self.backends, settings=self.settings
        )

    @cached_property
    def media_signer(self) -> MediaSigner:
        """Signs and checks the expiring URLs of private media (uploaded inputs)."""
        return MediaSigner(load_secret(self.settings.media_signing_secret, self.settings.data_dir))

    async def migrate(self) -> None:
        await upgrade_to_head(self.db.engine)

    async def close(self) -> None:
        await self.backends.aclose()
        self.limiter.close()
        await self.db.dispose()


def build_media_store(settings: Settings) -> MediaStore:
    if settings.storage == "s3":
        if not settings.s3_bucket:
            raise ValueError("HYPEREAL_S3_BUCKET is required when HYPEREAL_STORAGE=s3")
        return S3MediaStore(
            settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=settings.s3_secret_access_key,
            public_url=settings.s3_public_url,
        )
    return LocalMediaStore(settings.resolved_media_dir, settings.base_url())


def build_services(settings: Settings, *, backend_types: Mapping[str, str] = {}) -> Services:
    """Everything built from ``settings``; ``backend_types`` adds backend types ("module:Class")
    to the built-in ones (tests' scripted backends). Raises BackendConfigError for a
    misconfigured backend, ValueError for another bad setting."""
    catalogue = load_catalogue(settings.catalogue_file, settings.model_patterns)
    backends: dict[str, dict[str, Any]] = dict(settings.backends)
    extra_types: dict[str, str] = dict(backend_types)
    if settings.enable_test_backends:
        from hypereal.backends import noop

        extra_types.update(noop.NOOP_TYPES)
        backends = {**noop.NOOP_INSTANCES, **backends}
        # The noop-* models, unless the operator's catalogue defines those slugs.
        for slug, spec in parse_catalogue(noop.NOOP_CATALOGUE).models.items():
            catalogue.models.setdefault(slug, spec)
    registry = BackendRegistry(backends, extra_types=extra_types)
    check_patterns(catalogue, registry)
    return Services(
        settings=settings,
        db=Database(settings.resolved_database_url),
        catalogue=catalogue,
        backends=ModelBackends(registry),
        media=build_media_store(settings),
        limiter=RateLimiter(settings.resolved_rate_limit_storage, settings.rate_limit_per_hour),
    )


async def bootstrap_admin(services: Services) -> keys.CreatedKey | None:
    """On an empty database, create the admin account and key (the caller shows it once)."""
    if not services.settings.bootstrap_admin or await keys.has_accounts(services.db):
        return None
    account_id = await keys.create_account(services.db, "admin", is_admin=True)
    if services.settings.admin_initial_credits > 0:
        await ledger.grant(
            services.db, account_id, services.settings.admin_initial_credits, "initial credits"
        )
    return await keys.create_key(services.db, account_id, name="admin (bootstrap)")
