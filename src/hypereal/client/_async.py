"""The asynchronous client (``httpx.AsyncClient``): the same calls as :class:`Client`,
awaited; listings are async iterators and a streamed chat is iterated with ``async for``."""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
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


class AsyncClient(_calls.ClientBase):
    """The Hypereal API from async Python; see :class:`hypereal.client.Client`.

    >>> async with AsyncClient() as client:
    ...     jobs = await asyncio.gather(
    ...         *(client.run("audio-tts", {"text": t}) for t in ("one", "two"))
    ...     )
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
        max_connections: int = 100,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, max_retry_wait, poll)
        self._http = httpx.AsyncClient(
            **self._http_options(), limits=httpx.Limits(max_connections=max_connections)
        )
        self._models_lock = asyncio.Lock()
        self.images = AsyncImages(self)
        self.videos = AsyncJobSubmitter(self, "video")
        self.audio = AsyncJobSubmitter(self, "audio")
        self.threed = AsyncJobSubmitter(self, "3d")
        self.jobs = AsyncJobs(self)
        self.models = AsyncModels(self)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _sleep(self, seconds: float) -> None:
        """Waits between retries (a test or an application may override it)."""
        await asyncio.sleep(seconds)

    async def _send(self, call: Call) -> httpx.Response:
        """One call with its retries; returns a 2xx response or raises the typed error."""
        attempts = Attempts(self.retry, call, self.base_url)
        while True:
            try:
                response = await self._http.send(call.request(self._http), stream=call.stream)
            except httpx.TransportError as exc:
                await self._sleep(attempts.after_network_error(exc))
                continue
            if response.status_code < 400:
                return response
            try:
                await response.aread()
            finally:
                await response.aclose()
            await self._sleep(attempts.after_error(response))

    async def _json(self, call: Call) -> dict[str, Any]:
        return _core.parse_json(await self._send(call))

    @overload
    async def chat(
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
    async def chat(
        self,
        messages: Messages,
        *,
        model: str | None = None,
        stream: Literal[True],
        temperature: float | None = None,
        max_tokens: int | None = None,
        idempotency_key: str | None = None,
        **extra: Any,
    ) -> AsyncChatStream: ...

    async def chat(
        self,
        messages: Messages,
        *,
        model: str | None = None,
        stream: bool = False,
        temperature: float | None = None,
        max_tokens: int | None = None,
        idempotency_key: str | None = None,
        **extra: Any,
    ) -> ChatResult | AsyncChatStream:
        """See :meth:`Client.chat`; a stream is iterated with ``async for``."""
        call = _calls.chat_call(
            messages, model, stream, temperature, max_tokens, idempotency_key, extra
        )
        if not stream:
            return ChatResult.from_json(await self._json(call))
        return AsyncChatStream(await self._send(call))

    async def run(
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
        """See :meth:`Client.run`."""
        values = {**(input or {}), **fields}
        plan = _calls.plan_run(await self.models.get(model), values, idempotency_key)
        if plan.chat is not None:
            messages, rest = plan.chat
            answer: ChatResult = await self.chat(
                messages, model=model, idempotency_key=idempotency_key, **rest
            )
            return answer
        if plan.image is not None:
            return ImageResult.from_json(await self._json(plan.image), self._connection)
        state = WaitState(self.poll, timeout, on_progress) if wait else None
        submission = _calls.submission(
            plan.modality, model, plan.values, webhook_url, idempotency_key, state
        )
        return await self._submit(submission, state)

    async def _submit(self, submission: _calls.Submission, state: WaitState | None) -> Job:
        """Submit a job; wait for it with ``state`` unless that is None."""
        job = submission.job(await self._json(submission.call), self._connection)
        if state is None or _calls.ended_at_submit(job, state):
            return job
        return await self.jobs._wait(job.id, state)

    async def webhook_secret(self) -> str:
        """The secret this account's webhooks are signed with (for :func:`verify_webhook`)."""
        return str((await self._json(_calls.WEBHOOK_SECRET))["secret"])

    async def balance(self) -> Balance:
        return Balance.from_json(await self._json(_calls.BALANCE))

    async def usage(
        self, *, limit: int | None = None, page_size: int = 200
    ) -> AsyncIterator[LedgerEntry]:
        """The caller's ledger, newest first: ``async for entry in client.usage()``."""
        pager = _calls.usage_pager(limit, page_size)
        while (call := pager.next_call()) is not None:
            for entry in pager.take(await self._json(call)):
                yield entry


class AsyncChatStream:
    """A streamed chat answer: ``async for delta in stream``; then ``stream.result``."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._reader = _calls.StreamReader()
        self._deltas = self._read()
        self.result: ChatResult | None = None

    def __aiter__(self) -> AsyncIterator[str]:
        return self._deltas

    async def _read(self) -> AsyncGenerator[str]:
        reader = self._reader
        try:
            async for line in self._response.aiter_lines():
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
            await self._response.aclose()
        self.result = ChatResult.from_json(reader.result())

    @property
    def text(self) -> str:
        return "".join(self._reader.state.parts)

    async def until_done(self) -> ChatResult:
        async for _ in self._deltas:
            pass
        assert self.result is not None
        return self.result

    async def close(self) -> None:
        await self._deltas.aclose()
        await self._response.aclose()

    async def __aenter__(self) -> AsyncChatStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class AsyncImages:
    """``client.images`` of :class:`AsyncClient`."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def generate(
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
        options = dict(size=size, aspect_ratio=aspect_ratio, output_format=output_format, seed=seed)
        call = _calls.image_call("image", prompt, model, {**options, **extra}, idempotency_key)
        return await self._post(call)

    async def edit(
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
        inputs = {"image": image, "images": images}
        options = dict(size=size, aspect_ratio=aspect_ratio, output_format=output_format, seed=seed)
        values = {**inputs, **options, **extra}
        return await self._post(
            _calls.image_call("image-edit", prompt, model, values, idempotency_key)
        )

    async def _post(self, call: Call) -> ImageResult:
        return ImageResult.from_json(await self._client._json(call), self._client._connection)


class AsyncJobSubmitter:
    """``client.videos`` / ``client.audio`` / ``client.threed`` of :class:`AsyncClient`."""

    def __init__(self, client: AsyncClient, modality: str) -> None:
        self._client = client
        self.modality = modality

    async def generate(
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
        client = self._client
        state = WaitState(client.poll, timeout, on_progress) if wait else None
        values = {**(input or {}), **fields}
        submission = _calls.submission(
            self.modality, model, values, webhook_url, idempotency_key, state
        )
        return await client._submit(submission, state)


class AsyncJobs:
    """``client.jobs`` of :class:`AsyncClient`."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def _get(self, job_id: str, hold: float | None = None) -> tuple[Job, bool]:
        response = await self._client._send(_calls.job_call(job_id, hold))
        return _calls.read_job(response, self._client._connection)

    async def get(self, job_id: str) -> Job:
        return (await self._get(job_id))[0]

    async def list(
        self, *, type: str | None = None, limit: int | None = None, page_size: int = 100
    ) -> AsyncIterator[Job]:
        pager = _calls.jobs_pager(self._client._connection, type, limit, page_size)
        while (call := pager.next_call()) is not None:
            for job in pager.take(await self._client._json(call)):
                yield job

    async def cancel(self, job_id: str) -> Job:
        try:
            data = await self._client._json(_calls.cancel_call(job_id))
        except Conflict:
            job = await self.get(job_id)
            if job.status == "canceled":
                return job
            raise
        return Job.from_json(data, self._client._connection)

    async def wait(
        self,
        job: str | Job,
        *,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Job:
        job_id = job.id if isinstance(job, Job) else job
        return await self._wait(job_id, WaitState(self._client.poll, timeout, on_progress))

    async def _wait(self, job_id: str, state: WaitState) -> Job:
        while True:
            job, held = await self._get(job_id, state.hold())
            delay = state.seen(job, held)
            if delay is None:
                return job
            if delay > 0:
                await asyncio.sleep(delay)


class AsyncModels:
    """``client.models`` of :class:`AsyncClient`."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def list(self) -> builtins.list[Model]:
        models = _calls.read_models(await self._client._json(_calls.MODELS))
        self._client._models = _calls.by_slug(models)
        return models

    async def get(self, slug: str) -> Model:
        client = self._client
        if client._models is None or slug not in client._models:
            async with client._models_lock:  # concurrent first calls fetch it once
                if client._models is None or slug not in client._models:
                    await self.list()
        assert client._models is not None
        return _core.find_model(client._models, slug)
