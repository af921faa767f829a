"""The SSRF guard on pooled aiohttp sessions: every connection is vetted, IP literals and
names alike, redirect hops included; a trusted origin is reached as named (that exact
origin only); allow-listed networks work. Only loopback addresses are ever dialled here: a
refused URL would otherwise connect to this machine, never to another one."""

from __future__ import annotations

from collections.abc import Iterator

import aiohttp
import pytest
from fastapi import FastAPI, Response
from fastapi.responses import RedirectResponse

from hypereal.media.fetch import FetchRefused, parse_networks
from hypereal.media.guarded_session import LazySession, guarded_session, origin_of
from tests.support.servers import serve_app

TIMEOUT = aiohttp.ClientTimeout(total=10)


class Target:
    """A loopback server counting the requests that reached it."""

    def __init__(self) -> None:
        self.hits = 0

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/ok")
        async def ok() -> Response:
            self.hits += 1
            return Response(b"fine", media_type="text/plain")

        return app


def redirector(location: str) -> FastAPI:
    app = FastAPI()

    @app.get("/go")
    async def go() -> RedirectResponse:
        return RedirectResponse(location)

    return app


@pytest.fixture
def target() -> Iterator[tuple[Target, str]]:
    server = Target()
    with serve_app(server.app()) as url:
        yield server, url


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "[::1]"])
async def test_loopback_is_refused_by_literal_and_by_name(
    target: tuple[Target, str], host: str
) -> None:
    server, url = target
    async with guarded_session([], timeout=TIMEOUT) as session:
        with pytest.raises(FetchRefused, match="not a public address"):
            await session.get(f"http://{host}:{port_of(url)}/ok")
    assert server.hits == 0


async def test_allow_listed_network_is_reached(target: tuple[Target, str]) -> None:
    server, url = target
    allowed = parse_networks(["127.0.0.0/8"])
    async with guarded_session(allowed, timeout=TIMEOUT) as session:
        for _ in range(2):
            async with session.get(f"{url}/ok") as response:
                assert (response.status, await response.read()) == (200, b"fine")
    assert server.hits == 2


async def test_trusted_origin_is_reached_but_not_other_ports_of_its_host(
    target: tuple[Target, str],
) -> None:
    server, url = target
    trusted = [origin_of(url + "/v1")]
    async with guarded_session([], trusted, timeout=TIMEOUT) as session:
        async with session.get(f"{url}/ok") as response:
            assert response.status == 200
        with pytest.raises(FetchRefused):
            await session.get(f"http://127.0.0.1:{port_of(url) + 1}/ok")
        with pytest.raises(FetchRefused):  # the same server under another name
            await session.get(f"http://localhost:{port_of(url)}/ok")
    assert server.hits == 1


async def test_each_redirect_hop_is_vetted(target: tuple[Target, str]) -> None:
    server, url = target
    with serve_app(redirector(f"{url}/ok")) as hop:
        # The redirecting origin is trusted, the loopback target it points at is not.
        async with guarded_session([], [origin_of(hop)], timeout=TIMEOUT) as session:
            with pytest.raises(FetchRefused):
                await session.get(f"{hop}/go")
        assert server.hits == 0
        allowed = parse_networks(["127.0.0.0/8"])
        async with guarded_session(allowed, timeout=TIMEOUT) as session:
            async with session.get(f"{hop}/go") as response:
                assert response.status == 200
    assert server.hits == 1


async def test_lazy_session_is_one_session_until_closed(target: tuple[Target, str]) -> None:
    _, url = target
    lazy = LazySession(lambda: guarded_session([], [origin_of(url)], timeout=TIMEOUT))
    first = lazy.get()
    assert lazy.get() is first
    async with first.get(f"{url}/ok") as response:
        assert response.status == 200
    await lazy.aclose()
    assert first.closed
    second = lazy.get()
    assert second is not first and not second.closed
    await lazy.aclose()
