"""Every call of the client as data, and the reading of its answer: what the sync
(:mod:`hypereal.client._sync`) and async (:mod:`hypereal.client._async`) clients share beyond
:mod:`hypereal.client._core`. A client builds a :class:`Call` here, sends it with the retries
:class:`Attempts` decides, and reads the answer here; it only does the I/O itself."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from hypereal.client import _core
from hypereal.client._core import ROUTES, Messages, PollPolicy, RetryPolicy, WaitState
from hypereal.client._errors import APIConnectionError, AuthenticationError
from hypereal.client._types import Connection, Job, LedgerEntry, Model

T = TypeVar("T")

#: Called with the job whenever a waited-for job's stage or progress changes.
ProgressCallback = Callable[[Job], object]


@dataclass(frozen=True)
class Call:
    """One request: its method, path, JSON body, query, headers and HTTP timeout, and
    whether its answer is streamed."""

    method: str
    path: str
    json: Any = None
    params: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: Any = httpx.USE_CLIENT_DEFAULT
    stream: bool = False

    def request(self, http: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        """The request, built by ``http`` (its base URL and default headers)."""
        return http.build_request(
            self.method,
            self.path,
            json=self.json,
            params=self.params,
            headers=self.headers,
            timeout=self.timeout,
        )


MODELS = Call("GET", "/v1/models")
BALANCE = Call("GET", "/v1/credits")
WEBHOOK_SECRET = Call("GET", "/v1/webhooks/secret")


class ClientBase:
    """What both clients hold: the resolved base URL and key, the retry and polling
    policies, the connection jobs and images download with, and the cached catalogue."""

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        timeout: float | httpx.Timeout,
        max_retries: int,
        max_retry_wait: float,
        poll: PollPolicy | None,
    ) -> None:
        """Raises AuthenticationError without an API key (argument or environment)."""
        self.base_url = _core.resolve_base_url(base_url)
        key = _core.resolve_api_key(api_key)
        if not key:
            raise AuthenticationError("No API key: pass api_key=... or set HYPEREAL_API_KEY")
        self.api_key = key
        self.retry = RetryPolicy(max_retries=max_retries, max_wait=max_retry_wait)
        self.poll = poll or PollPolicy()
        self._connection = Connection(self.base_url, key, timeout)
        self._models: dict[str, Model] | None = None

    def _http_options(self) -> dict[str, Any]:
        """The options both HTTP clients are built with."""
        return {
            "base_url": self.base_url,
            "headers": _core.default_headers(self.api_key),
            "timeout": self._connection.timeout,
        }


class Attempts:
    """The tries of one call: after each failed one, the seconds to wait before the next, or
    the error to raise (see :class:`~hypereal.client._core.RetryPolicy`)."""

    def __init__(self, policy: RetryPolicy, call: Call, base_url: str) -> None:
        self.policy = policy
        self.call = call
        self.base_url = base_url
        self.attempt = 1

    def after_network_error(self, exc: httpx.TransportError) -> float:
        """The wait before the next try; raises APIConnectionError when none is left."""
        delay = self.policy.after_network_error(self.attempt)
        if delay is None:
            call = self.call
            raise APIConnectionError(
                f"{call.method} {self.base_url}{call.path} failed: {exc or type(exc).__name__}"
            ) from exc
        self.attempt += 1
        return delay

    def after_error(self, response: httpx.Response) -> float:
        """The wait before the next try after an error answer (its body read); raises the
        answer's typed error when it is not retried."""
        error = _core.error_from_response(response)
        delay = self.policy.after_error(self.attempt, error)
        if delay is None:
            raise error
        self.attempt += 1
        return delay


def charged(idempotency_key: str | None, headers: Mapping[str, str] = {}) -> dict[str, str]:
    """``headers`` with the Idempotency-Key of a charging call (a new one unless given)."""
    return {**headers, "Idempotency-Key": idempotency_key or _core.new_idempotency_key()}


def chat_call(
    messages: Messages,
    model: str | None,
    stream: bool,
    temperature: float | None,
    max_tokens: int | None,
    idempotency_key: str | None,
    extra: Mapping[str, Any],
    /,
) -> Call:
    """A chat answer, whole or streamed as server-sent events."""
    body = _core.chat_body(
        messages,
        model=model,
        stream=stream,
        temperature=temperature,
        max_tokens=max_tokens,
        extra=extra,
    )
    accept = {"Accept": "text/event-stream"} if stream else {}
    return Call(
        "POST", ROUTES["chat"], json=body, headers=charged(idempotency_key, accept), stream=stream
    )


def image_call(
    modality: str,
    prompt: str | None,
    model: str | None,
    values: Mapping[str, Any],
    idempotency_key: str | None,
) -> Call:
    """An image generated (``image``) or edited (``image-edit``); None values are left out."""
    body = _core.image_body(prompt, model, values)
    return Call("POST", ROUTES[modality], json=body, headers=charged(idempotency_key))


@dataclass(frozen=True)
class Submission:
    """A job to submit: the call, and what its answer is read with."""

    call: Call
    modality: str
    model: str | None

    def job(self, data: Mapping[str, Any], connection: Connection) -> Job:
        """The job the submission's answer describes."""
        return Job.from_json(data, connection, model=self.model, type=self.modality)


def submission(
    modality: str,
    model: str | None,
    values: Mapping[str, Any],
    webhook_url: str | None,
    idempotency_key: str | None,
    state: WaitState | None,
) -> Submission:
    """A job of ``modality`` to submit; with a ``state`` (someone waits for it), the server
    may hold the answer until the job ends (``Prefer: wait``)."""
    hold = state.hold() if state is not None else None
    call = Call(
        "POST",
        ROUTES[modality],
        json=_core.job_body(model, values, webhook_url),
        headers=charged(idempotency_key, _core.prefer_wait_header(hold)),
        timeout=_core.poll_timeout(hold),
    )
    return Submission(call, modality, model)


def job_call(job_id: str, hold: float | None = None) -> Call:
    """A job's state; ``hold``: seconds the server may hold the answer until it changes."""
    return Call(
        "GET",
        f"/v1/jobs/{quote(job_id, safe='')}",
        headers=_core.prefer_wait_header(hold),
        timeout=_core.poll_timeout(hold),
    )


def cancel_call(job_id: str) -> Call:
    return Call("POST", f"/v1/jobs/{quote(job_id, safe='')}/cancel")


def read_job(response: httpx.Response, connection: Connection) -> tuple[Job, bool]:
    """The job of a :func:`job_call` answer, and whether the server held it."""
    job = Job.from_json(_core.parse_json(response), connection)
    return job, _core.preference_applied(response)


def ended_at_submit(job: Job, state: WaitState) -> bool:
    """Whether the server answered the submission with the job ended (then it is checked
    and reported as the wait would)."""
    if job.done:
        state.seen(job)
    return job.done


def read_models(data: Mapping[str, Any]) -> list[Model]:
    return [Model.from_json(item) for item in data.get("data") or ()]


def by_slug(models: list[Model]) -> dict[str, Model]:
    return {model.slug: model for model in models}


@dataclass(frozen=True)
class RunPlan:
    """What ``run`` does with a model: a chat turn (``chat``: the messages and the other
    body fields), an image call (``image``), or else a job of ``modality`` with ``values``."""

    modality: str
    values: dict[str, Any]
    chat: tuple[Messages, dict[str, Any]] | None = None
    image: Call | None = None


def plan_run(spec: Model, values: Mapping[str, Any], idempotency_key: str | None) -> RunPlan:
    """How ``run`` serves ``spec``; files among ``values`` become data URIs."""
    _core.route_for(spec)  # refuses an unavailable model or an unknown modality
    prepared = _core.prepare_input(values, _core.media_params(spec))
    if spec.modality == "chat":
        return RunPlan(spec.modality, prepared, chat=_core.run_chat_arguments(prepared))
    if spec.modality in _core.JOB_MODALITIES:
        return RunPlan(spec.modality, prepared)
    image = image_call(spec.modality, None, spec.slug, prepared, idempotency_key)
    return RunPlan(spec.modality, prepared, image=image)


def _present(cursor: Any) -> bool:
    return cursor is not None


class Pager(Generic[T]):
    """A listing read page by page, newest first: the call for the next page (None once it
    has ended), and the items of each page answered; ``limit`` stops after that many."""

    def __init__(
        self,
        path: str,
        parse: Callable[[Any], T],
        *,
        limit: int | None,
        page_size: int,
        most: int,
        params: Mapping[str, Any] | None = None,
        cursor_ok: Callable[[Any], bool] = _present,
    ) -> None:
        self.path = path
        self.parse = parse
        self.limit = limit
        self.page_size = page_size
        self.most = most
        self.params = dict(params or {})
        self.cursor_ok = cursor_ok
        self.taken = 0
        self.before: Any = None
        self.done = False

    def next_call(self) -> Call | None:
        if self.done:
            return None
        left = self.limit - self.taken if self.limit is not None else self.most
        params: dict[str, Any] = {"limit": max(1, min(self.page_size, self.most, left))}
        params.update(self.params)
        if self.before is not None:
            params["before"] = self.before
        return Call("GET", self.path, params=params)

    def take(self, page: Mapping[str, Any]) -> list[T]:
        items: list[T] = []
        for item in page.get("data") or ():
            items.append(self.parse(item))
            self.taken += 1
            if self.limit is not None and self.taken >= self.limit:
                self.done = True
                return items
        cursor = page.get("nextCursor")
        if not page.get("hasMore") or not self.cursor_ok(cursor):
            self.done = True
        self.before = cursor
        return items


def usage_pager(limit: int | None, page_size: int) -> Pager[LedgerEntry]:
    """The caller's ledger (``GET /v1/usage``, at most 200 a page)."""
    return Pager("/v1/usage", LedgerEntry.from_json, limit=limit, page_size=page_size, most=200)


def jobs_pager(
    connection: Connection, kind: str | None, limit: int | None, page_size: int
) -> Pager[Job]:
    """The caller's jobs (``GET /v1/jobs``, at most 100 a page), of one ``kind`` or all."""
    return Pager(
        "/v1/jobs",
        lambda item: Job.from_json(item, connection),
        limit=limit,
        page_size=page_size,
        most=100,
        params={} if kind is None else {"type": kind},
        cursor_ok=lambda cursor: isinstance(cursor, str),
    )


class StreamReader:
    """The lines of a streamed chat answer: the text of each, and the whole answer at the
    end (an error event raises its typed error)."""

    def __init__(self) -> None:
        self.decoder = _core.SSEDecoder()
        self.state = _core.ChatAccumulator()

    @property
    def done(self) -> bool:
        return self.state.done

    def feed(self, line: str) -> str | None:
        """The text delta the line completes, if any."""
        data = self.decoder.feed(line)
        return None if data is None else self.state.event(data)

    def flush(self) -> str | None:
        """The text of an event left open when the stream ended."""
        data = self.decoder.flush()
        return None if data is None else self.state.event(data)

    def result(self) -> dict[str, Any]:
        """The whole answer; APIConnectionError if the stream ended before it was."""
        if not self.state.done and self.state.finish_reason is None:
            raise APIConnectionError("The chat stream ended before the answer was complete")
        return self.state.as_json()


def stream_broke(exc: httpx.HTTPError) -> APIConnectionError:
    return APIConnectionError(f"The chat stream broke: {exc}")
