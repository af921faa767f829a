"""What the queue-style media providers (fal.ai, Replicate) share: their options, their HTTP
client, the fields an image call starts from, and the job modalities, each a job of its kind
(the provider's ``_job``).

The options every queue provider takes besides ``api_key`` and ``base_url``:

``poll_interval`` / ``timeout`` / ``request_timeout``
    Seconds between polls (1), for the whole job (1800) and for one HTTP call (60).
``retries`` / ``retry_backoff``
    Retries of transient HTTP failures (4) and the exponential backoff factor (0.5 s).
``max_download_bytes``
    Largest output file accepted (512 MiB); the whole download must end within ``timeout``.
``headers`` / ``max_connections`` / ``allowed_private_networks``
    Extra API headers, connections kept (1000), non-public networks (CIDRs) redirects and
    output files may reach (the ``base_url`` origin always may); see ``backends/upstream``.
``input_map``
    Renames of the fields we send, ``{ours: theirs}``; ``null`` drops a field.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from hypereal.backends.base import ImageRequest, JobRequest, JobResult, ProgressCallback
from hypereal.backends.upstream.http import UpstreamHttp
from hypereal.backends.upstream.options import QueueOptions


class QueueProvider(ABC):
    """Base of a queue-style provider: ``PROVIDER`` names it in messages, ``DEFAULT_BASE_URL``
    is its API root, ``API_KEY_HINT`` says where a key comes from and ``AUTH_SCHEME`` prefixes
    the key in the ``Authorization`` header."""

    PROVIDER: ClassVar[str]
    DEFAULT_BASE_URL: ClassVar[str]
    API_KEY_HINT: ClassVar[str]
    AUTH_SCHEME: ClassVar[str]

    def __init__(self, options: Mapping[str, Any]) -> None:
        """Read the queue options (QueueOptions). Raises BackendUnavailable."""
        parsed = QueueOptions.parse(
            options,
            backend=self.PROVIDER,
            default_base_url=self.DEFAULT_BASE_URL,
            api_key_hint=self.API_KEY_HINT,
        )
        self._jobs, self._input_map = parsed.jobs, parsed.input_map
        auth = f"{self.AUTH_SCHEME} {parsed.http.api_key}"
        self._http = UpstreamHttp(self.PROVIDER, parsed.http, auth=auth)

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        await self._http.aclose()

    async def generate_video(self, request: JobRequest, progress: ProgressCallback) -> JobResult:
        """Run a video model. Raises BackendError."""
        return await self._job(request, progress, "video")

    async def generate_audio(self, request: JobRequest, progress: ProgressCallback) -> JobResult:
        """Run a speech/audio model. Raises BackendError."""
        return await self._job(request, progress, "audio")

    async def generate_mesh(self, request: JobRequest, progress: ProgressCallback) -> JobResult:
        """Run an image-to-3D model. Raises BackendError."""
        return await self._job(request, progress, "mesh")

    @abstractmethod
    async def _job(self, request: JobRequest, progress: ProgressCallback, kind: str) -> JobResult:
        """Run one job whose output is of ``kind`` (``video``, ``audio``, ``mesh``): each
        provider's own submit, poll and fetch."""


def image_arguments(
    request: ImageRequest, size: Callable[[int, int], Mapping[str, Any]]
) -> dict[str, Any]:
    """The fields an image call starts from: ``prompt``, the size when one is asked for (in
    the provider's shape: ``size(width, height)``), ``aspect_ratio`` and ``output_format``."""
    arguments: dict[str, Any] = {"prompt": request.prompt}
    if request.width and request.height:
        arguments.update(size(request.width, request.height))
    if request.aspect_ratio:
        arguments["aspect_ratio"] = request.aspect_ratio
    arguments["output_format"] = request.output_format
    return arguments
