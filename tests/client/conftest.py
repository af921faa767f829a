"""A real ``hypereal serve`` process on 127.0.0.1 (temp data dir, the offline local models)
shared by the client and CLI tests; each test pays with an account of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.support.processes import process, wait_until_healthy
from tests.support.servers import free_port

HYPEREAL = str(Path(sys.executable).with_name("hypereal"))


@dataclass(frozen=True)
class Server:
    url: str
    admin_key: str
    env: dict[str, str]

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.admin_key}"}, timeout=30
        )


@dataclass(frozen=True)
class User:
    key: str
    key_id: str
    account_id: str


MakeUser = Callable[..., User]


def server_env(data_dir: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("HYPEREAL_") or key == "HYPEREAL_TEST_PG_DSN"
    }
    return {
        **env,
        "HYPEREAL_DATA_DIR": str(data_dir),
        "HYPEREAL_BOOTSTRAP_ADMIN": "false",
        # The webhook test's receiver listens on loopback.
        "HYPEREAL_ALLOWED_PRIVATE_NETWORKS": "127.0.0.1/32",
        "HYPEREAL_WEBHOOK_RETRY_SCHEDULE": "0,0.2,0.5",
    }


@pytest.fixture(scope="package")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("client-server")
    env = server_env(root / "data")
    created = subprocess.run(
        [HYPEREAL, "keys", "create", "--admin", "--name", "admin"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    admin_key = created.stdout.strip().splitlines()[-1]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env["HYPEREAL_PUBLIC_URL"] = url
    log = root / "serve.log"
    args = [HYPEREAL, "serve", "--host", "127.0.0.1", "--port", str(port)]
    with process(args, env, log) as proc:
        wait_until_healthy(url, proc, log, seconds=90)
        yield Server(url=url, admin_key=admin_key, env=env)


@pytest.fixture
def make_user(server: Server) -> MakeUser:
    """``make_user(credits=100, rate_limit=None)``: a new account and its key, made through
    the admin API."""

    def make(credits: int = 100, rate_limit: int | None = None) -> User:
        body: dict[str, object] = {"credits": credits, "name": "client-test"}
        if rate_limit is not None:
            body["rateLimitPerHour"] = rate_limit
        with server.admin() as admin:
            response = admin.post("/v1/admin/keys", json=body)
        assert response.status_code == 201, response.text
        data = response.json()
        return User(key=data["key"], key_id=data["id"], account_id=data["accountId"])

    return make


@pytest.fixture(scope="package")
def picture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small PNG with some structure (a gradient and a square) for the image models."""
    path = tmp_path_factory.mktemp("media") / "picture.png"
    image = Image.new("RGB", (96, 64))
    for x in range(96):
        for y in range(64):
            image.putpixel((x, y), (x * 2, y * 3, 128))
    image.paste((250, 250, 250), (30, 20, 60, 44))
    image.save(path)
    return path
