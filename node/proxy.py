"""Inference routes forwarded to a real Ollama (``[api] upstream``), streamed through.

``/api/generate``, ``/api/chat``, ``/api/embed``, ``/api/embeddings``, ``/api/ps`` and
``/v1/...`` (OpenAI-compatible) go to the upstream unchanged. The response body is relayed
piece by piece as the upstream sends it (never buffered), so a streamed chat reaches the
client token by token; status and content type are the upstream's. With no upstream set, or
the upstream unreachable, the answer is 502 ``{"error": "..."}`` in one line.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import httpx

from node.http import HTTPError, Request, Response, Router

log = logging.getLogger("dmm.proxy")

PROXIED_POST = ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings")
OPENAI_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
# Headers that describe one hop, not the message (RFC 9110 7.6.1), plus the ones we set.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-type",
    }
)
# Generation may think for minutes before the first token: only connecting is bounded.
TIMEOUT = httpx.Timeout(connect=10.0, read=None, write=60.0, pool=10.0)


def _reason(exc: httpx.HTTPError) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


class UpstreamProxy:
    def __init__(self, upstream: str | None) -> None:
        self.upstream = upstream.rstrip("/") if upstream else None

    async def forward(self, request: Request) -> Response:
        if self.upstream is None:
            raise HTTPError(
                502,
                f"{request.path} needs a real Ollama: set [api] upstream in node.toml "
                '(e.g. upstream = "http://127.0.0.1:11434")',
            )
        url = self.upstream + request.path
        if request.query_string:
            url += "?" + request.query_string
        headers = {k: v for k, v in request.headers.items() if k not in _HOP_BY_HOP}
        if "content-type" in request.headers:
            headers["content-type"] = request.headers["content-type"]
        has_body = request.method not in ("GET", "HEAD")
        if has_body and "content-length" in request.headers:
            # Keep the client's framing so the upstream sees no chunked encoding it didn't ask for.
            headers["content-length"] = request.headers["content-length"]
        # trust_env off: the upstream is the URL configured, never via an environment proxy.
        client = httpx.AsyncClient(timeout=TIMEOUT, trust_env=False)
        try:
            upstream_request = client.build_request(
                request.method,
                url,
                headers=headers,
                content=request.stream() if has_body else None,
            )
            response = await client.send(upstream_request, stream=True)
        except httpx.HTTPError as exc:
            await client.aclose()
            log.warning(
                "proxy %s %s: upstream %s failed: %s",
                request.method,
                request.path,
                self.upstream,
                _reason(exc),
            )
            raise HTTPError(
                502, f"upstream Ollama at {self.upstream} is not reachable: {_reason(exc)}"
            ) from None
        except BaseException:
            await client.aclose()
            raise
        out_headers = [(k, v) for k, v in response.headers.items() if k.lower() not in _HOP_BY_HOP]
        return Response(
            response.status_code,
            content_type=response.headers.get("content-type", "application/octet-stream"),
            headers=out_headers,
            stream=self._relay(request, response, client),
        )

    async def _relay(
        self, request: Request, response: httpx.Response, client: httpx.AsyncClient
    ) -> AsyncIterator[bytes]:
        """The upstream body as it arrives; a break mid-stream ends it with an error line."""
        try:
            async for piece in response.aiter_raw():
                yield piece
        except httpx.HTTPError as exc:
            log.warning("proxy %s: upstream broke off: %s", request.path, _reason(exc))
            raise HTTPError(502, f"upstream Ollama broke off: {_reason(exc)}") from None
        finally:
            await response.aclose()
            await client.aclose()


def add_proxy_routes(router: Router, proxy: UpstreamProxy) -> None:
    for path in PROXIED_POST:
        router.add("POST", path, proxy.forward)
    router.add("GET", "/api/ps", proxy.forward)
    for method in OPENAI_METHODS:
        router.add(method, "/v1/{path:path}", proxy.forward)


__all__ = ["UpstreamProxy", "add_proxy_routes"]
