"""The node's HTTP API: composes the router, and serves the node's own routes.

Ollama's routes live in node/ollama_api.py (model management, from the store) and
node/proxy.py (inference, forwarded to ``[api] upstream``). The node's own: ``/api/health``,
``/api/status``, ``/api/peers``, ``/api/find``, ``POST /api/dmm/refresh`` (the CLI's "tell the
node": re-read the store, publish changes), ``GET /metrics`` (Prometheus text format).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import trio

from node import registry_api
from node.http import HTTPError, Request, Response, Router, json_response
from node.ollama_api import DMM_VERSION, add_ollama_routes, rfc3339
from node.proxy import UpstreamProxy, add_proxy_routes
from node.replication_api import add_replication_routes
from node.sync_api import add_sync_routes

if TYPE_CHECKING:
    from node.daemon import Node

MAX_FIND_TIMEOUT = 60.0


def build_router(node: Node) -> Router:
    router = Router()
    add_ollama_routes(router, node)
    add_proxy_routes(router, UpstreamProxy(node.config.api.upstream))

    @router.route("GET", "/api/health")
    async def health(request: Request) -> Response:
        return json_response(
            {
                "status": "ok",
                "peer_id": node.peer_id,
                "peers": len(node.host.connected_peers()),
                "uptime": round(trio.current_time() - node.started_at, 3),
            }
        )

    @router.route("GET", "/api/status")
    async def status(request: Request) -> Response:
        return json_response(await node.status())

    @router.route("GET", "/api/peers")
    async def peers(request: Request) -> Response:
        return json_response(
            {
                "peers": node.peers(),
                "refused": node.refused_peers(),
                "limits": node.limits.snapshot(),
            }
        )

    @router.route("GET", "/api/find")
    async def find(request: Request) -> Response:
        glob = request.arg("glob")
        if not glob:
            raise HTTPError(400, "missing ?glob= (e.g. ?glob=llama*)")
        try:
            timeout = float(request.arg("timeout", "10") or 10)
        except ValueError:
            raise HTTPError(400, "timeout must be a number of seconds") from None
        if math.isnan(timeout):  # float() takes "nan", and trio refuses a NaN deadline
            raise HTTPError(400, "timeout must be a number of seconds")
        timeout = min(max(timeout, 0.1), MAX_FIND_TIMEOUT)
        return json_response(await node.find(glob, timeout=timeout))

    @router.route("GET", "/metrics")
    async def metrics(request: Request) -> Response:
        if not node.config.metrics.enabled:
            raise HTTPError(404, "metrics are off: set [metrics] enabled = true in node.toml")
        body, content_type = node.metrics.exposition()
        return Response(200, body, content_type)

    @router.route("POST", "/api/dmm/refresh")
    async def refresh(request: Request) -> Response:
        return json_response(await node.refresh())

    registry_api.add_routes(router, node)  # OCI /v2/ for `ollama pull --insecure`
    add_sync_routes(router, node)
    add_replication_routes(router, node)
    return router


__all__ = ["DMM_VERSION", "MAX_FIND_TIMEOUT", "build_router", "rfc3339"]
