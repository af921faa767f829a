"""Replicate through its predictions API: images, video, audio and 3D from any Replicate model.

Protocol (https://replicate.com/docs, "Create a prediction"): ``POST {base}/models/{owner}/{name}
/predictions`` (official models, latest version) or ``POST {base}/predictions`` with ``version``
creates a prediction from ``{input, webhook?, webhook_events_filter?}``; ``Prefer: wait=N`` holds
the request up to N seconds for the result. The prediction's ``urls.get`` is polled until its
``status`` leaves ``starting``/``processing`` for ``succeeded`` (``output``: a URL, a list of URLs
or data URIs), ``failed`` (``error``) or ``canceled``; ``POST urls.cancel`` cancels. Every call
carries ``Authorization: Bearer <token>``.

Options (``backends.<name>`` with ``type = "replicate"``):

``api_key`` (required)
    The Replicate API token.
``base_url``
    API root, default ``https://api.replicate.com/v1``.
``poll_interval``, ``timeout``, ``request_timeout``, ``retries``, ``retry_backoff``,
``max_download_bytes``, ``headers``, ``max_connections``, ``allowed_private_networks``,
``input_map``
    The options of every queue provider (``backends/upstream/queue.py``).
``prefer_wait``
    Seconds image predictions ask Replicate to hold the create call open (``Prefer: wait``,
    default 10, 0 turns it off); an image that is not ready by then is polled like a job.
``webhook_url`` / ``webhook_events_filter`` / ``webhook_secret``
    Optional push delivery: Replicate POSTs the prediction to ``webhook_url`` for these events
    (default ``["completed"]``), signed per Standard Webhooks with the Replicate account's
    signing secret (``whsec_...``, from Replicate's ``GET /v1/webhooks/default/secret``). With
    ``webhook_secret`` set, hypereal receives them itself: point ``webhook_url`` at
    ``<public URL>/webhooks/upstream/<backend name>``. A verified delivery for a prediction this
    process is polling ends the wait at once (the job finishes when Replicate does, not at the
    next poll); polling stays the source of truth, so the prediction is read once more, and a
    lost or refused delivery only costs the poll interval. Deliveries reach the serving
    process: in the scaled-out mode the workers keep polling on ``poll_interval``.

Inputs sent: images send ``prompt``, ``width``/``height``, ``aspect_ratio``, ``output_format``,
one source image as a data URI in ``image`` (several: a list in ``images``), then the model's
other parameters unchanged (``num_outputs``, ``seed`` ...). Jobs send their validated ``input``
unchanged and each media field as a data URI under its own name (``image``, ``audio`` ...).
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from hypereal.backends.base import (
    BackendError,
    BackendUnavailable,
    ImageRequest,
    JobRequest,
    JobResult,
    MediaBlob,
    ProgressCallback,
    WebhookRejected,
)
from hypereal.backends.upstream.jobs import (
    CANCEL_TIMEOUT,
    JobStatus,
    ProgressReporter,
    run_provider_job,
)
from hypereal.backends.upstream.media import to_data_uri
from hypereal.backends.upstream.options import apply_input_map
from hypereal.backends.upstream.queue import QueueProvider, image_arguments

PROVIDER = "Replicate"
DEFAULT_BASE_URL = "https://api.replicate.com/v1"

_RUNNING = frozenset({"starting", "processing"})
_VERSION_ID = re.compile(r"^[0-9a-f]{64}$")
# Deliveries that came before their prediction's poll began (or for another process's).
_EARLY_DELIVERIES = 1024


class ReplicateWebhookError(WebhookRejected):
    """A webhook delivery that is not provably from Replicate (or is stale/replayed)."""


@dataclass(frozen=True)
class _Prediction:
    id: str
    get_url: str
    cancel_url: str
    body: Mapping[str, Any]

    @property
    def status(self) -> str:
        return str(self.body.get("status") or "")


class ReplicatePredictions(QueueProvider):
    """ImageBackend, VideoBackend, AudioBackend and MeshBackend over Replicate predictions, and
    a WebhookReceiver for its pushes when ``webhook_secret`` is set."""

    PROVIDER = PROVIDER
    DEFAULT_BASE_URL = DEFAULT_BASE_URL
    API_KEY_HINT = "your REPLICATE_API_TOKEN"
    AUTH_SCHEME = "Bearer"

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        prefer_wait = options.get("prefer_wait", 10)
        # Replicate accepts Prefer: wait=1..60; 0 means async mode (no header).
        if (
            isinstance(prefer_wait, bool)
            or not isinstance(prefer_wait, int)
            or not 0 <= prefer_wait <= 60
        ):
            raise BackendUnavailable(
                "The Replicate option `prefer_wait` must be whole seconds from 0 to 60."
            )
        self._prefer_wait = prefer_wait
        self._webhook = _webhook_fields(options)
        self._webhook_secret = _webhook_secret(options, self._webhook)
        # Prediction id -> set when its verified webhook arrives (ends that poll's wait).
        self._nudges: dict[str, asyncio.Event] = {}
        self._early: dict[str, None] = {}

    # ------------------------------------------------------------------ modalities

    async def generate_images(self, request: ImageRequest) -> list[MediaBlob]:
        """Run an image model; returns every image it produced. Raises BackendError."""
        arguments = image_arguments(request, lambda w, h: {"width": w, "height": h})
        uris = [to_data_uri(image) for image in request.images]
        if len(uris) == 1:
            arguments["image"] = uris[0]
        elif uris:
            arguments["images"] = uris
        arguments.update(request.params)
        prediction = await self._run(request.upstream_model, arguments, None, self._prefer_wait)
        return [await self._http.download(url) for url in _output_urls(prediction.body)]

    # -------------------------------------------------------------------- protocol

    async def _job(self, request: JobRequest, progress: ProgressCallback, kind: str) -> JobResult:
        """Run one prediction; its first output is the job's (whatever ``kind``)."""
        arguments = dict(request.input)
        for field, blob in request.media.items():
            arguments[field] = to_data_uri(blob)
        reporter = ProgressReporter(progress)
        # No Prefer: wait for jobs: they run for minutes, and while the create call is held open
        # a user's cancel has to wait for it before it can reach the prediction.
        prediction = await self._run(request.upstream_model, arguments, reporter, 0)
        await reporter.fetching()
        blob = await self._http.download(_output_urls(prediction.body)[0])
        await reporter.done()
        return JobResult(output=blob)

    async def _run(
        self,
        upstream_model: str | None,
        arguments: Mapping[str, Any],
        reporter: ProgressReporter | None,
        wait: int,
    ) -> _Prediction:
        """Create the prediction and poll it to a terminal state through the job driver
        (cancelled upstream on our cancel or the overall timeout). Returns the succeeded
        prediction."""
        job = _PredictionJob(
            self, upstream_model, apply_input_map(arguments, self._input_map), wait
        )
        try:
            prediction = await run_provider_job(
                job, self._http, self._jobs, reporter, extra_grace=wait
            )
        finally:
            if job.prediction_id is not None:
                self._nudges.pop(job.prediction_id, None)
        if prediction.status == "succeeded":
            return prediction
        if prediction.status == "canceled":
            raise BackendError(f"Replicate prediction {prediction.id} was canceled upstream")
        error = prediction.body.get("error")
        raise BackendError(
            f"Replicate prediction {prediction.id} {prediction.status or 'failed'}: "
            f"{error if error else 'no error message'}"
        )

    async def _create(
        self, upstream_model: str | None, payload: Mapping[str, Any], wait: int
    ) -> _Prediction:
        owner_name, version = _parse_model(upstream_model)
        body: dict[str, Any] = {"input": dict(payload), **self._webhook}
        if version:
            body["version"] = version
            path = "predictions"
        else:
            path = f"models/{owner_name}/predictions"
        headers = {"Prefer": f"wait={wait}"} if wait else None
        timeout = self._http.options.request_timeout + wait
        created = await self._http.request_json(
            "POST", path, json=body, headers=headers, timeout=timeout
        )
        return self._prediction(created)

    async def _get(self, prediction: _Prediction) -> _Prediction:
        return self._prediction(await self._http.request_json("GET", prediction.get_url))

    async def _wait(self, prediction_id: str, seconds: float) -> None:
        """Wait ``seconds`` before the next poll, less when the prediction's webhook comes."""
        nudge = self._nudge_for(prediction_id)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(nudge.wait(), seconds)
        nudge.clear()

    def _nudge_for(self, prediction_id: str) -> asyncio.Event:
        """The event a webhook for ``prediction_id`` sets; already set when it came early."""
        nudge = self._nudges.setdefault(prediction_id, asyncio.Event())
        if prediction_id in self._early:  # its webhook beat the first poll
            del self._early[prediction_id]
            nudge.set()
        return nudge

    def accept_webhook(self, headers: Mapping[str, str], body: bytes) -> bool:
        """Verify one Replicate webhook delivery (see ``webhook_secret``) and end the poll wait
        of its prediction. Returns whether this process was polling it. Raises
        ReplicateWebhookError, or BackendUnavailable without a ``webhook_secret``."""
        if self._webhook_secret is None:
            raise BackendUnavailable(
                "this Replicate backend has no `webhook_secret`, so it does not take webhooks"
            )
        prediction_id = verify_replicate_webhook(self._webhook_secret, headers, body).get("id")
        if not isinstance(prediction_id, str) or not prediction_id:
            raise ReplicateWebhookError("Webhook rejected: the prediction has no id")
        nudge = self._nudges.get(prediction_id)
        if nudge is not None:
            nudge.set()
            return True
        self._early[prediction_id] = None
        while len(self._early) > _EARLY_DELIVERIES:
            del self._early[next(iter(self._early))]
        return False

    async def _cancel(self, prediction: _Prediction) -> None:
        await self._http.request("POST", prediction.cancel_url, timeout=CANCEL_TIMEOUT)

    def _prediction(self, body: dict[str, Any]) -> _Prediction:
        prediction_id = body.get("id")
        if not isinstance(prediction_id, str) or not prediction_id:
            raise BackendError("Replicate returned a prediction without an id")
        urls = body.get("urls")
        if not isinstance(urls, Mapping):
            urls = {}
        own = self._http.url(f"predictions/{prediction_id}")
        return _Prediction(
            id=prediction_id,
            get_url=self._http.api_url(urls.get("get"), own),
            cancel_url=self._http.api_url(urls.get("cancel"), f"{own}/cancel"),
            body=body,
        )


class _PredictionJob:
    """One prediction, for :func:`run_job`: the create call's answer is its first status (a
    ``Prefer: wait`` create may come back finished); a webhook ends a poll wait early."""

    cancellable = True
    queued_on_submit = False

    def __init__(
        self,
        backend: ReplicatePredictions,
        upstream_model: str | None,
        payload: Mapping[str, Any],
        wait: int,
    ) -> None:
        self._backend = backend
        self._upstream_model = upstream_model
        self._payload = payload
        self._prefer_wait = wait
        self._latest: _Prediction | None = None
        self._fresh = False

    async def submit(self) -> _Prediction:
        created = await self._backend._create(
            self._upstream_model, self._payload, self._prefer_wait
        )
        self._latest, self._fresh = created, True
        return created

    async def status(self, handle: _Prediction) -> JobStatus:
        if self._fresh and self._latest is not None:
            prediction = self._latest
            self._fresh = False
        else:
            prediction = self._latest = await self._backend._get(self._latest or handle)
        if prediction.status not in _RUNNING:
            return JobStatus("done")
        if prediction.status == "starting":
            return JobStatus("queued")
        logs = prediction.body.get("logs")
        return JobStatus("running", logs=logs if isinstance(logs, str) else None)

    async def wait(self, handle: _Prediction, seconds: float) -> None:
        await self._backend._wait(handle.id, seconds)

    async def cancel(self, handle: _Prediction) -> None:
        await self._backend._cancel(handle)

    @property
    def prediction_id(self) -> str | None:
        """The prediction's id once created."""
        return self._latest.id if self._latest is not None else None

    async def result(self, handle: _Prediction) -> _Prediction:
        return self._latest or handle


def _parse_model(upstream_model: str | None) -> tuple[str | None, str | None]:
    """``owner/name`` -> (owner/name, None); ``owner/name:version`` or a bare version id ->
    (owner/name or None, version)."""
    if not upstream_model:
        raise BackendError("No Replicate model is configured for this model (upstream_model)")
    name, _, version = upstream_model.strip().partition(":")
    if not version and _VERSION_ID.match(name):
        return None, name
    if name.count("/") != 1:
        raise BackendError(
            f"Replicate model must be 'owner/name[:version]', got {upstream_model!r}"
        )
    return name, version or None


def _webhook_fields(options: Mapping[str, Any]) -> dict[str, Any]:
    url = options.get("webhook_url")
    if url is None:
        return {}
    events = options.get("webhook_events_filter", ["completed"])
    if not isinstance(url, str) or not isinstance(events, Sequence) or isinstance(events, str):
        raise BackendUnavailable(
            "The Replicate options `webhook_url` (a URL) and `webhook_events_filter` (a list of "
            "start/output/logs/completed) are malformed."
        )
    return {"webhook": url, "webhook_events_filter": [str(event) for event in events]}


def _webhook_secret(options: Mapping[str, Any], webhook: Mapping[str, Any]) -> str | None:
    secret = options.get("webhook_secret")
    if secret is None:
        return None
    if not isinstance(secret, str) or not secret.strip():
        raise BackendUnavailable("The Replicate option `webhook_secret` must be a whsec_... string")
    if not webhook:
        raise BackendUnavailable(
            "The Replicate option `webhook_secret` needs `webhook_url` (set it to "
            "<public URL>/webhooks/upstream/<backend name>), or Replicate sends no webhooks"
        )
    try:
        Webhook(secret.strip())
    except Exception as exc:  # standardwebhooks raises bare errors for bad base64
        raise BackendUnavailable(
            "The Replicate option `webhook_secret` is not a valid whsec_... signing secret"
        ) from exc
    return secret.strip()


def _output_urls(body: Mapping[str, Any]) -> list[str]:
    """Every file URL in a prediction's ``output``: a string, a list, or an object of them."""
    output = body.get("output")
    if isinstance(output, Mapping):
        output = list(output.values())
    items = output if isinstance(output, list) else [output]
    urls = [item for item in items if isinstance(item, str) and _is_file_url(item)]
    if not urls:
        raise BackendError("Replicate prediction succeeded but its output holds no file")
    return urls


def _is_file_url(value: str) -> bool:
    return value.startswith(("https://", "http://", "data:"))


def verify_replicate_webhook(
    secret: str, headers: Mapping[str, str], body: bytes | str
) -> dict[str, Any]:
    """Check a Replicate webhook delivery and return its prediction object.

    ``secret`` is the account's signing secret (``whsec_...``, from ``GET
    /v1/webhooks/default/secret``); ``headers`` must hold ``webhook-id``, ``webhook-timestamp``
    and ``webhook-signature``; ``body`` is the raw request body, byte for byte. Raises
    :class:`ReplicateWebhookError` when the signature does not match, a header is missing or
    malformed, or the timestamp is more than five minutes away (replay protection).
    """
    try:
        webhook = Webhook(secret)
    except Exception as exc:  # standardwebhooks raises bare errors for bad base64 or empty keys
        raise ReplicateWebhookError("The webhook signing secret is malformed") from exc
    try:
        payload = webhook.verify(body, dict(headers))
    except WebhookVerificationError as exc:
        raise ReplicateWebhookError(f"Webhook rejected: {exc}") from exc
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        # A malformed signature header ("v1" without ",") or a body that is not JSON.
        raise ReplicateWebhookError(f"Webhook rejected: malformed delivery ({exc})") from exc
    if not isinstance(payload, dict):
        raise ReplicateWebhookError("Webhook rejected: the body is not a prediction object")
    return payload


__all__ = ["ReplicatePredictions", "ReplicateWebhookError", "verify_replicate_webhook"]
