"""The synchronous client (``httpx.Client``)."""

from __future__ import annotations

import builtins
import time
from collections.abc import Generator, Iterator, Mapping
from types import TracebackType
from typing import Any, Literal, overload

import httpx

from hypereal.client import _calls, _core
from hypereal.client._calls import Attempts, Call, ProgressCallback
from hypereal.client._core import MediaInput, Messages, PollPolicy, WaitState
from hypereal.client._errors import Conflict
from hypereal.client._types import (
    Balance,
    ChatResult,
    ImageResult,
    Job,
    LedgerEntry,
    Model,
    RunResult,
)


class Client(_calls.ClientBase):
    """The Hypereal API from Python.

    ``Client(base_url=..., api_key=...)``; without them, ``HYPEREAL_BASE_URL`` (default
    ``http://127.0.0.1:8000``) and ``HYPEREAL_API_KEY``. ``timeout`` is the HTTP timeout in
    seconds; failed calls are retried ``max_retries`` times (429 after ``Retry-After`` when
    it is at most ``max_retry_wait`` seconds, 5xx and network errors with backoff), each
    charging call with one Idempotency-Key across its retries so it is charged once.

    >>> client = Client()
    >>> job = client.run("audio-tts", {"text": "Hello"})
    >>> job.save("hello.wav")
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = 300.0,
        max_retries: int = 3,
        max_retry_wait: float = 60.0,
        poll: PollPolicy | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, max_retry_wait, poll)
        self._http = httpx.Client(**self._http_options())
        self.images = Images(self)
        self.videos = JobSubmitter(self, "video")
        self.audio = JobSubmitter(self, "audio")
        self.threed = JobSubmitter(self, "3d")
        self.jobs = Jobs(self)
        self.models = Models(self)

    # ----------------------------------------------------------------------- lifecycle

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------------- HTTP

    def _sleep(self, seconds: float) -> None:
        """Waits between retries (a test or an application may override it)."""
        time.sleep(seconds)

    def _send(self, call: Call) -> httpx.Response:
        """One call with its retries; returns a 2xx response or raises the typed error."""
        attempts = Attempts(self.retry, call, self.base_url)
        while True:
            try:
                response = self._http.send(call.request(self._http), stream=call.stream)
            except httpx.TransportError as exc:
                self._sleep(attempts.after_network_error(exc))
                continue
            if response.status_code < 400:
                return response
            try:
                response.read()
            finally:
                response.close()
            self._sleep(attempts.after_error(response))

    def _json(self, call: Call) -> dict[str, Any]:
        return _core.parse_json(self._send(call))

    # -------------------------------------------------------------------------- calls

    @overload
    def chat(
        self,
        messages: Messages,
        *,
        model: str | None = None,
        stream: Literal[False] = False,
        temperature: float | None = None,
        max_tokens: int | None = None,
        idempotency_key: str | None = None,
        **extra: Any,
    ) -> ChatResult: ...

    @overload
    def chat(
        self,
        messages: Messages,
        *,
        model: str | None = None,
        stream: Literal[True],
        temperature: float | None = None,
        max_tokens: int | None = None,
        idempotency_key: str | None = None,
        **extra: Any,
    ) -> ChatStream: ...

    def chat(
        self,
        messages: Messages,
        *,
        model: str | None = None,
        stream: bool = False,
        temperature: float | None = None,
        max_tokens: int | None = None,
        idempotency_key: str | None = None,
        **extra: Any,
    ) -> ChatResult | ChatStream:
        """A chat answer. ``messages``: a string (one user message) or ``{"role",
        "content"}`` dicts. With ``stream=True``, a :class:`ChatStream`: iterate it for the
        text deltas; its ``result`` then holds the usage and credits."""
        call = _calls.chat_call(
            messages, model, stream, temperature, max_tokens, idempotency_key, extra
        )
        if not stream:
            return ChatResult.from_json(self._json(call))
        return ChatStream(self._send(call))

    def run(
        self,
        model: str,
        input: Mapping[str, Any] | None = None,
        *,
        wait: bool = True,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> RunResult:
        """Run ``model`` on ``input`` through the route of its modality (read from
        ``GET /v1/models``) and return the result: a :class:`Job` (video, audio, 3D;
        waited for unless ``wait=False``, ``on_progress(job)`` called as it advances), an
        :class:`ImageResult` or a :class:`ChatResult`. Paths and bytes in ``input`` (and
        strings naming files, for the model's file parameters) are sent as data URIs."""
        values = {**(input or {}), **fields}
        plan = _calls.plan_run(self.models.get(model), values, idempotency_key)
        if plan.chat is not None:
            messages, rest = plan.chat
            answer: ChatResult = self.chat(
                messages, model=model, idempotency_key=idempotency_key, **rest
            )
            return answer
        if plan.image is not None:
            return ImageResult.from_json(self._json(plan.image), self._connection)
        state = WaitState(self.poll, timeout, on_progress) if wait else None
        submission = _calls.submission(
            plan.modality, model, plan.values, webhook_url, idempotency_key, state
        )
        return self._submit(submission, state)

    def _submit(self, submission: _calls.Submission, state: WaitState | None) -> Job:
        """Submit a job; wait for it with ``state`` unless that is None."""
        job = submission.job(self._json(submission.call), self._connection)
        if state is None or _calls.ended_at_submit(job, state):
            return job
        return self.jobs._wait(job.id, state)

    def webhook_secret(self) -> str:
        """The secret this account's webhooks are signed with (for :func:`verify_webhook`)."""
        return str(self._json(_calls.WEBHOOK_SECRET)["secret"])

    def balance(self) -> Balance:
        """The caller's credits."""
        return Balance.from_json(self._json(_calls.BALANCE))

    def usage(self, *, limit: int | None = None, page_size: int = 200) -> Iterator[LedgerEntry]:
        """The caller's ledger, newest first (pages fetched as the iteration goes on);
        ``limit`` stops after that many entries."""
        pager = _calls.usage_pager(limit, page_size)
        while (call := pager.next_call()) is not None:
            yield from pager.take(self._json(call))


class ChatStream:
    """A streamed chat answer: iterate it for the text deltas as they arrive. Once it is
    exhausted, ``result`` holds the whole :class:`ChatResult` (text, usage, credits). An
    error after the stream began is raised from the iteration as a typed error. Close it
    (or use ``with``) to stop early: the server stops generating and bills what it made."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._reader = _calls.StreamReader()
        self._deltas = self._read()
        self.result: ChatResult | None = None

    def __iter__(self) -> Iterator[str]:
        return self._deltas

    def _read(self) -> Generator[str]:
        reader = self._reader
        try:
            for line in self._response.iter_lines():
                if text := reader.feed(line):
                    yield text
                if reader.done:
                    break
            else:
                if text := reader.flush():
                    yield text
        except httpx.HTTPError as exc:
            raise _calls.stream_broke(exc) from exc
        finally:
            self._response.close()
        self.result = ChatResult.from_json(reader.result())

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._reader.state.parts)

    def until_done(self) -> ChatResult:
        """Read the rest of the stream; the whole answer."""
        for _ in self._deltas:
            pass
        assert self.result is not None
        return self.result

    def close(self) -> None:
        self._deltas.close()
        self._response.close()

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Images:
    """Synchronous image generation and editing (``client.images``)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def generate(
        self,
        prompt: str,
        *,
        model: str | None = None,
        size: str | None = None,
        aspect_ratio: str | None = None,
        output_format: str | None = None,
        seed: int | None = None,
        idempotency_key: str | None = None,
        **extra: Any,
    ) -> ImageResult:
        """Generate an image (``model`` defaults to the server's default image model)."""
        options = dict(size=size, aspect_ratio=aspect_ratio, output_format=output_format, seed=seed)
        call = _calls.image_call("image", prompt, model, {**options, **extra}, idempotency_key)
        return self._post(call)

    def edit(
        self,
        prompt: str,
        image: MediaInput | None = None,
        *,
        images: builtins.list[MediaInput] | None = None,
        model: str | None = None,
        size: str | None = None,
        aspect_ratio: str | None = None,
        output_format: str | None = None,
        seed: int | None = None,
        idempotency_key: str | None = None,
        **extra: Any,
    ) -> ImageResult:
        """Edit ``image`` (or ``images``): URLs, data URIs, paths or bytes."""
        inputs = {"image": image, "images": images}
        options = dict(size=size, aspect_ratio=aspect_ratio, output_format=output_format, seed=seed)
        values = {**inputs, **options, **extra}
        return self._post(_calls.image_call("image-edit", prompt, model, values, idempotency_key))

    def _post(self, call: Call) -> ImageResult:
        return ImageResult.from_json(self._client._json(call), self._client._connection)


class JobSubmitter:
    """``client.videos``, ``client.audio``, ``client.threed``: submit a job of one kind."""

    def __init__(self, client: Client, modality: str) -> None:
        self._client = client
        self.modality = modality

    def generate(
        self,
        model: str,
        input: Mapping[str, Any] | None = None,
        *,
        webhook_url: str | None = None,
        wait: bool = False,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> Job:
        """Submit a job (``input`` and/or keyword fields, files as paths or bytes) and
        return it as submitted, or finished with ``wait=True``."""
        client = self._client
        state = WaitState(client.poll, timeout, on_progress) if wait else None
        values = {**(input or {}), **fields}
        submission = _calls.submission(
            self.modality, model, values, webhook_url, idempotency_key, state
        )
        return client._submit(submission, state)


class Jobs:
    """``client.jobs``: get, list, cancel and wait for jobs."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def _get(self, job_id: str, hold: float | None = None) -> tuple[Job, bool]:
        response = self._client._send(_calls.job_call(job_id, hold))
        return _calls.read_job(response, self._client._connection)

    def get(self, job_id: str) -> Job:
        """A job's current state."""
        return self._get(job_id)[0]

    def list(
        self, *, type: str | None = None, limit: int | None = None, page_size: int = 100
    ) -> Iterator[Job]:
        """The caller's jobs, newest first, fetched ``page_size`` at a time as the iteration
        goes on; ``type``: ``video``, ``audio`` or ``3d``; ``limit`` stops after that many."""
        pager = _calls.jobs_pager(self._client._connection, type, limit, page_size)
        while (call := pager.next_call()) is not None:
            yield from pager.take(self._client._json(call))

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job (refunded). Conflict once it has finished;
        cancelling a job that is already canceled returns it."""
        try:
            data = self._client._json(_calls.cancel_call(job_id))
        except Conflict:
            job = self.get(job_id)
            if job.status == "canceled":  # e.g. our first try's answer was lost
                return job
            raise
        return Job.from_json(data, self._client._connection)

    def wait(
        self,
        job: str | Job,
        *,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Job:
        """Poll until the job ends (backing off; ``Prefer: wait`` where the server holds
        polls) and return it completed. ``on_progress(job)`` is called whenever its stage
        or progress changes. Raises JobFailed / JobCanceled, or WaitTimeout after
        ``timeout`` seconds."""
        job_id = job.id if isinstance(job, Job) else job
        return self._wait(job_id, WaitState(self._client.poll, timeout, on_progress))

    def _wait(self, job_id: str, state: WaitState) -> Job:
        while True:
            job, held = self._get(job_id, state.hold())
            delay = state.seen(job, held)
            if delay is None:
                return job
            if delay > 0:
                time.sleep(delay)


class Models:
    """``client.models``: the catalogue (``GET /v1/models``), cached per client."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def list(self) -> builtins.list[Model]:
        """Every model (fetched again on each call)."""
        models = _calls.read_models(self._client._json(_calls.MODELS))
        self._client._models = _calls.by_slug(models)
        return models

    def get(self, slug: str) -> Model:
        """One model, from the cached catalogue (fetched on first use or a miss)."""
        cached = self._client._models
        if cached is None or slug not in cached:
            self.list()
            cached = self._client._models
        assert cached is not None
        return _core.find_model(cached, slug)
