"""The asynchronous client (``httpx.AsyncClient``): the same calls as :class:`Client`,
awaited; listings are async iterators and a streamed chat is iterated with ``async for``."""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from types import TracebackType
from typing import Any, Literal, overload
from urllib.parse import quote

import httpx

from hypereal.client import _core
from hypereal.client._core import (
    JOB_MODALITIES,
    ROUTES,
    MediaInput,
    Messages,
    PollPolicy,
    RetryPolicy,
    SSEDecoder,
    WaitState,
)
from hypereal.client._errors import APIConnectionError, AuthenticationError, Conflict
from hypereal.client._types import (
    Balance,
    ChatResult,
    Connection,
    ImageResult,
    Job,
    LedgerEntry,
    Model,
    RunResult,
)

ProgressCallback = Callable[[Job], object]


class AsyncClient:
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
        self.base_url = _core.resolve_base_url(base_url)
        key = _core.resolve_api_key(api_key)
        if not key:
            raise AuthenticationError("No API key: pass api_key=... or set HYPEREAL_API_KEY")
        self.api_key = key
        self.retry = RetryPolicy(max_retries=max_retries, max_wait=max_retry_wait)
        self.poll = poll or PollPolicy()
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=_core.default_headers(key),
            timeout=timeout,
            limits=httpx.Limits(max_connections=max_connections),
        )
        self._connection = Connection(self.base_url, key, timeout)
        self._models: dict[str, Model] | None = None
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

    async def _send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        stream: bool = False,
        timeout: Any = httpx.USE_CLIENT_DEFAULT,
    ) -> httpx.Response:
        extra = dict(headers or {})
        if idempotency_key is not None:
            extra["Idempotency-Key"] = idempotency_key
        attempt = 0
        while True:
            attempt += 1
            request = self._http.build_request(
                method, path, json=json, params=params, headers=extra, timeout=timeout
            )
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = self.retry.after_network_error(attempt)
                if delay is None:
                    raise APIConnectionError(
                        f"{method} {self.base_url}{path} failed: {exc or type(exc).__name__}"
                    ) from exc
                await self._sleep(delay)
                continue
            if response.status_code < 400:
                return response
            try:
                await response.aread()
            finally:
                await response.aclose()
            error = _core.error_from_response(response)
            delay = self.retry.after_error(attempt, error)
            if delay is None:
                raise error
            await self._sleep(delay)

    async def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return _core.parse_json(await self._send(method, path, **kwargs))

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
        body = _core.chat_body(
            messages,
            model=model,
            stream=stream,
            temperature=temperature,
            max_tokens=max_tokens,
            extra=extra,
        )
        key = idempotency_key or _core.new_idempotency_key()
        if not stream:
            return ChatResult.from_json(
                await self._json("POST", ROUTES["chat"], json=body, idempotency_key=key)
            )
        response = await self._send(
            "POST",
            ROUTES["chat"],
            json=body,
            idempotency_key=key,
            headers={"Accept": "text/event-stream"},
            stream=True,
        )
        return AsyncChatStream(response)

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
        spec = await self.models.get(model)
        route = _core.route_for(spec)
        values = _core.prepare_input({**(input or {}), **fields}, _core.media_params(spec))
        if spec.modality == "chat":
            messages, rest = _core.run_chat_arguments(values)
            answer: ChatResult = await self.chat(
                messages, model=model, idempotency_key=idempotency_key, **rest
            )
            return answer
        if spec.modality in JOB_MODALITIES:
            return await self._submit(
                spec.modality,
                model,
                values,
                webhook_url=webhook_url,
                idempotency_key=idempotency_key,
                wait=wait,
                on_progress=on_progress,
                timeout=timeout,
            )
        body = _core.image_body(None, model, values)
        key = idempotency_key or _core.new_idempotency_key()
        return ImageResult.from_json(
            await self._json("POST", route, json=body, idempotency_key=key), self._connection
        )

    async def _submit(
        self,
        modality: str,
        model: str | None,
        values: Mapping[str, Any],
        *,
        webhook_url: str | None,
        idempotency_key: str | None,
        wait: bool,
        on_progress: ProgressCallback | None,
        timeout: float | None,
    ) -> Job:
        state = WaitState(self.poll, timeout, on_progress) if wait else None
        hold = state.hold() if state is not None else None
        data = await self._json(
            "POST",
            ROUTES[modality],
            json=_core.job_body(model, values, webhook_url),
            idempotency_key=idempotency_key or _core.new_idempotency_key(),
            headers=_core.prefer_wait_header(hold),
            timeout=_core.poll_timeout(hold),
        )
        job = Job.from_json(data, self._connection, model=model, type=modality)
        if state is None:
            return job
        if job.done:
            state.seen(job)
            return job
        return await self.jobs._wait(job.id, state)

    async def webhook_secret(self) -> str:
        """The secret this account's webhooks are signed with (for :func:`verify_webhook`)."""
        return str((await self._json("GET", "/v1/webhooks/secret"))["secret"])

    async def balance(self) -> Balance:
        return Balance.from_json(await self._json("GET", "/v1/credits"))

    async def usage(
        self, *, limit: int | None = None, page_size: int = 200
    ) -> AsyncIterator[LedgerEntry]:
        """The caller's ledger, newest first: ``async for entry in client.usage()``."""
        yielded = 0
        before: Any = None
        while True:
            size = max(1, min(page_size, 200, limit - yielded if limit is not None else 200))
            params: dict[str, Any] = {"limit": size}
            if before is not None:
                params["before"] = before
            page = await self._json("GET", "/v1/usage", params=params)
            for item in page.get("data") or ():
                yield LedgerEntry.from_json(item)
                yielded += 1
                if limit is not None and yielded >= limit:
                    return
            before = page.get("nextCursor")
            if not page.get("hasMore") or before is None:
                return


class AsyncChatStream:
    """A streamed chat answer: ``async for delta in stream``; then ``stream.result``."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._state = _core.ChatAccumulator()
        self._deltas = self._read()
        self.result: ChatResult | None = None

    def __aiter__(self) -> AsyncIterator[str]:
        return self._deltas

    async def _read(self) -> AsyncGenerator[str]:
        decoder = SSEDecoder()
        try:
            async for line in self._response.aiter_lines():
                data = decoder.feed(line)
                if data is None:
                    continue
                text = self._state.event(data)
                if text:
                    yield text
                if self._state.done:
                    break
            else:
                data = decoder.flush()
                if data is not None and (text := self._state.event(data)):
                    yield text
        except httpx.HTTPError as exc:
            raise APIConnectionError(f"The chat stream broke: {exc}") from exc
        finally:
            await self._response.aclose()
        if not self._state.done and self._state.finish_reason is None:
            raise APIConnectionError("The chat stream ended before the answer was complete")
        self.result = ChatResult.from_json(self._state.as_json())

    @property
    def text(self) -> str:
        return "".join(self._state.parts)

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
        values = dict(
            size=size, aspect_ratio=aspect_ratio, output_format=output_format, seed=seed, **extra
        )
        return await self._post("/v1/images/generate", prompt, model, values, idempotency_key)

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
        values = dict(
            image=image,
            images=images,
            size=size,
            aspect_ratio=aspect_ratio,
            output_format=output_format,
            seed=seed,
            **extra,
        )
        return await self._post("/v1/images/edit", prompt, model, values, idempotency_key)

    async def _post(
        self,
        route: str,
        prompt: str,
        model: str | None,
        values: Mapping[str, Any],
        idempotency_key: str | None,
    ) -> ImageResult:
        body = _core.image_body(prompt, model, {k: v for k, v in values.items() if v is not None})
        key = idempotency_key or _core.new_idempotency_key()
        client = self._client
        data = await client._json("POST", route, json=body, idempotency_key=key)
        return ImageResult.from_json(data, client._connection)


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
        return await self._client._submit(
            self.modality,
            model,
            {**(input or {}), **fields},
            webhook_url=webhook_url,
            idempotency_key=idempotency_key,
            wait=wait,
            on_progress=on_progress,
            timeout=timeout,
        )


class AsyncJobs:
    """``client.jobs`` of :class:`AsyncClient`."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def _get(self, job_id: str, hold: float | None = None) -> tuple[Job, bool]:
        client = self._client
        response = await client._send(
            "GET",
            f"/v1/jobs/{quote(job_id, safe='')}",
            headers=_core.prefer_wait_header(hold),
            timeout=_core.poll_timeout(hold),
        )
        job = Job.from_json(_core.parse_json(response), client._connection)
        return job, _core.preference_applied(response)

    async def get(self, job_id: str) -> Job:
        return (await self._get(job_id))[0]

    async def list(
        self, *, type: str | None = None, limit: int | None = None, page_size: int = 100
    ) -> AsyncIterator[Job]:
        client = self._client
        yielded = 0
        before: str | None = None
        while True:
            size = max(1, min(page_size, 100, limit - yielded if limit is not None else 100))
            params: dict[str, Any] = {"limit": size}
            if type is not None:
                params["type"] = type
            if before is not None:
                params["before"] = before
            page = await client._json("GET", "/v1/jobs", params=params)
            for item in page.get("data") or ():
                yield Job.from_json(item, client._connection)
                yielded += 1
                if limit is not None and yielded >= limit:
                    return
            cursor = page.get("nextCursor")
            if not page.get("hasMore") or not isinstance(cursor, str):
                return
            before = cursor

    async def cancel(self, job_id: str) -> Job:
        client = self._client
        try:
            data = await client._json("POST", f"/v1/jobs/{quote(job_id, safe='')}/cancel")
        except Conflict:
            job = await self.get(job_id)
            if job.status == "canceled":
                return job
            raise
        return Job.from_json(data, client._connection)

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
        data = await self._client._json("GET", "/v1/models")
        models = [Model.from_json(item) for item in data.get("data") or ()]
        self._client._models = {model.slug: model for model in models}
        return models

    async def get(self, slug: str) -> Model:
        client = self._client
        if client._models is None or slug not in client._models:
            async with client._models_lock:  # concurrent first calls fetch it once
                if client._models is None or slug not in client._models:
                    await self.list()
        assert client._models is not None
        return _core.find_model(client._models, slug)
