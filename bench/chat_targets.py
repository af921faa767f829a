"""The chat targets of scenarios 1 and 2, side by side against one mock upstream: ``direct``
(the mock itself), ``hypereal`` (our /v1/chat/completions with auth, rate limit and the
credits ledger on, one server process), ``hypereal-Np`` (the same with ``hypereal serve
--processes N``, BENCH_SERVER_PROCESSES, default 2 = the cores here; 1 leaves it out) and
``litellm`` (the LiteLLM proxy from bench/.venv with one worker, one master key and no
database, so no virtual keys, configured at the same mock)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    BENCH_VENV,
    HOST,
    free_port,
    hypereal_server,
    mock_upstream,
    process,
    server_env,
    upstream_backends,
    wait_http,
)

MESSAGES = [{"role": "user", "content": "Say something short"}]


@dataclass(frozen=True)
class Target:
    name: str
    url: str  # the chat completions endpoint
    model: str
    headers: dict[str, str]
    pid: int | None = None  # the process serving it (its RSS is sampled), when the bench knows it

    def body(self, *, stream: bool, max_tokens: int) -> dict[str, object]:
        body: dict[str, object] = {
            "model": self.model,
            "messages": MESSAGES,
            "max_tokens": max_tokens,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body


LITELLM_CONFIG = """\
model_list:
  - model_name: mock-model
    litellm_params:
      model: openai/mock-model
      api_base: {api_base}
      api_key: none
litellm_settings:
  telemetry: false
  drop_params: true
  set_verbose: false
  json_logs: false
general_settings:
  master_key: {master_key}
"""

# With a master key and no database LiteLLM checks that one key and has no virtual keys
# (they need a database); it refuses to start with no key at all.
LITELLM_MASTER_KEY = "sk-bench-0123456789abcdef0123456789abcdef"


def litellm_binary() -> Path | None:
    path = BENCH_VENV / "bin" / "litellm"
    return path if path.exists() else None


@contextlib.contextmanager
def litellm_proxy(work: Path, api_base: str) -> Iterator[tuple[str, int] | None]:
    """The LiteLLM proxy (one uvicorn worker) in front of ``api_base``; yields its base URL and
    process id, or None when bench/setup.sh has not installed it or BENCH_LITELLM=0."""
    binary = litellm_binary()
    if binary is None or os.environ.get("BENCH_LITELLM") == "0":
        yield None
        return
    config = work / "litellm.yaml"
    config.write_text(LITELLM_CONFIG.format(api_base=api_base, master_key=LITELLM_MASTER_KEY))
    port = free_port()
    env = {
        **os.environ,
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no cost-map download at start-up
        "DISABLE_SCHEMA_UPDATE": "True",
    }
    env.pop("DATABASE_URL", None)
    log = work / "litellm.log"
    args = [str(binary), "--config", str(config), "--host", HOST, "--port", str(port)]
    args += ["--num_workers", "1"]
    with process(args, env=env, log=log) as proc:
        wait_http(f"http://{HOST}:{port}/health/liveliness", proc, log, seconds=180)
        yield f"http://{HOST}:{port}", proc.pid


def server_processes() -> int:
    return max(1, int(os.environ.get("BENCH_SERVER_PROCESSES", "2")))


def several_processes_name() -> str:
    return f"hypereal-{server_processes()}p"


@contextlib.contextmanager
def chat_targets(work: Path, tokens: int, several: bool = True) -> Iterator[dict[str, Target]]:
    """``several=False``: without the several-process server."""
    with mock_upstream(work, tokens) as upstream, contextlib.ExitStack() as stack:
        env = server_env(work, HYPEREAL_BACKENDS=upstream_backends(upstream))
        server = stack.enter_context(hypereal_server(work, env))
        several_server = None
        if several and server_processes() > 1:
            several_env = {**env, "HYPEREAL_DATA_DIR": str(work / "data-several")}
            several_server = stack.enter_context(
                hypereal_server(work, several_env, "api-several", server_processes())
            )
        with litellm_proxy(work, upstream) as litellm:
            key = server.key(credits=10**12)
            targets = {
                "direct": Target("direct", f"{upstream}/chat/completions", "mock-model", {}),
                "hypereal": Target(
                    "hypereal",
                    f"{server.url}/v1/chat/completions",
                    "bench-chat",
                    {"authorization": f"Bearer {key}"},
                    server.proc.pid,
                ),
            }
            if several_server is not None:
                targets[several_processes_name()] = Target(
                    several_processes_name(),
                    f"{several_server.url}/v1/chat/completions",
                    "bench-chat",
                    {"authorization": f"Bearer {several_server.key(credits=10**12)}"},
                    several_server.proc.pid,
                )
            if litellm is not None:
                litellm_url, litellm_pid = litellm
                targets["litellm"] = Target(
                    "litellm",
                    f"{litellm_url}/v1/chat/completions",
                    "mock-model",
                    {"authorization": f"Bearer {LITELLM_MASTER_KEY}"},
                    litellm_pid,
                )
            yield targets
