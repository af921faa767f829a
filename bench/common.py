"""Shared plumbing for the bench scenarios: processes, ports, the server's environment,
keys, percentiles, result rows.

Every process listens on 127.0.0.1 only. Every wait is bounded in time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
PY = sys.executable  # the project venv's python (bench clients and our server run from it)
HYPEREAL = str(Path(PY).with_name("hypereal"))
BENCH_VENV = BENCH_DIR / ".venv"
HOST = "127.0.0.1"
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_DSN = os.environ.get("BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")

# The chat model bound to the mock upstream, and a fixed-price model for ledger debits.
BENCH_CATALOGUE = """
[[models]]
slug = "bench-chat"
name = "Bench chat (mock upstream)"
modality = "chat"
concurrency = 1000
context_tokens = 32768
timeout_seconds = 60
price = { base_credits = 1, input_usd_per_million = 1.0, output_usd_per_million = 1.0 }
bindings = [{ backend = "mock", upstream_model = "mock-model" }]

[[models]]
slug = "bench-debit"
name = "Bench debit (no-op image, 3 credits)"
modality = "image"
concurrency = 1000
timeout_seconds = 60
price = { credits = 3 }
params = [
  { name = "prompt", type = "string", required = true },
  { name = "size", type = "string", default = "64*64" },
]
bindings = [{ backend = "noop" }]
"""


# ------------------------------------------------------------------------------ results


@dataclass
class Row:
    """One line of the results table. ``hypereal``/``direct``/``litellm`` are display strings."""

    scenario: str
    metric: str
    hypereal: str
    direct: str = ""
    litellm: str = ""
    notes: str = ""


@dataclass
class Result:
    scenario: str
    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def add(
        self, metric: str, hypereal: str, direct: str = "", litellm: str = "", notes: str = ""
    ) -> None:
        self.rows.append(Row(self.scenario, metric, hypereal, direct, litellm, notes))

    def check(self, ok: bool, what: str) -> None:
        """Record a failed expectation (the bench reports it; it does not stop)."""
        if not ok:
            self.problems.append(what)
            print(f"[{self.scenario}] CHECK FAILED: {what}", file=sys.stderr, flush=True)

    def write(self, path: Path | None) -> None:
        data = {
            "scenario": self.scenario,
            "rows": [asdict(r) for r in self.rows],
            "raw": self.raw,
            "problems": self.problems,
        }
        text = json.dumps(data, indent=2)
        if path is not None:
            path.write_text(text)
        print_rows(self.rows)
        for problem in self.problems:
            print(f"  !! {problem}")


def print_rows(rows: Sequence[Row]) -> None:
    for r in rows:
        extra = "".join(
            f"  {k}={v}" for k, v in (("direct", r.direct), ("litellm", r.litellm)) if v
        )
        print(f"  {r.scenario:<22} {r.metric:<44} {r.hypereal:>14}{extra}  {r.notes}", flush=True)


def scenario_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    return parser.parse_args()


def env_int(name: str, default: int, quick_default: int, quick: bool) -> int:
    """``BENCH_<name>`` from the environment, else the (quick) default."""
    value = os.environ.get(f"BENCH_{name}")
    return int(value) if value else (quick_default if quick else default)


# ---------------------------------------------------------------------------- numbers


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (``pct`` in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "n/a"


# -------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def process(
    args: Sequence[str], *, env: dict[str, str] | None = None, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a child process (its own process group) logging to ``log``; stop it on exit."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(args),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, seconds: float = 60.0) -> None:
    """Wait until ``url`` answers anything over HTTP (bounded)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{proc.args!r} exited early ({proc.returncode}):\n{tail}")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"{url} did not answer within {seconds:.0f} s:\n{tail}")


@contextlib.contextmanager
def workdir(name: str) -> Iterator[Path]:
    """A temporary directory for one scenario (logs, data); removed unless BENCH_KEEP=1."""
    path = Path(tempfile.mkdtemp(prefix=f"hypereal-bench-{name}-"))
    try:
        yield path
    finally:
        if os.environ.get("BENCH_KEEP") != "1":
            shutil.rmtree(path, ignore_errors=True)
        else:
            print(f"  (kept {path})")


# ------------------------------------------------------------------ the mock upstream


@contextlib.contextmanager
def mock_upstream(work: Path, tokens: int, token_delay: float = 0.0) -> Iterator[str]:
    """The mock OpenAI-compatible server in its own process; yields its base URL (``/v1``)."""
    port = free_port()
    log = work / "mock.log"
    args = [PY, "-m", "bench.mock_upstream", "--port", str(port), "--tokens", str(tokens)]
    args += ["--token-delay", str(token_delay)]
    with process(args, log=log) as proc:
        wait_http(f"http://{HOST}:{port}/health", proc, log)
        yield f"http://{HOST}:{port}/v1"


# --------------------------------------------------------------------- our own server


def server_env(work: Path, **overrides: str) -> dict[str, str]:
    """The environment of ``hypereal serve``/``worker``/``keys`` for one bench run."""
    catalogue = work / "catalogue.toml"
    catalogue.write_text(BENCH_CATALOGUE)
    env = {
        **os.environ,
        "HYPEREAL_DATA_DIR": str(work / "data"),
        "HYPEREAL_BOOTSTRAP_ADMIN": "false",
        "HYPEREAL_ENABLE_TEST_BACKENDS": "1",
        "HYPEREAL_CATALOGUE_FILE": str(catalogue),
        "HYPEREAL_ALLOWED_PRIVATE_NETWORKS": "127.0.0.1/32",
        "HYPEREAL_BACKENDS": json.dumps({"noop": {"type": "noop"}}),
    }
    env.update(overrides)
    return env


def upstream_backends(base_url: str) -> str:
    return json.dumps(
        {
            "noop": {"type": "noop"},
            "mock": {"type": "openai", "base_url": base_url, "model": "mock-model", "retries": 0},
        }
    )


@dataclass
class Server:
    url: str
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    log: Path

    def key(self, credits: int, rate_limit: int | None = 1_000_000_000) -> str:
        return create_key(self.env, credits, rate_limit)


@contextlib.contextmanager
def hypereal_server(work: Path, env: dict[str, str], name: str = "api") -> Iterator[Server]:
    """``hypereal serve`` as a subprocess (migrates first); yields its URL and environment."""
    port = free_port()
    env = {**env, "HYPEREAL_PUBLIC_URL": f"http://{HOST}:{port}"}
    log = work / f"{name}.log"
    subprocess.run(
        [HYPEREAL, "migrate"], env=env, check=True, capture_output=True, cwd=ROOT, timeout=120
    )
    with process([HYPEREAL, "serve", "--port", str(port)], env=env, log=log) as proc:
        wait_http(f"http://{HOST}:{port}/openapi.json", proc, log)
        yield Server(f"http://{HOST}:{port}", env, proc, log)


def create_key(env: dict[str, str], credits: int, rate_limit: int | None) -> str:
    args = [HYPEREAL, "keys", "create", "--credits", str(credits), "--name", "bench"]
    if rate_limit is not None:
        args += ["--rate-limit", str(rate_limit)]
    done = subprocess.run(
        args, env=env, capture_output=True, text=True, check=True, cwd=ROOT, timeout=120
    )
    return done.stdout.strip().splitlines()[-1]


@contextlib.contextmanager
def temporary_pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database (dropped afterwards); yields its SQLAlchemy URL."""
    import asyncio

    import asyncpg

    name = f"hypereal_bench_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_DSN, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    base = PG_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def redis_available() -> bool:
    try:
        with socket.create_connection((HOST, 6379), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def postgres_available() -> bool:
    try:
        with socket.create_connection((HOST, 5432), timeout=2):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------------ machine info


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kib / 1024 / 1024:.1f} GiB"
    return {
        "cores": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }
