"""A small ASGI toolkit for the node's HTTP API: requests, responses, a router, a server.

The node serves Ollama's API from its own trio loop (hypercorn's trio worker), so a
handler can reach the node's state directly. Handlers take a ``Request`` and return a
``Response``; a streaming response yields its body in pieces (NDJSON progress).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

log = logging.getLogger("dmm.http")

MAX_JSON_BODY = 1 << 20

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class HTTPError(Exception):
    """Raised by a handler to answer ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ClientGone(Exception):
    """Raised by a streamed body to stop the response where it is: its client hung up, or
    the rest cannot be sent (the client sees a body cut short, never a false end)."""


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    params: dict[str, str]
    _receive: Receive
    _body: bytes | None = None
    query_string: str = ""  # raw, as received (the proxy forwards it unchanged)
    _body_done: bool = False

    async def body(self, limit: int = MAX_JSON_BODY) -> bytes:
        if self._body is None:
            chunks = bytearray()
            async for piece in self.stream():
                chunks += piece
                if len(chunks) > limit:
                    raise HTTPError(413, f"request body is larger than {limit} bytes")
            self._body = bytes(chunks)
        return self._body

    async def stream(self) -> AsyncIterator[bytes]:
        """The body in pieces as they arrive (for uploads that must not sit in memory)."""
        while not self._body_done:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._body_done = True
                raise HTTPError(400, "client disconnected")
            piece = message.get("body", b"")
            if not message.get("more_body", False):
                self._body_done = True
            if piece:
                yield piece

    async def discard_body(self) -> None:
        """Read and drop what is left of the body. A handler that answers before reading it
        (a blob already stored, a bad digest) would otherwise leave it on a keep-alive
        connection, which the server then closes under the client's next request."""
        try:
            async for _ in self.stream():
                pass
        except HTTPError:
            pass

    async def wait_disconnected(self) -> None:
        """Return once the client has gone. Only after the body was read (it reads on)."""
        while (await self._receive())["type"] != "http.disconnect":
            pass

    async def json(self) -> dict[str, Any]:
        raw = await self.body()
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise HTTPError(400, f"invalid JSON: {exc}") from None
        except RecursionError:
            raise HTTPError(400, "invalid JSON: nested too deeply") from None
        if not isinstance(data, dict):
            raise HTTPError(400, "the request body must be a JSON object")
        return data

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default


@dataclass(slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)
    stream: AsyncIterator[bytes] | None = None


def json_response(data: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(data, separators=(",", ":")).encode())


def error_response(status: int, message: str) -> Response:
    # One line whatever a message quotes (a path may hold a decoded %0A): control
    # characters are escaped, so clients and logs never see a broken line.
    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    return json_response({"error": line}, status)


def ndjson_response(items: AsyncIterator[dict[str, Any]]) -> Response:
    async def lines() -> AsyncIterator[bytes]:
        try:
            async for item in items:
                yield json.dumps(item, separators=(",", ":")).encode() + b"\n"
        finally:
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                await aclose()

    return Response(200, content_type="application/x-ndjson", stream=lines())


Handler = Callable[[Request], Awaitable[Response]]
# Told of each request refused for want of a token: (client address, method, path).
OnUnauthorized = Callable[[str, str, str], None]

# Answered without a token even when one is required: Ollama clients probe "/" to see that
# a server is up, and the version says nothing about the node's data.
PUBLIC_ROUTES: frozenset[tuple[str, str]] = frozenset(
    {("GET", "/"), ("HEAD", "/"), ("GET", "/api/version"), ("HEAD", "/api/version")}
)


class Router:
    """Routes by method and path; ``{name}`` captures one segment, ``{name:path}`` the rest."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self._token: bytes | None = None
        self._on_unauthorized: OnUnauthorized | None = None

    def require_token(
        self, token: str | None, on_unauthorized: OnUnauthorized | None = None
    ) -> None:
        """Require ``Authorization: Bearer <token>`` on every request but `PUBLIC_ROUTES`
        (None = no token needed). Tokens are compared in constant time."""
        self._token = None if token is None else token.encode()
        self._on_unauthorized = on_unauthorized

    def _authorized(self, method: str, path: str, headers: dict[str, str]) -> bool:
        if self._token is None or (method, path) in PUBLIC_ROUTES:
            return True
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode(), self._token)

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        regex = re.sub(r"\{(\w+):path\}", r"(?P<\1>.+)", pattern)
        regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", regex)
        self._routes.append((method.upper(), re.compile(regex + "$"), handler))

    def route(self, method: str, pattern: str) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self.add(method, pattern, handler)
            return handler

        return register

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        allowed = False
        for route_method, regex, handler in self._routes:
            m = regex.match(path)
            if m is None:
                continue
            if route_method == method or (route_method == "GET" and method == "HEAD"):
                return handler, m.groupdict()
            allowed = True
        if allowed:
            raise HTTPError(405, f"method {method} not allowed on {path}")
        raise HTTPError(404, f"no such endpoint: {method} {path}")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method = scope["method"]
        request = Request(
            method=method,
            path=scope["path"],
            query=parse_qs(scope.get("query_string", b"").decode("latin-1")),
            headers={k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]},
            params={},
            _receive=receive,
            query_string=scope.get("query_string", b"").decode("latin-1"),
        )
        if not self._authorized(method, request.path, request.headers):
            if self._on_unauthorized is not None:
                client = scope.get("client") or ("?", 0)
                self._on_unauthorized(f"{client[0]}:{client[1]}", method, request.path)
            response = error_response(401, "unauthorized: send Authorization: Bearer <token>")
            response.headers.append(("www-authenticate", 'Bearer realm="dmm"'))
            await _send_response(send, response, head=method == "HEAD")
            return
        try:
            handler, request.params = self.resolve(method, request.path)
            response = await handler(request)
        except HTTPError as exc:
            response = error_response(exc.status, exc.message)
        except Exception as exc:
            # The node stays up whatever a request does; the client gets one line.
            log.exception("internal error on %s %s", method, request.path)
            response = error_response(500, f"internal error: {exc}")
        await request.discard_body()
        await _send_response(send, response, head=method == "HEAD")


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _send_response(send: Send, response: Response, *, head: bool) -> None:
    headers = [(b"content-type", response.content_type.encode())]
    headers += [(k.encode(), v.encode()) for k, v in response.headers]
    if response.stream is None and not any(
        k.lower() == "content-length" for k, _ in response.headers
    ):
        headers.append((b"content-length", str(len(response.body)).encode()))
    try:
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        if head:
            await send({"type": "http.response.body", "body": b""})
            return
        if response.stream is None:
            await send({"type": "http.response.body", "body": response.body})
            return
        try:
            async for piece in response.stream:
                await send({"type": "http.response.body", "body": piece, "more_body": True})
        except HTTPError as exc:
            # Headers are gone already: report in-band, as Ollama does in a stream.
            line = json.dumps({"error": exc.message}).encode() + b"\n"
            await send({"type": "http.response.body", "body": line, "more_body": True})
        except ClientGone:
            return  # nobody to finish the response for
        await send({"type": "http.response.body", "body": b""})
    finally:
        # A stream not read to its end (HEAD, client gone) still releases what it holds,
        # e.g. a proxied upstream connection.
        aclose = getattr(response.stream, "aclose", None)
        if aclose is not None:
            await aclose()


async def serve_http(
    app: Router,
    host: str,
    port: int,
    *,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until ``shutdown`` is set; ``task_status.started`` gets the bound URLs."""
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("dmm.http.server")
    config.graceful_timeout = 1.0
    # Pulls stream for minutes; hypercorn's default keep-alive and read timeouts are for web
    # pages, not multi-gigabyte NDJSON progress streams.
    config.keep_alive_timeout = 600
    config.read_timeout = None
    await serve(app, config, shutdown_trigger=shutdown.wait, task_status=task_status)
