"""The web console in a real browser: headless Chromium (Debian's ``chromium`` package,
installed by scripts/install.sh) driven by Playwright, against a real ``hypereal serve``
process on 127.0.0.1. Each test leaves a screenshot of every page it visits under
``test-artifacts/console/`` (ignored by git; HYPEREAL_TEST_ARTIFACTS moves it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.engine.test_distributed import HYPEREAL
from tests.support.processes import process
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("HYPEREAL_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "console"


def chromium_executable() -> str | None:
    """Debian's Chromium (the tests never use a browser Playwright would download)."""
    for candidate in (os.environ.get("HYPEREAL_CHROMIUM"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file():
            return candidate
    return shutil.which("chromium")


CHROMIUM = chromium_executable()
if CHROMIUM is None:
    pytest.skip(
        "Chromium is not installed (/usr/bin/chromium): `scripts/install.sh --dev` installs "
        "Debian's chromium package for the console's browser tests",
        allow_module_level=True,
    )

from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright  # noqa: E402

# The machine may be busy (local models run on its CPU): wait as long as an action does.
expect.set_options(timeout=60_000)


@dataclass
class Console:
    base_url: str
    admin_key: str
    user_key: str
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"{self.base_url}/console"

    def create_key(self, credits: int) -> str:
        done = subprocess.run(
            [HYPEREAL, "keys", "create", "--credits", str(credits)],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="package")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    """A real server (the offline local backends) with an admin key and a user's key."""
    tmp_path = tmp_path_factory.mktemp("console")
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HYPEREAL_")},
        "HYPEREAL_DATA_DIR": str(tmp_path / "data"),
        "HYPEREAL_BOOTSTRAP_ADMIN": "false",
        # The tests' webhook receiver listens on 127.0.0.1.
        "HYPEREAL_ALLOWED_PRIVATE_NETWORKS": "127.0.0.0/8",
    }
    args = [HYPEREAL, "serve", "--host", "127.0.0.1", "--port", str(port)]
    log = tmp_path / "serve.log"
    with process(args, env, log) as proc:
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{base_url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        admin = subprocess.run(
            [HYPEREAL, "keys", "create", "--admin", "--name", "operator"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        console = Console(base_url, admin.splitlines()[-1], "", env)
        console.user_key = console.create_key(credits=1000)
        yield console


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


class Shots:
    """Screenshots of the pages a test visits, named test-page.png."""

    def __init__(self, page: Page, test: str) -> None:
        self.page = page
        self.test = test
        ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str) -> Path:
        path = ARTIFACTS / f"{self.test}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh tab (no storage shared with other tests). Errors the page logs fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(60_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    def console_message(message: ConsoleMessage) -> None:
        # The console reads some answers that are meant to be 4xx (a user's key on the
        # admin routes is a 403); the browser logs each as a failed resource load.
        if message.type == "error" and "responded with a status of 4" not in message.text:
            errors.append(message.text)

    page.on("console", console_message)
    page.shots = Shots(page, request.node.name.removeprefix("test_"))  # type: ignore[attr-defined]
    yield page
    context.close()
    assert not errors, f"the page logged errors: {errors}"


def sign_in(page: Page, console: Console, key: str) -> None:
    page.goto(console.url)
    page.fill("#api-key", key)
    page.click("#sign-in button[type=submit]")
    page.wait_for_selector("#page-overview")
    page.wait_for_function("/credits/.test(document.querySelector('#who-balance').textContent)")
