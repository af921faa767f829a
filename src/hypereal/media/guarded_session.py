"""Long-lived pooled aiohttp sessions behind the SSRF guard of :mod:`hypereal.media.fetch`.

The upstream chat path and the webhook sender keep one ``aiohttp.ClientSession`` each, for
the life of the backend or the sender: aiohttp costs several times less CPU per request than
httpx, and the gap grows with concurrency (``bench/http_clients.py``).

:class:`GuardedConnector` vets every address the session connects to, with the rules of
:func:`hypereal.media.fetch.address_allowed`: global and not multicast, or inside one of the
``allowed`` networks. Hosts of ``trusted_origins`` (``(scheme, host, port)``, e.g. an upstream
provider's ``base_url`` the operator configured, which may well be on a private network) are
connected to as named. The check sits where aiohttp turns a host into the addresses it
connects to (``TCPConnector._resolve_host``), not in a custom ``AbstractResolver``: aiohttp
never asks the resolver about an IP literal (``http://127.0.0.1/``), so a resolver alone would
let those through. Every new connection passes there, redirects included, and the connection
is made to the addresses just vetted (a DNS answer cannot change between check and connect);
TLS keeps the original name for SNI and certificate checks. A refused address raises
:class:`~hypereal.media.fetch.FetchRefused`.

Sessions do not read proxy settings from the environment (aiohttp's ``trust_env`` is off).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Collection, Sequence
from typing import Any

import aiohttp
import yarl
from aiohttp.abc import ResolveResult
from aiohttp.tracing import Trace

from hypereal.media.fetch import FetchRefused, IPNetwork, Origin, address_allowed


def origin_of(url: str) -> Origin:
    """``(scheme, host, port)`` of ``url`` as aiohttp sees it (an IDN host in its ASCII
    form), the port filled in from the scheme."""
    parsed = yarl.URL(url)
    scheme = parsed.scheme.lower()
    port = parsed.port or (443 if scheme == "https" else 80)
    return scheme, (parsed.raw_host or "").rstrip(".").lower(), port


class GuardedConnector(aiohttp.TCPConnector):
    """A TCPConnector that only connects to vetted addresses (see the module doc)."""

    def __init__(
        self,
        allowed: Sequence[IPNetwork],
        trusted_origins: Collection[Origin] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.allowed = tuple(allowed)
        # aiohttp hands the connector the host and port only: trusted by (host, port).
        self.trusted = frozenset(
            (host.rstrip(".").lower(), port) for _, host, port in trusted_origins
        )

    async def _resolve_host(
        self, host: str, port: int, traces: Sequence[Trace] | None = None
    ) -> list[ResolveResult]:
        resolved = await super()._resolve_host(host, port, traces=traces)
        if (host.rstrip(".").lower(), port) in self.trusted:
            return resolved
        for result in resolved:
            address = ipaddress.ip_address(str(result["host"]).split("%", 1)[0])
            if not address_allowed(address, self.allowed):
                raise FetchRefused(
                    f"Refused to connect to '{host}': {address} is not a public address"
                )
        return resolved


def guarded_session(
    allowed: Sequence[IPNetwork],
    trusted_origins: Collection[Origin] = (),
    *,
    timeout: aiohttp.ClientTimeout,
    limit: int = 100,
) -> aiohttp.ClientSession:
    """A pooled session whose every connection goes through :class:`GuardedConnector`
    (``limit`` connections open at once, idle ones kept alive). Call it on the running loop."""
    connector = GuardedConnector(allowed, trusted_origins, limit=limit, limit_per_host=0)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        cookie_jar=aiohttp.DummyCookieJar(),  # no state carried from one call to the next
    )


class LazySession:
    """One long-lived session, made by ``factory`` on first use on the running event loop
    (aiohttp sessions belong to one loop; objects owning this one are built before any loop
    runs). A call from another loop gets a session of its own, the old one is let go."""

    def __init__(self, factory: Callable[[], aiohttp.ClientSession]) -> None:
        self._factory = factory
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> aiohttp.ClientSession:
        """The session of the running loop (created now if there is none)."""
        loop = asyncio.get_running_loop()
        session = self._session
        if session is None or session.closed or self._loop is not loop:
            if session is not None and self._loop is not loop:
                session.detach()  # its loop is gone or elsewhere: nothing to close from here
            session = self._session = self._factory()
            self._loop = loop
        return session

    async def aclose(self) -> None:
        """Close the session and its connections (a later :meth:`get` makes a new one)."""
        session, self._session = self._session, None
        if session is None:
            return
        if self._loop is asyncio.get_running_loop():
            await session.close()
        else:
            session.detach()
