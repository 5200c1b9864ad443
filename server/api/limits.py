"""Request-body limits: a size cap (413) and a deadline for the whole body to arrive (408).

Without them a client can hold a connection and its task forever by declaring a Content-Length
larger than what it sends (or by trickling a byte now and then), and can make the server buffer an
arbitrarily large body. uvicorn has neither limit (its keep-alive timeout only runs between
requests), so this pure-ASGI middleware reads each HTTP request's body itself before the app runs:

- a declared Content-Length over `max_body_bytes` is refused at once, before any of the body is
  read (a client that sent `Expect: 100-continue` never uploads it);
- a body without a length (chunked) is counted as it arrives and refused once it passes the cap;
- the whole body must arrive within `body_timeout_s` of the request's headers. A total deadline,
  not a per-read one as in nginx's `client_body_timeout`, so a trickle cannot extend it.

Both refusals use OpenAI's error shape and `Connection: close`: the rest of the body may still be
in flight, so the connection cannot carry another request. The body that passes is replayed to
the app as one message; later `receive()` calls go to the server (the app watches them for a
client disconnect). The body is buffered anyway by FastAPI to parse JSON, so this costs no memory.
"""

from __future__ import annotations

import asyncio
import json
import logging

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)


class RequestLimits:
    """ASGI middleware: cap each HTTP request body at `max_body_bytes` and its arrival time at
    `body_timeout_s` seconds."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout_s: float) -> None:
        if max_body_bytes < 0 or body_timeout_s <= 0:
            raise ValueError("max_body_bytes must be >= 0 and body_timeout_s > 0")
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._refuse(scope, send, 413, "request_too_large",
                               f"request body of {int(declared)} bytes is over the limit of {self.max_body_bytes} bytes")
            return
        try:
            body = await self._read_body(receive)
        except _TooLarge:
            await self._refuse(scope, send, 413, "request_too_large",
                               f"request body is over the limit of {self.max_body_bytes} bytes")
            return
        except asyncio.TimeoutError:  # the builtin TimeoutError on 3.11+, asyncio's own class on 3.10
            await self._refuse(scope, send, 408, "request_timeout",
                               f"request body did not arrive in full within {self.body_timeout_s:g} s")
            return
        if body is None:
            return  # the client went away before its body was complete: nobody to answer
        await self.app(scope, _Replay(body, receive), send)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None if the client disconnected first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    async def _refuse(scope: Scope, send: Send, status: int, code: str, message: str) -> None:
        log.info("%s %s -> %d: %s", scope.get("method"), scope.get("path"), status, message)
        body = json.dumps(
            {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class _Replay:
    """An ASGI `receive` that gives the buffered body once, then defers to the server's."""

    def __init__(self, body: bytes, receive: Receive) -> None:
        self.body: bytes | None = body
        self.receive = receive

    async def __call__(self) -> Message:
        if self.body is None:
            return await self.receive()
        message = {"type": "http.request", "body": self.body, "more_body": False}
        self.body = None
        return message
