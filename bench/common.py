"""Shared plumbing for the bench scenarios: processes, ports, the server's environment,
keys, percentiles, result rows.

Every process listens on 127.0.0.1 only. Every wait is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
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
    """One line of the results table. ``hypereal``/``direct``/``litellm`` are display strings;
    ``goal`` is the issue's target for the row (empty when it has none) and ``met`` the verdict
    on this run's figures ("✔ met", "✘ missed (...)", "n/a (...)")."""

    scenario: str
    metric: str
    hypereal: str
    direct: str = ""
    litellm: str = ""
    notes: str = ""
    goal: str = ""
    met: str = ""


@dataclass(frozen=True)
class Goal:
    """One part of a row's target: its text and whether this run's figures meet it (None: it
    could not be judged in this run, ``why`` says why, e.g. LiteLLM not installed)."""

    text: str
    met: bool | None
    why: str = ""


MET, MISSED = "✔ met", "✘ missed"


def number(value: float) -> str:
    """1500 -> "1,500", 0.5 -> "0.5"."""
    return f"{value:,.0f}" if value == int(value) else f"{value:,g}"


def at_least(value: float | None, goal: float, unit: str) -> Goal:
    """``value`` >= ``goal`` (None or NaN: not measured)."""
    text = f"≥ {number(goal)} {unit}"
    if value is None or value != value:
        return Goal(text, None, "not measured")
    return Goal(text, value >= goal)


def at_most(value: float | None, goal: float, unit: str) -> Goal:
    text = f"≤ {number(goal)} {unit}"
    if value is None or value != value:
        return Goal(text, None, "not measured")
    return Goal(text, value <= goal)


def times_at_least(value: float, base: float | None, factor: float, who: str = "LiteLLM") -> Goal:
    """``value`` >= ``factor`` x ``base``, the same figure of ``who`` in this run (None: ``who``
    was not run, so the goal cannot be judged)."""
    text = f"≥ {number(factor)}\N{MULTIPLICATION SIGN} {who}"
    if base is None or base != base:
        return Goal(text, None, f"{who} not run")
    if base <= 0:
        return Goal(text, None, f"{who} measured 0")
    return Goal(text, value >= factor * base)


def holds(ok: bool, text: str) -> Goal:
    """A condition of the target that is a count, not a figure (0 duplicates, ledger sums)."""
    return Goal(text, ok)


def unmeasured(goals: Sequence[Goal], why: str) -> list[Goal]:
    """The same goals, not judged (a skipped row keeps its target visible)."""
    return [Goal(g.text, None, why) for g in goals]


def judge(goals: Sequence[Goal]) -> tuple[str, str]:
    """(the goal text, the verdict) for a row."""
    if not goals:
        return "", ""
    texts = [g.text for g in goals]
    text = ", ".join(texts[:-1]) + " and " + texts[-1] if len(texts) > 1 else texts[0]
    missed = [g.text for g in goals if g.met is False]
    unknown = sorted({g.why or "not measured" for g in goals if g.met is None})
    if missed:
        mark = MISSED + (f" ({', '.join(missed)})" if len(goals) > 1 else "")
        return text, mark + (f"; n/a ({', '.join(unknown)})" if unknown else "")
    if unknown:
        judged = [g.text for g in goals if g.met]
        return text, f"n/a ({', '.join(unknown)})" + (
            f"; {', '.join(judged)}: met" if judged else ""
        )
    return text, MET


@dataclass
class Result:
    scenario: str
    rows: list[Row] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def add(
        self,
        metric: str,
        hypereal: str,
        direct: str = "",
        litellm: str = "",
        notes: str = "",
        goal: Sequence[Goal] = (),
    ) -> None:
        goal_text, met = judge(goal)
        self.rows.append(
            Row(self.scenario, metric, hypereal, direct, litellm, notes, goal_text, met)
        )

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
        goal = f"  [goal {r.goal}: {r.met}]" if r.goal else ""
        print(
            f"  {r.scenario:<22} {r.metric:<44} {r.hypereal:>14}{goal}{extra}  {r.notes}",
            flush=True,
        )


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


def file_creation_us(folder: Path, files: int = 100) -> float:
    """CPU microseconds to create (and write 200 bytes to) one new file in ``folder``."""
    probe = Path(tempfile.mkdtemp(prefix="hypereal-bench-probe-", dir=folder))
    try:
        started = time.process_time()
        for n in range(files):
            fd = os.open(probe / f"{n}.png", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, b"x" * 200)
            os.close(fd)
        return (time.process_time() - started) / files * 1e6
    finally:
        shutil.rmtree(probe, ignore_errors=True)


@functools.cache
def workdir_base() -> Path:
    """Where the scenarios' folders (servers' data: SQLite files, media) go: BENCH_WORKDIR when
    set, else the one of ``bench/work/``, the system's temporary folder, ``~/.cache`` and
    ``/dev/shm`` (memory) where creating a file costs the least CPU. Image and job requests
    create a media file each, and on these VMs that cost moves by folder and by the hour: on
    one machine 28-42 us under /tmp and 590-820 us under /work (same ext4 disk), then, after
    the bench had created and deleted some 100,000 files, 240-290 us everywhere on that disk
    (perf: ext4's inode allocator skipping recently deleted inodes, ``recently_deleted``) and
    11 us in /dev/shm; 145 us under /tmp against 40 us elsewhere on another machine. The
    choice and its cost are printed with the results: the bench measures the platform's CPU,
    not the file system's."""
    chosen = os.environ.get("BENCH_WORKDIR")
    if chosen:
        Path(chosen).mkdir(parents=True, exist_ok=True)
        return Path(chosen)
    candidates = [
        ROOT / "bench" / "work",
        Path(tempfile.gettempdir()) / "hypereal-bench",
        Path.home() / ".cache" / "hypereal-bench",
    ]
    if Path("/dev/shm").is_dir():
        candidates.append(Path("/dev/shm") / "hypereal-bench")
    costs: dict[Path, float] = {}
    for folder in candidates:
        with contextlib.suppress(OSError):
            folder.mkdir(parents=True, exist_ok=True)
            costs[folder] = min(file_creation_us(folder) for _ in range(3))
    return min(costs, key=costs.__getitem__) if costs else candidates[0]


@contextlib.contextmanager
def workdir(name: str) -> Iterator[Path]:
    """A temporary directory for one scenario (logs, data) under :func:`workdir_base`;
    removed unless BENCH_KEEP=1."""
    base = workdir_base()
    path = Path(tempfile.mkdtemp(prefix=f"hypereal-bench-{name}-", dir=base))
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
def hypereal_server(
    work: Path, env: dict[str, str], name: str = "api", processes: int = 1
) -> Iterator[Server]:
    """``hypereal serve [--processes N]`` as a subprocess (migrates first); yields its URL and
    environment (``proc`` is the parent: with several processes, measure its process tree)."""
    port = free_port()
    env = {**env, "HYPEREAL_PUBLIC_URL": f"http://{HOST}:{port}"}
    log = work / f"{name}.log"
    subprocess.run(
        [HYPEREAL, "migrate"], env=env, check=True, capture_output=True, cwd=ROOT, timeout=120
    )
    args = [HYPEREAL, "serve", "--port", str(port), "--processes", str(processes)]
    with process(args, env=env, log=log) as proc:
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


# ------------------------------------------------------------------------------ memory


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (from /proc/*/stat), e.g. a server and any workers it
    forked; ``hypereal serve`` is a console script, so the Popen pid is the server itself."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def memory_kib(pids: Sequence[int]) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB summed over ``pids`` (processes gone count 0). VmHWM is each
    process's peak resident set since it started."""
    rss = hwm = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm += int(line.split()[1])
    return rss, hwm


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` (from /proc/<pid>/stat; processes
    gone count 0). The difference over a run, divided by its requests, is the server's CPU
    per request: unlike req/s it hardly depends on what else the machine is doing."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_note(cpu_us: dict[str, float], per: str = "request") -> str:
    """``; server CPU per request: hypereal 540 us, litellm 7900 us`` (or nothing)."""
    if not cpu_us:
        return ""
    parts = ", ".join(f"{name} {value:.0f} us" for name, value in cpu_us.items())
    return f"; server CPU per {per}: {parts}"


def mb(kib: float) -> str:
    """KiB as MB (10^6 bytes)."""
    return f"{kib * 1024 / 1e6:.0f} MB"


class RssSampler:
    """Samples the resident set of a process tree every ``interval`` seconds from an asyncio
    task while the load runs (``async with RssSampler(pid) as rss: ...``): ``first``, ``peak``
    and ``last`` VmRSS and the VmHWM at the end, all KiB."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pids = process_tree(pid)
        self.interval = interval
        self.first = self.peak = self.last = self.hwm = 0
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        rss, hwm = memory_kib(self.pids)
        if not self.samples:
            self.first = rss
        self.samples += 1
        self.last = rss
        self.peak = max(self.peak, rss)
        self.hwm = max(self.hwm, hwm)

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> RssSampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.sample()


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
