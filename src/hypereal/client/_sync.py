"""The synchronous client (``httpx.Client``)."""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable, Generator, Iterator, Mapping
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


class Client:
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
        self.base_url = _core.resolve_base_url(base_url)
        key = _core.resolve_api_key(api_key)
        if not key:
            raise AuthenticationError("No API key: pass api_key=... or set HYPEREAL_API_KEY")
        self.api_key = key
        self.retry = RetryPolicy(max_retries=max_retries, max_wait=max_retry_wait)
        self.poll = poll or PollPolicy()
        self._http = httpx.Client(
            base_url=self.base_url, headers=_core.default_headers(key), timeout=timeout
        )
        self._connection = Connection(self.base_url, key, timeout)
        self._models: dict[str, Model] | None = None
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

    def _send(
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
        """One call with its retries; returns a 2xx response or raises the typed error."""
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
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = self.retry.after_network_error(attempt)
                if delay is None:
                    raise APIConnectionError(
                        f"{method} {self.base_url}{path} failed: {exc or type(exc).__name__}"
                    ) from exc
                self._sleep(delay)
                continue
            if response.status_code < 400:
                return response
            try:
                response.read()
            finally:
                response.close()
            error = _core.error_from_response(response)
            delay = self.retry.after_error(attempt, error)
            if delay is None:
                raise error
            self._sleep(delay)

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return _core.parse_json(self._send(method, path, **kwargs))

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
                self._json("POST", ROUTES["chat"], json=body, idempotency_key=key)
            )
        response = self._send(
            "POST",
            ROUTES["chat"],
            json=body,
            idempotency_key=key,
            headers={"Accept": "text/event-stream"},
            stream=True,
        )
        return ChatStream(response)

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
        spec = self.models.get(model)
        route = _core.route_for(spec)
        values = _core.prepare_input({**(input or {}), **fields}, _core.media_params(spec))
        if spec.modality == "chat":
            messages, rest = _core.run_chat_arguments(values)
            answer: ChatResult = self.chat(
                messages, model=model, idempotency_key=idempotency_key, **rest
            )
            return answer
        if spec.modality in JOB_MODALITIES:
            return self._submit(
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
            self._json("POST", route, json=body, idempotency_key=key), self._connection
        )

    def _submit(
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
        data = self._json(
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
        if job.done:  # answered synchronously
            state.seen(job)
            return job
        return self.jobs._wait(job.id, state)

    def webhook_secret(self) -> str:
        """The secret this account's webhooks are signed with (for :func:`verify_webhook`)."""
        return str((self._json("GET", "/v1/webhooks/secret"))["secret"])

    def balance(self) -> Balance:
        """The caller's credits."""
        return Balance.from_json(self._json("GET", "/v1/credits"))

    def usage(self, *, limit: int | None = None, page_size: int = 200) -> Iterator[LedgerEntry]:
        """The caller's ledger, newest first (pages fetched as the iteration goes on);
        ``limit`` stops after that many entries."""
        yielded = 0
        before: Any = None
        while True:
            size = max(1, min(page_size, 200, limit - yielded if limit is not None else 200))
            params: dict[str, Any] = {"limit": size}
            if before is not None:
                params["before"] = before
            page = self._json("GET", "/v1/usage", params=params)
            for item in page.get("data") or ():
                yield LedgerEntry.from_json(item)
                yielded += 1
                if limit is not None and yielded >= limit:
                    return
            before = page.get("nextCursor")
            if not page.get("hasMore") or before is None:
                return


class ChatStream:
    """A streamed chat answer: iterate it for the text deltas as they arrive. Once it is
    exhausted, ``result`` holds the whole :class:`ChatResult` (text, usage, credits). An
    error after the stream began is raised from the iteration as a typed error. Close it
    (or use ``with``) to stop early: the server stops generating and bills what it made."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._state = _core.ChatAccumulator()
        self._deltas = self._read()
        self.result: ChatResult | None = None

    def __iter__(self) -> Iterator[str]:
        return self._deltas

    def _read(self) -> Generator[str]:
        decoder = SSEDecoder()
        try:
            for line in self._response.iter_lines():
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
            self._response.close()
        if not self._state.done and self._state.finish_reason is None:
            raise APIConnectionError("The chat stream ended before the answer was complete")
        self.result = ChatResult.from_json(self._state.as_json())

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._state.parts)

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
        values = dict(
            size=size, aspect_ratio=aspect_ratio, output_format=output_format, seed=seed, **extra
        )
        return self._post("/v1/images/generate", prompt, model, values, idempotency_key)

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
        values = dict(
            image=image,
            images=images,
            size=size,
            aspect_ratio=aspect_ratio,
            output_format=output_format,
            seed=seed,
            **extra,
        )
        return self._post("/v1/images/edit", prompt, model, values, idempotency_key)

    def _post(
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
        return ImageResult.from_json(
            client._json("POST", route, json=body, idempotency_key=key), client._connection
        )


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
        return self._client._submit(
            self.modality,
            model,
            {**(input or {}), **fields},
            webhook_url=webhook_url,
            idempotency_key=idempotency_key,
            wait=wait,
            on_progress=on_progress,
            timeout=timeout,
        )


class Jobs:
    """``client.jobs``: get, list, cancel and wait for jobs."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def _get(self, job_id: str, hold: float | None = None) -> tuple[Job, bool]:
        client = self._client
        response = client._send(
            "GET",
            f"/v1/jobs/{quote(job_id, safe='')}",
            headers=_core.prefer_wait_header(hold),
            timeout=_core.poll_timeout(hold),
        )
        job = Job.from_json(_core.parse_json(response), client._connection)
        return job, _core.preference_applied(response)

    def get(self, job_id: str) -> Job:
        """A job's current state."""
        return self._get(job_id)[0]

    def list(
        self, *, type: str | None = None, limit: int | None = None, page_size: int = 100
    ) -> Iterator[Job]:
        """The caller's jobs, newest first, fetched ``page_size`` at a time as the iteration
        goes on; ``type``: ``video``, ``audio`` or ``3d``; ``limit`` stops after that many."""
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
            page = client._json("GET", "/v1/jobs", params=params)
            for item in page.get("data") or ():
                yield Job.from_json(item, client._connection)
                yielded += 1
                if limit is not None and yielded >= limit:
                    return
            cursor = page.get("nextCursor")
            if not page.get("hasMore") or not isinstance(cursor, str):
                return
            before = cursor

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job (refunded). Conflict once it has finished;
        cancelling a job that is already canceled returns it."""
        client = self._client
        try:
            data = client._json("POST", f"/v1/jobs/{quote(job_id, safe='')}/cancel")
        except Conflict:
            job = self.get(job_id)
            if job.status == "canceled":  # e.g. our first try's answer was lost
                return job
            raise
        return Job.from_json(data, client._connection)

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
        data = self._client._json("GET", "/v1/models")
        models = [Model.from_json(item) for item in data.get("data") or ()]
        self._client._models = {model.slug: model for model in models}
        return models

    def get(self, slug: str) -> Model:
        """One model, from the cached catalogue (fetched on first use or a miss)."""
        cached = self._client._models
        if cached is None or slug not in cached:
            self.list()
            cached = self._client._models
        assert cached is not None
        return _core.find_model(cached, slug)
