"""The calls both clients share, without a server: paged listings, the tries of one call,
the requests built and run()'s plan for a model."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from hypereal.client import APIConnectionError, BadRequest, Model, RetryPolicy, ServerError
from hypereal.client._calls import (
    Attempts,
    Call,
    Pager,
    chat_call,
    plan_run,
    submission,
    usage_pager,
)


def page(ids: list[int], cursor: Any, more: bool = True) -> dict[str, Any]:
    return {"data": [{"id": i} for i in ids], "nextCursor": cursor, "hasMore": more}


def test_a_pager_asks_for_what_is_left_and_follows_the_cursor() -> None:
    pager = Pager("/v1/things", lambda item: item["id"], limit=5, page_size=2, most=100)
    seen: list[int] = []
    calls: list[dict[str, Any]] = []
    answers = [page([1, 2], "c1"), page([3, 4], "c2"), page([5, 6], "c3")]
    while (call := pager.next_call()) is not None:
        calls.append(dict(call.params or {}))
        seen += pager.take(answers.pop(0))
    assert seen == [1, 2, 3, 4, 5]
    assert calls == [{"limit": 2}, {"limit": 2, "before": "c1"}, {"limit": 1, "before": "c2"}]


def test_a_pager_ends_without_more_pages_or_a_usable_cursor() -> None:
    pager = Pager(
        "/v1/jobs", str, limit=None, page_size=500, most=100, cursor_ok=lambda c: isinstance(c, str)
    )
    call = pager.next_call()
    assert call is not None and call.params == {"limit": 100}
    assert pager.take(page([1], 7)) == ["{'id': 1}"]
    assert pager.next_call() is None
    usage = usage_pager(None, 200)
    usage.take(page([1], None, more=True))
    assert usage.next_call() is None


def test_attempts_wait_then_raise_the_answer_or_a_connection_error() -> None:
    call = Call("POST", "/v1/x")
    attempts = Attempts(RetryPolicy(max_retries=1, backoff=0.0), call, "http://h")
    failed = httpx.Response(500, json={"error": "boom"}, request=httpx.Request("POST", "http://h"))
    assert attempts.after_error(failed) == 0.0
    with pytest.raises(ServerError):
        attempts.after_error(failed)
    network = Attempts(RetryPolicy(max_retries=0), call, "http://h")
    with pytest.raises(APIConnectionError, match="POST http://h/v1/x failed"):
        network.after_network_error(httpx.ConnectError("refused"))
    refused = httpx.Response(400, json={"error": "bad"}, request=httpx.Request("POST", "http://h"))
    with pytest.raises(BadRequest):
        Attempts(RetryPolicy(), call, "http://h").after_error(refused)


def test_charging_calls_carry_an_idempotency_key_and_streams_ask_for_events() -> None:
    streamed = chat_call("hi", None, True, None, None, "k1", {})
    assert streamed.headers == {"Accept": "text/event-stream", "Idempotency-Key": "k1"}
    assert streamed.stream and streamed.json["messages"] == [{"role": "user", "content": "hi"}]
    whole = chat_call("hi", "m", False, 0.5, 8, None, {"top_p": 1})
    assert whole.headers["Idempotency-Key"].startswith("hyc-")
    assert whole.json == {
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        "model": "m",
        "temperature": 0.5,
        "max_tokens": 8,
        "top_p": 1,
    }
    job = submission("video", "v", {"prompt": "p"}, None, "k2", None)
    assert job.call.path == "/v1/videos/generate" and job.call.headers == {"Idempotency-Key": "k2"}


def model(slug: str, modality: str) -> Model:
    return Model.from_json({"slug": slug, "modality": modality, "available": True, "params": []})


def test_run_plans_a_chat_turn_a_job_or_an_image_call() -> None:
    chat = plan_run(model("c", "chat"), {"prompt": "hi", "system": "be brief"}, None)
    assert chat.chat is not None and chat.image is None
    assert chat.chat[0] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    job = plan_run(model("v", "video"), {"prompt": "p"}, None)
    assert (job.chat, job.image, job.values) == (None, None, {"prompt": "p"})
    image = plan_run(model("i", "image"), {"prompt": "p", "seed": None}, "k")
    assert image.image is not None
    assert image.image.path == "/v1/images/generate"
    assert image.image.json == {"model": "i", "prompt": "p"}
