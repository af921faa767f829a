"""Scenario 7, local backends: tokens/s of the local chat model (llama.cpp, SmolLM2-135M)
through the API (streamed /v1/chat/completions) against the raw ``llama_cpp.Llama`` call on the
same GGUF with the same context and threads in this process (and our backend class called
directly, which shows what the wrapper itself costs);
seconds per text-to-speech (Piper), per camera-motion video and per GLB (relief mesh) through
the API (submit, poll until completed) against the raw backend call. A backend this install
cannot serve (the API answers 503) is reported as skipped with the reason.

Env: BENCH_LOCAL_RUNS (runs per row, median taken; 3), BENCH_LOCAL_TOKENS (max_tokens, 64).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from bench.common import Result, env_int, hypereal_server, scenario_args, server_env, workdir

TEXT = "The quick brown fox jumps over the lazy dog. Benchmarks measure, they do not judge."
CHAT_MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]


def sample_png() -> bytes:
    from PIL import Image

    image = Image.new("RGB", (256, 256))
    image.putdata([(x, y, (x + y) // 2) for y in range(256) for x in range(256)])
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


class Skip(Exception):
    pass


_INSTANCES: dict[str, Any] = {}


def raw_backend(instance: str) -> Any:
    """The backend instance, created once (like the server, which keeps its instances), so the
    raw timings do not include loading a model again on every call."""
    from hypereal.backends.base import BackendUnavailable
    from hypereal.backends.registry import BackendRegistry

    if instance not in _INSTANCES:
        try:
            _INSTANCES[instance] = BackendRegistry({}).instance(instance)
        except BackendUnavailable as exc:
            raise Skip(str(exc)) from exc
    return _INSTANCES[instance]


async def api_chat(http: httpx.AsyncClient, headers: dict[str, str], max_tokens: int) -> float:
    body = {
        "model": "smollm2-135m-instruct",
        "messages": CHAT_MESSAGES,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    start = time.perf_counter()
    tokens = 0
    async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
        if resp.status_code != 200:
            raise Skip(f"API {resp.status_code}: {(await resp.aread()).decode()[:200]}")
        async for line in resp.aiter_lines():
            if line.startswith("data:") and "usage" in line and "[DONE]" not in line:
                usage = json.loads(line[5:]).get("usage") or {}
                tokens = int(usage.get("completion_tokens") or 0)
    return tokens / (time.perf_counter() - start)


async def raw_chat(max_tokens: int) -> float:
    from hypereal.backends.base import ChatMessage, ChatRequest

    backend = raw_backend("local-llama")
    request = ChatRequest(
        messages=tuple(ChatMessage(m["role"], m["content"]) for m in CHAT_MESSAGES),
        temperature=0.0,
        max_tokens=max_tokens,
    )
    start = time.perf_counter()
    tokens = 0
    async for delta in backend.stream(request):
        if delta.completion_tokens is not None:
            tokens = delta.completion_tokens
    return tokens / (time.perf_counter() - start)


_RAW_LLAMA: list[Any] = []


def raw_llama_chat(max_tokens: int) -> float:
    """llama-cpp-python's own ``create_chat_completion`` (greedy, the GGUF's chat template),
    loaded once like the server's model; tokens/s from its usage count."""
    try:
        import llama_cpp

        from hypereal.backends.llama_cpp import _available_cpus, default_model_path
    except ImportError as exc:
        raise Skip(f"llama-cpp-python is not installed: {exc}") from exc
    if not _RAW_LLAMA:
        threads = _available_cpus()
        _RAW_LLAMA.append(
            llama_cpp.Llama(
                model_path=str(default_model_path()),
                n_ctx=8192,  # what the server's model runs with (SmolLM2's training context)
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
            )
        )
    start = time.perf_counter()
    answer = _RAW_LLAMA[0].create_chat_completion(
        messages=CHAT_MESSAGES, max_tokens=max_tokens, temperature=0.0
    )
    return int(answer["usage"]["completion_tokens"]) / (time.perf_counter() - start)


async def api_job(
    http: httpx.AsyncClient, headers: dict[str, str], route: str, body: dict[str, Any]
) -> float:
    start = time.perf_counter()
    resp = await http.post(route, json=body, headers=headers)
    if resp.status_code == 200 and resp.json().get("status") == "completed":
        return time.perf_counter() - start  # a synchronous model answered with the result
    if resp.status_code != 202:
        raise Skip(f"API {resp.status_code}: {resp.text[:200]}")
    job_id = resp.json()["jobId"]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        job = (await http.get(f"/v1/jobs/{job_id}", headers=headers)).json()
        if job["status"] == "completed":
            return time.perf_counter() - start
        if job["status"] != "processing":
            raise Skip(f"job {job['status']}: {job.get('error')}")
        await asyncio.sleep(0.05)
    raise Skip("job did not finish in 600 s")


async def raw_job(slug: str, instance: str, method: str, fields: dict[str, Any]) -> float:
    from hypereal.backends.base import JobRequest, MediaBlob
    from hypereal.domain.catalogue import load_catalogue, validate_params

    spec = load_catalogue().models[slug]
    media = {}
    if "image" in fields:
        media["image"] = MediaBlob(base64.b64decode(fields["image"].split(",", 1)[1]), "image/png")
    values = validate_params(spec, fields)
    backend = raw_backend(instance)

    async def progress(fraction: float, message: str | None = None) -> None:
        return None

    start = time.perf_counter()
    await getattr(backend, method)(JobRequest("bench", values, media), progress)
    return time.perf_counter() - start


async def median_of(runs: int, fn: Callable[[], Awaitable[float]]) -> float:
    await fn()  # warm up (model load)
    return statistics.median([await fn() for _ in range(runs)])


async def measure(result: Result, url: str, key: str, runs: int, max_tokens: int) -> None:
    headers = {"authorization": f"Bearer {key}"}
    image = "data:image/png;base64," + base64.b64encode(sample_png()).decode()
    jobs: list[tuple[str, str, str, str, str, dict[str, Any]]] = [
        (
            "seconds per TTS (audio-tts, Piper)",
            "audio-tts",
            "local-piper",
            "generate_audio",
            "/v1/audio/generate",
            {"text": TEXT},
        ),
        (
            "seconds per camera-motion video (2 s 480p)",
            "camera-motion-i2v",
            "local-camera-motion",
            "generate_video",
            "/v1/videos/generate",
            {"image": image, "duration": 2, "resolution": "480p", "prompt": "slow pan left"},
        ),
        (
            "seconds per GLB (relief-3d)",
            "relief-3d",
            "local-relief-mesh",
            "generate_mesh",
            "/v1/3d/generate",
            {"image": image},
        ),
    ]
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        metric = f"tokens/s, local chat (SmolLM2-135M, {max_tokens} tok)"
        try:
            api = await median_of(runs, lambda: api_chat(http, headers, max_tokens))
            ours = await median_of(runs, lambda: raw_chat(max_tokens))
            raw = await median_of(runs, lambda: asyncio.to_thread(raw_llama_chat, max_tokens))
            result.add(
                metric,
                f"{api:.1f} tok/s",
                f"{raw:.1f} tok/s (raw llama_cpp)",
                "",
                f"API/raw {api / raw:.2f}; our backend class called directly {ours:.1f} tok/s "
                f"(backend/raw {ours / raw:.2f})",
            )
        except Skip as exc:
            result.add(metric, "skipped", notes=str(exc)[:160])
        for metric, slug, instance, method, route, fields in jobs:
            try:

                async def through_api(route: str = route, slug: str = slug, f: dict = fields):  # type: ignore[no-untyped-def,type-arg]
                    return await api_job(http, headers, route, {"model": slug, "input": f})

                async def raw_call(slug: str = slug, i: str = instance, m: str = method, f=fields):  # type: ignore[no-untyped-def]
                    return await raw_job(slug, i, m, f)

                api = await median_of(runs, through_api)
                raw = await median_of(runs, raw_call)
                result.add(
                    metric,
                    f"{api:.2f} s",
                    f"{raw:.2f} s (raw)",
                    "",
                    f"API adds {api - raw:+.2f} s (submit + queue + store + poll at 50 ms)",
                )
            except Skip as exc:
                result.add(metric, "skipped", notes=str(exc)[:160])


def main() -> None:
    args = scenario_args(__doc__ or "")
    result = Result("7 local backends")
    runs = env_int("LOCAL_RUNS", 3, 1, args.quick)
    max_tokens = env_int("LOCAL_TOKENS", 64, 32, args.quick)
    with workdir("local") as work, hypereal_server(work, server_env(work)) as server:
        key = server.key(credits=10**9)
        asyncio.run(measure(result, server.url, key, runs, max_tokens))
    result.write(args.json)


if __name__ == "__main__":
    main()
