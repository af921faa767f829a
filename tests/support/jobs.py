"""Test backends for the job engine, and an app wired to them.

``ScriptedJobs`` implements the video, audio and 3D protocols for real: it returns real small
files (an ISO BMFF MP4, a PCM WAV via ``wave``, an MP3 frame, a binary glTF) or fails, hangs
or runs slowly, as its instance options say. Every call is recorded in ``CALLS`` so tests can
see what the engine handed the backend and whether the work was cancelled.
"""

from __future__ import annotations

import asyncio
import base64
import textwrap
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from hypereal.app import create_app
from hypereal.backends.base import BackendError, JobRequest, JobResult, MediaBlob
from hypereal.domain import keys, ledger
from hypereal.engine.engine import Engine
from hypereal.services import Services, build_services
from hypereal.settings import Settings
from tests.support.sample_media import glb_bytes, image_bytes, mp4_bytes, wav_bytes

# One MPEG-1 Layer III frame header (128 kbit/s, 44.1 kHz) behind an ID3v2 tag.
MP3_BYTES = b"ID3\x03\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x64" + bytes(413)


@dataclass
class Call:
    request: JobRequest
    modality: str
    cancelled: bool = False
    finished: bool = False


@dataclass
class Recorder:
    calls: list[Call] = field(default_factory=list)
    running: int = 0
    max_running: int = 0
    # Jobs of ``mode = "gated"`` wait until a test sets this (made anew per ``job_app``).
    gate: asyncio.Event = field(default_factory=asyncio.Event)


CALLS = Recorder()


class ScriptedJobs:
    """Options: ``mode`` = ok | fail | hang | crash | gated (runs until ``CALLS.gate`` is
    set), ``delay`` (seconds, for ok)."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.mode = str(options.get("mode", "ok"))
        self.delay = float(options.get("delay", 0))

    async def _run(self, request: JobRequest, modality: str, progress: Any) -> None:
        call = Call(request, modality)
        CALLS.calls.append(call)
        CALLS.running += 1
        CALLS.max_running = max(CALLS.max_running, CALLS.running)
        try:
            await progress(0.5, "half way")
            if self.mode == "hang":
                await asyncio.sleep(3600)
            if self.mode == "gated":
                await CALLS.gate.wait()
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.mode == "fail":
                raise BackendError("the fake backend was told to fail")
            if self.mode == "crash":
                raise RuntimeError("unexpected crash")
            call.finished = True
        except asyncio.CancelledError:
            call.cancelled = True
            raise
        finally:
            CALLS.running -= 1

    async def generate_video(self, request: JobRequest, progress: Any) -> JobResult:
        await self._run(request, "video", progress)
        return JobResult(MediaBlob(mp4_bytes(), "video/mp4"))

    async def generate_audio(self, request: JobRequest, progress: Any) -> JobResult:
        await self._run(request, "audio", progress)
        if request.input.get("format") == "mp3":
            return JobResult(MediaBlob(MP3_BYTES, "audio/mpeg"))
        return JobResult(MediaBlob(wav_bytes(), "audio/wav"), data={"text": request.input["text"]})

    async def generate_mesh(self, request: JobRequest, progress: Any) -> JobResult:
        await self._run(request, "3d", progress)
        return JobResult(MediaBlob(glb_bytes(), "model/gltf-binary"))


TEST_TYPES = {"test_jobs": "tests.support.jobs:ScriptedJobs"}
TEST_BACKENDS: dict[str, dict[str, Any]] = {
    "fake-ok": {"type": "test_jobs"},
    "fake-fail": {"type": "test_jobs", "mode": "fail"},
    "fake-crash": {"type": "test_jobs", "mode": "crash"},
    "fake-hang": {"type": "test_jobs", "mode": "hang"},
    "fake-slow": {"type": "test_jobs", "delay": 0.4},
    "fake-gated": {"type": "test_jobs", "mode": "gated"},
    "fake-gated-wide": {"type": "test_jobs", "mode": "gated", "concurrency": 3},
}

TEST_CATALOGUE = textwrap.dedent(
    """
    [[models]]
    slug = "test-video"
    name = "Test video"
    modality = "video"
    concurrency = 4
    price = { credits_per_second = 2, minimum = 3 }
    params = [
      { name = "prompt", type = "string" },
      { name = "image", type = "media" },
      { name = "duration", type = "integer", default = 5, minimum = 1, maximum = 10 },
    ]
    bindings = [{ backend = "fake-ok" }]

    [[models]]
    slug = "test-tts"
    name = "Test speech"
    modality = "audio"
    price = { credits = 3 }
    concurrency = 4
    params = [
      { name = "text", type = "string", required = true },
      { name = "voice", type = "string" },
      { name = "audio", type = "media" },
      { name = "format", type = "string", default = "wav", choices = ["wav", "mp3"] },
    ]
    bindings = [{ backend = "fake-ok" }]

    [[models]]
    slug = "test-3d"
    name = "Test 3D"
    modality = "3d"
    price = { credits = 7 }
    params = [{ name = "image", type = "media", required = true }]
    bindings = [{ backend = "fake-ok" }]

    [[models]]
    slug = "test-fail"
    name = "Always fails"
    modality = "video"
    price = { credits = 10 }
    params = [{ name = "prompt", type = "string" }]
    bindings = [{ backend = "fake-fail" }]

    [[models]]
    slug = "test-crash"
    name = "Crashes"
    modality = "video"
    price = { credits = 10 }
    params = [{ name = "prompt", type = "string" }]
    bindings = [{ backend = "fake-crash" }]

    [[models]]
    slug = "test-hang"
    name = "Hangs"
    modality = "video"
    price = { credits = 10 }
    timeout_seconds = 3600
    params = [{ name = "prompt", type = "string" }]
    bindings = [{ backend = "fake-hang" }]

    [[models]]
    slug = "test-timeout"
    name = "Hangs past its timeout"
    modality = "video"
    price = { credits = 10 }
    timeout_seconds = 1
    params = [{ name = "prompt", type = "string" }]
    bindings = [{ backend = "fake-hang" }]

    [[models]]
    slug = "test-slow"
    name = "Slow, one at a time"
    modality = "video"
    price = { credits = 1 }
    concurrency = 1
    params = [{ name = "prompt", type = "string" }]
    bindings = [{ backend = "fake-slow" }]

    [[models]]
    slug = "test-gated"
    name = "Runs until the test opens the gate, one at a time"
    modality = "video"
    price = { credits = 1 }
    concurrency = 1
    params = [{ name = "prompt", type = "string" }]
    bindings = [{ backend = "fake-gated" }]

    [[models]]
    slug = "test-gated-wide"
    name = "Gated, as many at once as its backend allows (no concurrency of its own)"
    modality = "video"
    price = { credits = 1 }
    params = [{ name = "prompt", type = "string" }]
    bindings = [{ backend = "fake-gated-wide" }]
    """
)


def png_data_uri() -> str:
    return "data:image/png;base64," + base64.b64encode(image_bytes(16, 16)).decode()


def wav_data_uri() -> str:
    return "data:audio/wav;base64," + base64.b64encode(wav_bytes()).decode()


def job_settings(tmp_path: Path, **overrides: Any) -> Settings:
    catalogue = tmp_path / "test-catalogue.toml"
    catalogue.write_text(TEST_CATALOGUE)
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "bootstrap_admin": False,
        "public_url": "http://testserver",
        "catalogue_file": catalogue,
        "backends": TEST_BACKENDS,
        "engine_poll_seconds": 0.2,
        "webhook_retry_schedule": [0, 0.2, 0.2, 0.2],
        **overrides,
    }
    return Settings(**values)


def job_services(settings: Settings) -> Services:
    return build_services(settings, backend_types=TEST_TYPES)


@dataclass
class JobEnv:
    services: Services
    client: httpx.AsyncClient
    app: FastAPI

    @property
    def engine(self) -> Engine:
        """The job engine the app's lifespan started."""
        engine = self.app.state.engine
        assert isinstance(engine, Engine)
        return engine

    async def new_key(self, credits: int = 100) -> tuple[str, dict[str, str]]:
        """A new account with ``credits``: (account id, auth headers)."""
        account_id = await keys.create_account(self.services.db, "test")
        if credits:
            await ledger.grant(self.services.db, account_id, credits, "test grant")
        created = await keys.create_key(self.services.db, account_id)
        return account_id, {"Authorization": f"Bearer {created.secret}"}

    async def wait_for(
        self, job_id: str, headers: Mapping[str, str], *, stage: str | None = None
    ) -> dict[str, Any]:
        """Poll the job until it is finished (or reaches ``stage``); 20 s at most."""
        async with asyncio.timeout(20):
            while True:
                job: dict[str, Any] = (
                    await self.client.get(f"/v1/jobs/{job_id}", headers=dict(headers))
                ).json()
                if stage is not None and job["stage"] == stage:
                    return job
                if stage is None and job["status"] != "processing":
                    return job
                await asyncio.sleep(0.05)


@asynccontextmanager
async def job_app(tmp_path: Path, **overrides: Any) -> AsyncIterator[JobEnv]:
    """The real app (in-process engine) on a fresh SQLite file with the test backends."""
    CALLS.calls.clear()
    CALLS.max_running = 0
    CALLS.gate = asyncio.Event()
    settings = job_settings(tmp_path, **overrides)
    services = job_services(settings)
    app = create_app(settings, services=services)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            yield JobEnv(services, c, app)


async def ledger_kinds(services: Services, account_id: str) -> list[str]:
    """The account's ledger entry kinds, oldest first."""
    return [e.kind for e in reversed(await ledger.entries(services.db, account_id))]
