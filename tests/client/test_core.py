"""The client's pure parts: SSE decoding, retry decisions, Retry-After, error mapping, input
files as data URIs, and parsing the answers the server may give."""

from __future__ import annotations

import base64
import email.utils
import time
from pathlib import Path

import pytest

from hypereal.client import (
    BadRequest,
    Conflict,
    InsufficientCredits,
    Job,
    ModelUnavailable,
    RateLimited,
    RetryPolicy,
    ServerError,
)
from hypereal.client._core import (
    ChatAccumulator,
    SSEDecoder,
    prepare_input,
    resolve_base_url,
)
from hypereal.client._errors import error_for_status, parse_retry_after

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)


def test_sse_decoder_joins_data_lines_and_skips_comments() -> None:
    decoder = SSEDecoder()
    lines = [": keep-alive", "", 'data: {"a":', "data: 1}", "", "event: x\r", "data:[DONE]", ""]
    events = [event for line in lines if (event := decoder.feed(line)) is not None]
    assert events == ['{"a":\n1}', "[DONE]"]
    assert decoder.flush() is None


def test_chat_accumulator_reads_deltas_usage_and_errors() -> None:
    state = ChatAccumulator()
    first = '{"id":"c1","model":"m","choices":[{"delta":{"role":"assistant","content":"Hel"}}]}'
    assert state.event(first) == "Hel"
    assert state.event('{"choices":[{"delta":{"content":"lo"}}]}') == "lo"
    final = (
        '{"choices":[{"delta":{},"finish_reason":"stop"}],'
        '"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5},"creditsUsed":2}'
    )
    assert state.event(final) is None
    assert state.event("[DONE]") is None and state.done
    whole = state.as_json()
    assert whole["choices"][0]["message"]["content"] == "Hello"
    assert whole["creditsUsed"] == 2 and whole["choices"][0]["finish_reason"] == "stop"

    failing = ChatAccumulator()
    with pytest.raises(ServerError) as raised:
        failing.event('{"error":{"message":"the model crashed","code":502},"creditsUsed":1}')
    assert raised.value.message == "the model crashed" and failing.credits_used == 1


def test_retry_policy() -> None:
    policy = RetryPolicy(max_retries=2, max_wait=60)
    limited = RateLimited("slow down", retry_after=7)
    assert policy.after_error(1, limited) == 7
    assert policy.after_error(3, limited) is None  # out of retries
    assert policy.after_error(1, RateLimited("an hour", retry_after=3599)) is None
    assert 0 < (policy.after_error(1, ServerError("boom", status=502)) or 0) <= 0.5
    assert policy.after_error(1, ServerError("busy", retry_after=3, status=503)) == 3
    assert policy.after_error(1, ModelUnavailable("no backend", status=503)) is None
    assert policy.after_error(1, BadRequest("bad", status=400)) is None
    in_progress = Conflict("A request with this Idempotency-Key is still in progress")
    assert policy.after_error(1, in_progress) is not None
    assert policy.after_error(1, Conflict("Job already finished")) is None
    assert policy.after_network_error(2) is not None and policy.after_network_error(3) is None


def test_retry_after_as_seconds_or_a_date() -> None:
    assert parse_retry_after("12") == 12
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= (parse_retry_after(later) or 0) <= 30


def test_error_mapping() -> None:
    credits = error_for_status(
        402, {"error": "Insufficient credits", "required": 5, "available": 1}
    )
    assert isinstance(credits, InsufficientCredits)
    assert (credits.required, credits.available) == (5, 1)
    openai_shaped = error_for_status(400, {"error": {"message": "bad field", "type": "x"}})
    assert isinstance(openai_shaped, BadRequest) and openai_shaped.message == "bad field"
    assert isinstance(error_for_status(503, {"error": "no backend"}), ModelUnavailable)
    # A 503 from a proxy (no JSON) or with Retry-After is an outage: retried.
    assert isinstance(error_for_status(503, {}, json_body=False), ServerError)
    outage = error_for_status(503, {"error": "busy"}, {"retry-after": "2"})
    assert isinstance(outage, ServerError) and outage.retry_after == 2


def test_prepare_input_sends_files_as_data_uris(tmp_path: Path) -> None:
    picture = tmp_path / "p.png"
    picture.write_bytes(PNG)
    prepared = prepare_input(
        {
            "image": str(picture),
            "images": [picture, "https://example.com/a.png"],
            "raw": PNG,
            "prompt": str(picture),  # not a file parameter: sent as text
            "duration": 5,
        }
    )
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert prepared["image"] == uri and prepared["raw"] == uri
    assert prepared["images"] == [uri, "https://example.com/a.png"]
    assert prepared["prompt"] == str(picture) and prepared["duration"] == 5


def test_base_url_drops_the_api_prefix() -> None:
    assert resolve_base_url("http://h:1/v1/") == "http://h:1"
    assert resolve_base_url("http://h:1/api/v1") == "http://h:1"
    assert resolve_base_url("https://api.example.com") == "https://api.example.com"


def test_job_from_each_answer_shape() -> None:
    submitted = Job.from_json(
        {"jobId": "job_1", "status": "processing", "creditsUsed": 3, "pollUrl": "http://x/p"},
        model="audio-tts",
        type="audio",
    )
    assert (submitted.id, submitted.stage, submitted.progress) == ("job_1", "processing", 0.0)
    assert submitted.model == "audio-tts" and not submitted.done
    synchronous = Job.from_json(
        {"success": True, "jobId": "job_2", "status": "completed", "url": "http://x/a.wav"}
    )
    assert synchronous.done and synchronous.progress == 1.0
    assert synchronous.output_url == "http://x/a.wav"
