"""Submitting an async generation, on the generation pipeline (``domain/generation.py``):
validate, price, fetch and store the input media, then reserve the credits and create the
job in one transaction and put it on the queue.

Input media (``input.image``, ``input.audio`` ...) are fetched here, through the SSRF guard,
so a bad or refused URL is a 400 before anything is charged; the bytes go to the media
store and the worker reads them from there (on any machine sharing the store).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from hypereal.backends.base import BackendError
from hypereal.domain import jobs, keys, ledger, pricing
from hypereal.domain.catalogue import ModelSpec, validate_params
from hypereal.domain.errors import BadRequest, HyperealError, InsufficientCredits
from hypereal.domain.generation import client_error, has_inputs
from hypereal.engine.context import JobServices
from hypereal.media.fetch import FetchRefused, parse_networks, vetted_addresses
from hypereal.media.signing import inputs_kind

if TYPE_CHECKING:
    from hypereal.engine.engine import Engine

log = logging.getLogger("hypereal.engine")

MAX_WEBHOOK_URL_LENGTH = 2048


class EngineNotRunning(HyperealError):
    status = 503

    def __init__(self) -> None:
        super().__init__("The job engine is not running on this server")


@dataclass(frozen=True)
class Submission:
    model: str | None
    input: Mapping[str, Any]
    webhook_url: str | None


async def submit_generation(
    services: JobServices,
    engine: Engine | None,
    account_id: str,
    modality: str,
    submission: Submission,
) -> jobs.JobView:
    """Create, charge and enqueue a job of ``modality`` (video | audio | 3d).

    Raises ModelRequired / UnsupportedModel / BadRequest (400), InsufficientCredits (402),
    ModelUnavailable or EngineNotRunning (503, ``engine`` None: an app built without it).
    """
    if engine is None:
        raise EngineNotRunning()
    spec = services.catalogue.get(submission.model, modality)
    keys.check_model(spec.slug)  # before anything is fetched (403)
    _check_available(services, spec, in_process=engine.consume)
    params = validate_params(spec, submission.input, prefix="input.")
    if engine.consume:
        check_backend_input(services, spec, params)
    credits = pricing.price(spec, params)
    webhook_url = await checked_webhook_url(services, submission.webhook_url)
    if has_inputs(spec, params):
        # A short balance is a 402 before any fetch; the debit re-checks atomically (and
        # alone answers the 402 when there is nothing to fetch).
        available = await ledger.balance(services.db, account_id)
        if available < credits:
            raise InsufficientCredits(required=credits, available=available)
    media = await _store_inputs(services, account_id, spec, params)
    submitted = await jobs.submit(
        services.db,
        jobs.NewJob(
            account_id=account_id,
            type=modality,
            model=spec.slug,
            input=params,
            credits=credits,
            media=media,
            webhook_url=webhook_url,
            slots=engine.slots(spec.slug),
        ),
    )
    if not submitted.send:  # its model is busy: the next of its jobs to end takes it
        return submitted.job
    try:
        await engine.kick(submitted.job.id, submitted.job.model)
    except Exception:  # the job is safe in the database; maintenance re-sends it
        log.exception("job %s: could not put it on the queue now", submitted.job.id)
    return submitted.job


def check_backend_input(services: JobServices, spec: ModelSpec, params: Mapping[str, Any]) -> None:
    """Let the serving backend refuse a request it cannot honour (an unknown voice ...)
    before anything is charged: a backend may offer ``check_input(input)``, raising a
    client BackendError. Called where the backend runs in this process."""
    try:
        resolved = services.backends.resolve(spec)
    except HyperealError:
        return
    check = getattr(resolved.backend, "check_input", None)
    if check is None:
        return
    try:
        check(params)
    except BackendError as exc:
        raise client_error(exc) from exc


def _check_available(services: JobServices, spec: ModelSpec, *, in_process: bool) -> None:
    """In-process, the backend must load here; in front of remote workers, one of the
    model's backends must at least be configured (it may only load on GPU hosts)."""
    if in_process or not any(b.backend in services.backends.configs for b in spec.bindings):
        services.backends.resolve(spec)


async def checked_webhook_url(services: JobServices, url: object) -> str | None:
    """An http(s) URL whose host passes the same SSRF guard as deliveries. Raises BadRequest."""
    if url is None or url == "":
        return None
    if not isinstance(url, str) or len(url) > MAX_WEBHOOK_URL_LENGTH:
        raise BadRequest("Invalid value for 'webhook_url': must be an http(s) URL")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest("Invalid value for 'webhook_url': must be an http(s) URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        allowed = parse_networks(services.settings.allowed_private_networks)
        await vetted_addresses(parts.hostname, port, allowed)
    except FetchRefused as exc:
        raise BadRequest(f"Invalid value for 'webhook_url': {exc.message}") from exc
    except ValueError as exc:
        raise BadRequest("Invalid value for 'webhook_url': must be an http(s) URL") from exc
    return url


def _recorded(url: str, size: int) -> str:
    """What the job row keeps of a media reference: the URL, or a stub for a data: URI."""
    if url.startswith("data:"):
        return f"{url[: url.find(',') + 1]}... ({size} bytes)"
    return url


async def _store_inputs(
    services: JobServices, account_id: str, spec: ModelSpec, params: dict[str, Any]
) -> dict[str, str]:
    """Fetch every media parameter into the media store; returns field -> store key and
    replaces data: URIs in ``params`` with a short stub."""
    pipeline = services.pipeline
    blobs = await pipeline.fetch_inputs(spec, params, prefix="input.")
    stored: dict[str, str] = {}
    recorded: dict[str, str] = {}
    for field, blob in blobs.items():
        # Under the owner's id: served to them, or under a signed URL (media/signing.py).
        stored[field] = (await pipeline.store(blob, inputs_kind(account_id))).key
        name, _, index = field.partition("[")
        source = params[name] if not index else params[name][int(index.rstrip("]"))]
        recorded[field] = _recorded(source, len(blob.data))
    for param in spec.params:
        if param.name in params and param.type == "media":
            params[param.name] = recorded.get(param.name, params[param.name])
        elif param.name in params and param.type == "media-list":
            params[param.name] = [
                recorded.get(f"{param.name}[{i}]", url) for i, url in enumerate(params[param.name])
            ]
    return stored
