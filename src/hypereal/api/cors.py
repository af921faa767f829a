"""Starlette's CORS middleware with a short path for requests that carry no ``Origin``
header (API clients, servers, the bench): those only get ``Vary: Origin`` added to the
answer, as Starlette adds it, without parsing the request's headers into a ``Headers`` and
the answer's into a ``MutableHeaders``. Requests with an ``Origin`` (browsers, preflights)
go through Starlette's own code."""

from __future__ import annotations

from starlette.middleware.cors import CORSMiddleware
from starlette.types import Message, Receive, Scope, Send

_ORIGIN = b"origin"
_VARY = b"vary"


class LeanCORSMiddleware(CORSMiddleware):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not any(name == _ORIGIN for name, _ in scope["headers"]):
            await self.app(scope, receive, _varying_by_origin(send))
            return
        await super().__call__(scope, receive, send)


def _varying_by_origin(send: Send) -> Send:
    """``send`` with ``Vary: Origin`` set on the answer's start, as Starlette's
    ``CORSMiddleware.send`` sets it for a request without an Origin: the values of any
    ``vary`` headers and ``Origin`` joined into the first one, the others removed."""

    async def send_varying(message: Message) -> None:
        if message["type"] == "http.response.start":
            # A copy, as Starlette's MutableHeaders(scope=message) makes: the list may be a
            # Response's own raw_headers, sent again with a later request.
            headers: list[tuple[bytes, bytes]] = list(message.get("headers", []))
            message["headers"] = headers
            found = [index for index, (name, _) in enumerate(headers) if name == _VARY]
            value = b", ".join([*(headers[index][1] for index in found), b"Origin"])
            for index in reversed(found[1:]):
                del headers[index]
            if found:
                headers[found[0]] = (_VARY, value)
            else:
                headers.append((_VARY, value))
        await send(message)

    return send_varying
