"""OpenAICompatible against a real HTTP server speaking the OpenAI protocol (tests/support)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import time
import wave
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from dataclasses import replace
from typing import Any

import openai
import pytest
from fastapi import FastAPI
from fastapi.responses import RedirectResponse

from hypereal.backends.base import (
    AudioBackend,
    BackendError,
    BackendUnavailable,
    ChatBackend,
    ChatDelta,
    ChatMessage,
    ChatRequest,
    ImageBackend,
    ImageRequest,
    JobRequest,
    MediaBlob,
    ToolCall,
)
from hypereal.backends.openai_compat import OpenAICompatible, estimate_prompt_tokens
from hypereal.domain.chat import merge_tool_calls
from tests.support.openai_server import WEATHER_TOOL as TOOL
from tests.support.openai_server import OpenAIFake
from tests.support.sample_media import image_bytes
from tests.support.servers import free_port, serve_app

MESSAGES = (
    ChatMessage("system", "You are terse."),
    ChatMessage("user", "Say hello to the whole world"),
)


def chat(max_tokens: int = 100, model: str | None = "fake-model") -> ChatRequest:
    return ChatRequest(MESSAGES, temperature=0.5, max_tokens=max_tokens, upstream_model=model)


async def collect(backend: OpenAICompatible, request: ChatRequest) -> list[ChatDelta]:
    async with aclosing(backend.stream(request)) as stream:
        return [delta async for delta in stream]


async def no_progress(fraction: float, message: str) -> None:
    pass


@pytest.fixture
def fake() -> OpenAIFake:
    return OpenAIFake()


@pytest.fixture
def server(fake: OpenAIFake) -> Iterator[str]:
    with serve_app(fake.app) as url:
        yield url


def make_backend(server: str, fake: OpenAIFake, **options: Any) -> OpenAICompatible:
    return OpenAICompatible(
        {"base_url": server + "/v1", "api_key": fake.api_key, "retry_backoff": 0, **options}
    )


@pytest.fixture
async def backend(server: str, fake: OpenAIFake) -> AsyncIterator[OpenAICompatible]:
    instance = make_backend(server, fake)
    yield instance
    await instance.aclose()


# ------------------------------------------------------------------------ options


def test_backend_implements_chat_image_and_audio_protocols(server: str, fake: OpenAIFake) -> None:
    backend = make_backend(server, fake)
    assert isinstance(backend, ChatBackend)
    assert isinstance(backend, ImageBackend)
    assert isinstance(backend, AudioBackend)


def test_missing_base_url_makes_backend_unavailable() -> None:
    with pytest.raises(BackendUnavailable, match="base_url"):
        OpenAICompatible({"api_key": "sk"})


@pytest.mark.parametrize(
    "options",
    [
        {"timeout": "soon"},
        {"headers": {"X-Title": 3}},
        {"max_tokens_param": "n_predict"},
        {"image_response_format": "png"},
    ],
)
def test_malformed_options_make_backend_unavailable(options: dict[str, Any]) -> None:
    with pytest.raises(BackendUnavailable):
        OpenAICompatible({"base_url": "http://127.0.0.1:9/v1", **options})


# --------------------------------------------------------------------------- chat


async def test_stream_yields_one_delta_per_upstream_token_and_concatenates(
    backend: OpenAICompatible, fake: OpenAIFake
) -> None:
    deltas = await collect(backend, chat())

    texts = [d.text for d in deltas if d.text]
    assert texts == list(fake.tokens)
    assert "".join(texts) == "Hello, world!"


async def test_finished_streams_reuse_one_upstream_connection(
    backend: OpenAICompatible, fake: OpenAIFake
) -> None:
    for _ in range(3):
        deltas = await collect(backend, chat())
        assert deltas[-1].finish_reason == "stop"
    peers = {r.client for r in fake.requests if r.path == "/v1/chat/completions"}
    # A body left unread after [DONE] would make httpx drop the connection every time.
    assert len(fake.requests) == 3 and len(peers) == 1


async def test_stream_sends_model_sampling_and_usage_request(
    backend: OpenAICompatible, fake: OpenAIFake
) -> None:
    await collect(backend, chat(max_tokens=50))

    body = fake.requests[-1].body
    assert fake.requests[-1].path == "/v1/chat/completions"
    assert fake.requests[-1].authorization == "Bearer sk-test"
    assert body["model"] == "fake-model"
    assert body["messages"] == [{"role": m.role, "content": m.content} for m in MESSAGES]
    assert (body["temperature"], body["max_tokens"]) == (0.5, 50)
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


async def test_whole_answer_is_one_non_streamed_completion(
    backend: OpenAICompatible, fake: OpenAIFake
) -> None:
    request = ChatRequest(MESSAGES, temperature=0.5, max_tokens=50, whole=True)
    deltas = await collect(backend, replace(request, upstream_model="fake-model"))

    body = fake.requests[-1].body
    assert "stream" not in body and "stream_options" not in body
    assert [d.text for d in deltas if d.text] == ["".join(fake.tokens)]
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].completion_tokens == len(fake.tokens)
    assert backend.answers_whole is True


async def test_deltas_arrive_while_upstream_is_still_generating(server: str) -> None:
    fake = OpenAIFake(tokens=["a", "b", "c", "d"], token_delay=0.2)
    with serve_app(fake.app) as url:
        backend = make_backend(url, fake)
        async with aclosing(backend.stream(chat())) as stream:
            first = await anext(stream)
            # The first token reached us before the server had written the rest.
            assert first.text == "a"
            assert fake.stats.tokens_sent < 3
            assert fake.stats.completed == 0
            rest = [d async for d in stream]
        await backend.aclose()
    assert [d.text for d in rest if d.text] == ["b", "c", "d"]


async def test_final_delta_carries_finish_reason_and_usage_of_final_chunk(
    backend: OpenAICompatible, fake: OpenAIFake
) -> None:
    deltas = await collect(backend, chat())

    final = deltas[-1]
    assert final.text == ""
    assert final.finish_reason == "stop"
    assert final.prompt_tokens == 3 + 6  # the fake counts words
    assert final.completion_tokens == len(fake.tokens)
    assert all(d.finish_reason is None for d in deltas[:-1])


async def test_token_limit_ends_with_finish_reason_length(backend: OpenAICompatible) -> None:
    deltas = await collect(backend, chat(max_tokens=2))

    assert [d.text for d in deltas if d.text] == ["Hello", ","]
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].completion_tokens == 2


async def test_max_completion_tokens_param_is_used_when_configured(
    server: str, fake: OpenAIFake
) -> None:
    backend = make_backend(server, fake, max_tokens_param="max_completion_tokens")
    await collect(backend, chat(max_tokens=7))
    await backend.aclose()

    assert fake.requests[-1].body["max_completion_tokens"] == 7
    assert "max_tokens" not in fake.requests[-1].body


async def test_closing_the_stream_early_stops_the_upstream() -> None:
    fake = OpenAIFake(tokens=[f"t{i} " for i in range(300)], token_delay=0.02)
    with serve_app(fake.app) as url:
        backend = make_backend(url, fake)
        stream = backend.stream(chat(max_tokens=1000))
        received = [await anext(stream) for _ in range(4)]  # role chunk has no text
        await stream.aclose()

        await fake.stats.wait_for_abort()
        sent = fake.tokens_sent
        await asyncio.sleep(0.3)  # would be ~15 more tokens if the server kept going
        assert fake.tokens_sent == sent
        await backend.aclose()
    assert [d.text for d in received] == ["t0 ", "t1 ", "t2 ", "t3 "]
    assert sent < 20
    assert fake.stats.completed == 0


async def test_missing_model_id_is_reported_before_calling_upstream(
    backend: OpenAICompatible, fake: OpenAIFake
) -> None:
    with pytest.raises(BackendError, match="upstream_model"):
        await collect(backend, chat(model=None))
    assert fake.requests == []


async def test_option_model_is_used_when_binding_names_none(server: str, fake: OpenAIFake) -> None:
    backend = make_backend(server, fake, model="served-name")
    await collect(backend, chat(model=None))
    await backend.aclose()

    assert fake.requests[-1].body["model"] == "served-name"


async def test_extra_headers_are_sent_and_no_key_means_no_authorization(
    server: str, fake: OpenAIFake
) -> None:
    fake.api_key = None  # a local server without auth, like llama.cpp by default
    backend = OpenAICompatible({"base_url": server + "/v1", "headers": {"X-Title": "hypereal"}})
    await collect(backend, chat())
    await backend.aclose()

    assert fake.requests[-1].authorization is None
    assert fake.requests[-1].headers["x-title"] == "hypereal"


# ------------------------------------------------------------------ chat failures


async def test_rejected_api_key_maps_to_credentials_error(server: str, fake: OpenAIFake) -> None:
    backend = OpenAICompatible({"base_url": server + "/v1", "api_key": "sk-wrong"})
    with pytest.raises(BackendError) as caught:
        await collect(backend, chat())
    await backend.aclose()

    assert caught.value.client_error is False
    assert "rejected the configured credentials (HTTP 401)" in caught.value.message
    assert "Incorrect API key provided" in caught.value.message


async def test_upstream_400_is_a_client_error_with_upstream_message(
    backend: OpenAICompatible, fake: OpenAIFake
) -> None:
    fake.failure = "bad_request"
    with pytest.raises(BackendError) as caught:
        await collect(backend, chat())

    assert caught.value.client_error is True
    assert "maximum context length is 4096 tokens" in caught.value.message


async def test_upstream_500_is_a_server_error(backend: OpenAICompatible, fake: OpenAIFake) -> None:
    fake.failure = "server_error"
    with pytest.raises(BackendError) as caught:
        await collect(backend, chat())

    assert caught.value.client_error is False
    assert "failed (HTTP 500)" in caught.value.message
    assert "The server had an error" in caught.value.message
    assert len(fake.requests) == 1  # a POST that reached the server is never retried


async def test_rate_limited_request_is_retried(backend: OpenAICompatible, fake: OpenAIFake) -> None:
    fake.failure, fake.failure_times = "rate_limited", 1
    deltas = await collect(backend, chat())

    assert "".join(d.text for d in deltas) == "Hello, world!"
    assert len(fake.requests) == 2


async def test_error_object_mid_stream_raises_after_the_tokens_before_it(
    backend: OpenAICompatible, fake: OpenAIFake
) -> None:
    fake.failure = "error_mid_stream"
    received: list[str] = []
    with pytest.raises(BackendError) as caught:
        async with aclosing(backend.stream(chat())) as stream:
            async for delta in stream:
                received.append(delta.text)

    assert received == ["Hello", ","]
    assert "failed mid-stream" in caught.value.message
    assert "The server had an error" in caught.value.message
    assert caught.value.client_error is False


async def test_stream_cut_short_without_finish_raises(
    backend: OpenAICompatible, fake: OpenAIFake
) -> None:
    fake.failure = "cut_mid_stream"
    with pytest.raises(BackendError, match="closed the stream before the answer was complete"):
        await collect(backend, chat())


async def test_slow_upstream_times_out_with_clear_error(server: str, fake: OpenAIFake) -> None:
    fake.failure, fake.slow_seconds = "slow", 1.0
    backend = make_backend(server, fake, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(BackendError, match=r"did not answer within 0\.3 s"):
        await collect(backend, chat())
    await backend.aclose()

    assert time.monotonic() - started < 0.9


async def test_unreachable_upstream_maps_to_backend_error() -> None:
    backend = OpenAICompatible(
        {"base_url": f"http://127.0.0.1:{free_port()}/v1", "retries": 1, "retry_backoff": 0}
    )
    with pytest.raises(BackendError, match="Could not reach the OpenAI-compatible upstream"):
        await collect(backend, chat())
    await backend.aclose()


# ---------------------------------------------------------------- token counting


async def test_prompt_tokens_are_estimated_conservatively_without_tokenizer(
    backend: OpenAICompatible,
) -> None:
    count = await backend.count_prompt_tokens(chat())

    # ceil(14/3) + ceil(28/3) text tokens, 4 per message, 3 for the reply.
    assert count == 5 + 10 + 8 + 3
    assert count == estimate_prompt_tokens(MESSAGES)
    assert estimate_prompt_tokens([ChatMessage("user", "字" * 30)]) >= 30  # CJK: ~1/char


async def test_prompt_tokens_come_from_vllm_tokenize_endpoint(
    server: str, fake: OpenAIFake
) -> None:
    backend = make_backend(server, fake, tokenize_endpoint="/tokenize")
    count = await backend.count_prompt_tokens(chat())
    await backend.aclose()

    assert count == 9 + 5  # the fake's vLLM count: words + its template tokens
    sent = fake.requests[-1]
    assert sent.path == "/tokenize"
    assert sent.body["messages"][1] == {"role": "user", "content": MESSAGES[1].content}
    assert sent.body["model"] == "fake-model"


async def test_prompt_tokens_from_llama_cpp_tokenize_add_template_allowance(
    server: str, fake: OpenAIFake
) -> None:
    fake.tokenize_style = "llama_cpp"
    backend = make_backend(server, fake, tokenize_endpoint=server + "/tokenize")
    count = await backend.count_prompt_tokens(chat())
    await backend.aclose()

    assert count == 9 + 4 * 2 + 3


async def test_failing_tokenize_endpoint_falls_back_to_estimate(
    server: str, fake: OpenAIFake
) -> None:
    backend = make_backend(server, fake, tokenize_endpoint="/no-such-endpoint")
    count = await backend.count_prompt_tokens(chat())
    await backend.aclose()

    assert count == estimate_prompt_tokens(MESSAGES)


# ------------------------------------------------------------------------- images


async def test_generation_decodes_b64_images_and_sniffs_their_type(
    backend: OpenAICompatible, fake: OpenAIFake
) -> None:
    request = ImageRequest(
        prompt="a red fox", width=48, height=32, upstream_model="flux", params={"n": 2}
    )
    images = await backend.generate_images(request)

    assert [i.content_type for i in images] == ["image/png", "image/png"]
    assert images[0].data.startswith(b"\x89PNG")
    body = fake.requests[-1].body
    assert fake.requests[-1].path == "/v1/images/generations"
    assert body == {
        "model": "flux",
        "prompt": "a red fox",
        "size": "48x32",
        "response_format": "b64_json",
        "n": 2,
    }


async def test_generation_in_jpeg_is_requested_and_sniffed(backend: OpenAICompatible) -> None:
    images = await backend.generate_images(
        ImageRequest(prompt="fox", output_format="jpeg", upstream_model="flux")
    )
    assert images[0].content_type == "image/jpeg"


async def test_gpt_image_models_get_no_response_format(
    backend: OpenAICompatible, fake: OpenAIFake
) -> None:
    await backend.generate_images(
        ImageRequest(prompt="fox", aspect_ratio="16:9", upstream_model="gpt-image-1")
    )
    body = fake.requests[-1].body
    assert "response_format" not in body
    assert body["size"] == "1536x1024"


async def test_image_returned_by_url_is_downloaded_without_credentials(
    server: str, fake: OpenAIFake
) -> None:
    backend = make_backend(server, fake, image_response_format="url")
    images = await backend.generate_images(ImageRequest(prompt="fox", upstream_model="dall-e-3"))
    await backend.aclose()

    assert images[0].content_type == "image/png"
    assert fake.requests[-1].body["response_format"] == "url"
    assert len(fake.media.downloads) == 1
    assert fake.media.downloads[0].authorization is None


async def test_edit_sends_source_image_as_multipart(
    backend: OpenAICompatible, fake: OpenAIFake
) -> None:
    source = MediaBlob(image_bytes(16, 16, "webp"), "image/webp")
    images = await backend.generate_images(
        ImageRequest(prompt="make it blue", images=[source], upstream_model="gpt-image-1")
    )

    assert images[0].content_type == "image/png"
    sent = fake.requests[-1]
    assert sent.path == "/v1/images/edits"
    assert sent.body == {"model": "gpt-image-1", "prompt": "make it blue"}
    assert sent.files == [("image", "image/webp", source.data)]


async def test_edit_with_several_images_uses_array_parts(
    backend: OpenAICompatible, fake: OpenAIFake
) -> None:
    sources = [MediaBlob(image_bytes(8, 8, "png"), "image/png") for _ in range(2)]
    await backend.generate_images(ImageRequest(prompt="merge", images=sources, upstream_model="m"))

    assert [name for name, _, _ in fake.requests[-1].files] == ["image[]", "image[]"]


async def test_image_request_rejected_upstream_is_a_client_error(
    backend: OpenAICompatible,
) -> None:
    with pytest.raises(BackendError) as caught:
        await backend.generate_images(ImageRequest(prompt="", upstream_model="flux"))
    assert caught.value.client_error is True
    assert "Missing required parameter: 'prompt'" in caught.value.message


# ------------------------------------------------------------------------- speech


async def test_speech_returns_wav_bytes(backend: OpenAICompatible, fake: OpenAIFake) -> None:
    calls: list[tuple[float, str]] = []

    async def progress(fraction: float, message: str) -> None:
        calls.append((fraction, message))

    request = JobRequest(
        job_id="j1", input={"text": "Hello there", "speed": 1.25}, upstream_model="tts-1"
    )
    result = await backend.generate_audio(request, progress)

    assert result.output.content_type == "audio/wav"
    with wave.open(io.BytesIO(result.output.data)) as audio:
        assert audio.getnframes() > 0
    assert fake.requests[-1].body == {
        "model": "tts-1",
        "input": "Hello there",
        "voice": "alloy",
        "response_format": "wav",
        "speed": 1.25,
    }
    assert calls[-1] == (1.0, "Completed")


async def test_speech_in_mp3_with_named_voice(backend: OpenAICompatible, fake: OpenAIFake) -> None:
    request = JobRequest(
        job_id="j2", input={"text": "Hi", "voice": "nova", "format": "mp3"}, upstream_model="tts-1"
    )
    result = await backend.generate_audio(request, no_progress)

    assert result.output.content_type == "audio/mpeg"
    assert fake.requests[-1].body["voice"] == "nova"
    assert fake.requests[-1].body["response_format"] == "mp3"


async def test_speech_without_text_is_a_client_error(backend: OpenAICompatible) -> None:
    request = JobRequest(job_id="j3", input={"text": "  "}, upstream_model="tts-1")
    with pytest.raises(BackendError) as caught:
        await backend.generate_audio(request, no_progress)
    assert caught.value.client_error is True


# --------------------------------------------------- the fake speaks the real protocol


async def test_official_openai_sdk_talks_to_the_fake_unchanged(
    server: str, fake: OpenAIFake
) -> None:
    client = openai.AsyncOpenAI(base_url=server + "/v1", api_key="sk-test", max_retries=0)
    stream = await client.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "hello there"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello, world!"
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (2, 4)

    whole = await client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert whole.choices[0].message.content == "Hello,"
    assert whole.choices[0].finish_reason == "length"

    generated = await client.images.generate(
        model="dall-e-2", prompt="fox", response_format="b64_json"
    )
    assert generated.data
    assert base64.b64decode(generated.data[0].b64_json or "").startswith(b"\x89PNG")
    edited = await client.images.edit(
        model="gpt-image-1", image=("in.png", image_bytes(8, 8), "image/png"), prompt="blue"
    )
    assert edited.data and edited.data[0].b64_json
    assert fake.requests[-1].files[0][0] == "image"

    speech = await client.audio.speech.create(
        model="tts-1", voice="alloy", input="hi", response_format="wav"
    )
    assert speech.content.startswith(b"RIFF")
    await client.close()


async def test_official_openai_sdk_reads_the_fakes_errors(server: str, fake: OpenAIFake) -> None:
    client = openai.AsyncOpenAI(base_url=server + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    client = openai.AsyncOpenAI(base_url=server + "/v1", api_key="sk-test", max_retries=0)
    fake.failure, fake.failure_times = "bad_request", 1
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert bad.value.code == "context_length_exceeded"

    fake.failure, fake.failure_times = "error_mid_stream", 1
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], stream=True
    )
    with pytest.raises(openai.APIError, match="The server had an error"):
        async for _ in stream:
            pass
    await client.close()


# ------------------------------------------------------- pooled client and SSRF guard


async def test_concurrent_streams_share_one_pool_of_connections(
    backend: OpenAICompatible, fake: OpenAIFake
) -> None:
    for _ in range(2):
        rounds = await asyncio.gather(*(collect(backend, chat()) for _ in range(6)))
        assert all("".join(d.text for d in deltas) == "Hello, world!" for deltas in rounds)
    peers = {r.client for r in fake.requests}
    # The second round reused the first round's connections: one pool for the backend.
    assert len(fake.requests) == 12 and len(peers) <= 6


def redirecting_upstream(target: str) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def moved() -> RedirectResponse:
        return RedirectResponse(target + "/v1/chat/completions", status_code=307)

    return app


async def test_redirect_to_a_private_address_is_refused_unless_allowed(
    server: str, fake: OpenAIFake
) -> None:
    # The configured base_url is trusted; the host it redirects to (another loopback port)
    # is not, unless allow-listed.
    with serve_app(redirecting_upstream(server)) as moved:
        backend = OpenAICompatible({"base_url": moved + "/v1", "api_key": fake.api_key})
        with pytest.raises(BackendError, match="allowed_private_networks"):
            await collect(backend, chat())
        await backend.aclose()
        assert fake.requests == []

        fake.api_key = None  # the key is not sent on to another origin
        backend = OpenAICompatible(
            {
                "base_url": moved + "/v1",
                "api_key": "sk-test",
                "allowed_private_networks": ["127.0.0.0/8"],
            }
        )
        deltas = await collect(backend, chat())
        await backend.aclose()
    assert "".join(d.text for d in deltas) == "Hello, world!"
    assert len(fake.requests) == 1 and fake.requests[0].authorization is None


class _Chunks:
    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts

    async def chunks(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            yield part


@pytest.mark.parametrize("end", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
async def test_sse_events_parse_any_line_end_split_anywhere(end: bytes, size: int) -> None:
    from hypereal.backends.upstream.chat import sse_events

    text = (
        b": keep-alive" + end + end
        + b"data: one" + end + end
        + b"event: error" + end + b"data: two" + end + b"data:three" + end + end
        + b"data: caf\xc3\xa9" + end + end
        + b"data: last"  # no line end at all
    )  # fmt: skip
    parts = [text[i : i + size] for i in range(0, len(text), size)]
    events = [event async for event in sse_events(_Chunks(parts))]  # type: ignore[arg-type]
    assert events == [(None, "one"), ("error", "two\nthree"), (None, "café"), (None, "last")]


# ----------------------------------------------------------------- tools and n

ASK = (ChatMessage("user", "Weather in Paris?"),)
CALL = ToolCall(index=0, id="call_1", name="get_weather", arguments='{"city": "Paris"}')


def ask(
    messages: tuple[ChatMessage, ...] = ASK, whole: bool = False, **options: Any
) -> ChatRequest:
    """A request with OpenAI ``options`` (``tools``, ``n``...), as the route passes them."""
    return ChatRequest(messages, 0.5, 100, "fake-model", whole=whole, options=options or None)


@pytest.mark.parametrize("whole", [False, True])
async def test_a_tool_call_arrives_streamed_in_pieces_or_whole(
    backend: OpenAICompatible, whole: bool
) -> None:
    deltas = await collect(backend, ask(whole=whole, tools=[TOOL]))
    pieces = [piece for delta in deltas for piece in delta.tool_calls]
    if whole:
        assert len(pieces) == 1
    else:  # the piece with the id and name, then the arguments 4 characters at a time
        assert [piece.arguments for piece in pieces] == ["", '{"ci', 'ty":', ' "Pa', 'ris"', "}"]
        assert all(piece.id is None and piece.name is None for piece in pieces[1:])
    (call,) = merge_tool_calls(pieces)
    assert (call.name, call.arguments) == ("get_weather", '{"city": "Paris"}')
    assert call.id is not None and call.id.startswith("call_0_")
    assert not any(delta.text for delta in deltas)
    assert deltas[-1].finish_reason == "tool_calls"
    assert deltas[-1].completion_tokens == 6  # the fake's count: one per piece


@pytest.mark.parametrize("whole", [False, True])
async def test_each_of_n_choices_has_its_index_and_its_finish(
    backend: OpenAICompatible, fake: OpenAIFake, whole: bool
) -> None:
    deltas = await collect(backend, ask(whole=whole, n=2))
    texts = ["".join(d.text for d in deltas if d.choice == index) for index in (0, 1)]
    assert texts == ["Hello, world!", "Hello, world! again"]
    finishes = [(d.choice, d.finish_reason) for d in deltas if d.finish_reason]
    assert finishes == [(0, "stop"), (1, "stop")]
    assert deltas[-1].completion_tokens == 9  # both choices: 4 + 5 tokens
    assert fake.requests[-1].body["n"] == 2


async def test_calls_and_tool_answers_go_upstream_in_openai_shape(
    backend: OpenAICompatible, fake: OpenAIFake
) -> None:
    messages = (
        *ASK,
        ChatMessage("assistant", "", tool_calls=(CALL,)),
        ChatMessage("tool", "Sunny, 24 C", tool_call_id="call_1"),
    )
    deltas = await collect(backend, ask(messages, tools=[TOOL], tool_choice="auto"))
    assert "".join(d.text for d in deltas) == "Hello, world!"  # the answer after the tool's
    sent = fake.requests[-1].body
    assert sent["messages"][1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 C"},
    ]
    assert (sent["tools"], sent["tool_choice"]) == ([TOOL], "auto")


async def test_the_prompt_estimate_counts_tools_and_calls(backend: OpenAICompatible) -> None:
    def tokens(value: object) -> int:  # compact JSON's UTF-8 bytes / 3, rounded up
        return math.ceil(len(json.dumps(value, separators=(",", ":")).encode()) / 3)

    plain = await backend.count_prompt_tokens(ask())
    with_tools = await backend.count_prompt_tokens(ask(tools=[TOOL] * 3))
    assert with_tools - plain == 3 * (tokens(TOOL) + 4)  # + 4 a definition
    calling = (*ASK, ChatMessage("assistant", "", tool_calls=(CALL,)))
    answered = (*calling, ChatMessage("tool", "Sunny", tool_call_id="call_1"))
    per_message = 4
    assert estimate_prompt_tokens(calling) - estimate_prompt_tokens(ASK) == (
        tokens(CALL.public()) + 4 + per_message
    )
    assert estimate_prompt_tokens(answered) - estimate_prompt_tokens(calling) == (
        math.ceil(len("Sunny") / 3) + math.ceil(len("call_1") / 3) + per_message
    )
