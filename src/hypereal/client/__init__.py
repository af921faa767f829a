"""Python client of the Hypereal API (this server or the hosted one).

    from hypereal.client import Client

    client = Client(base_url="http://127.0.0.1:8000", api_key="ck_...")
    job = client.run("audio-tts", {"text": "Hello"})   # submits, waits, returns the job
    job.save("hello.wav")

:class:`Client` (sync) and :class:`AsyncClient` take ``HYPEREAL_BASE_URL`` and
``HYPEREAL_API_KEY`` when not given. Results are typed (:class:`Job`,
:class:`ImageResult`, :class:`ChatResult`, ...); failures raise the errors below.
"""

from hypereal.client._async import AsyncChatStream, AsyncClient
from hypereal.client._core import PollPolicy, RetryPolicy
from hypereal.client._errors import (
    APIConnectionError,
    AuthenticationError,
    BadRequest,
    Conflict,
    HyperealError,
    InsufficientCredits,
    InvalidWebhook,
    JobCanceled,
    JobFailed,
    ModelUnavailable,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServerError,
    WaitTimeout,
)
from hypereal.client._sync import ChatStream, Client
from hypereal.client._types import (
    Balance,
    ChatResult,
    ImageResult,
    Job,
    LedgerEntry,
    Model,
    ModelParam,
    RunResult,
    Usage,
)
from hypereal.client.webhooks import verify_webhook

__all__ = [
    "APIConnectionError",
    "AsyncChatStream",
    "AsyncClient",
    "AuthenticationError",
    "BadRequest",
    "Balance",
    "ChatResult",
    "ChatStream",
    "Client",
    "Conflict",
    "HyperealError",
    "ImageResult",
    "InsufficientCredits",
    "InvalidWebhook",
    "Job",
    "JobCanceled",
    "JobFailed",
    "LedgerEntry",
    "Model",
    "ModelParam",
    "ModelUnavailable",
    "NotFound",
    "PermissionDenied",
    "PollPolicy",
    "RateLimited",
    "RetryPolicy",
    "RunResult",
    "ServerError",
    "Usage",
    "WaitTimeout",
    "verify_webhook",
]
