"""The sync routes of the node's HTTP API (``node/sync.py`` behind them).

``GET /api/sync/status[?model=NAME]``, ``POST /api/sync`` (``{"model", "peer",
"sync_type"}``, all optional: no model syncs every followed model), ``GET
/api/sync/conflicts``, ``POST /api/sync/resolve`` (``{"model", "pick"}``), ``GET|POST|DELETE
/api/sync/policies``, ``POST /api/sync/versions`` (``{"model", "path"}``). Fields may also be
given as query arguments.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from node.http import HTTPError, Request, Response, Router, json_response
from node.sync import SyncError

if TYPE_CHECKING:
    from node.daemon import Node


async def _fields(request: Request) -> dict[str, Any]:
    body = await request.json()
    for key, values in request.query.items():
        body.setdefault(key, values[0])
    return body


def _text(fields: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    value = fields.get(key)
    if value in (None, ""):
        if required:
            raise HTTPError(400, f"{key} is required")
        return None
    if not isinstance(value, str):
        raise HTTPError(400, f"{key} must be a string")
    return value


def add_sync_routes(router: Router, node: Node) -> None:
    sync = node.sync

    @router.route("GET", "/api/sync/status")
    async def status(request: Request) -> Response:
        model = request.arg("model")
        if not model:
            return json_response(sync.status())
        try:
            return json_response(await sync.get_sync_state(model))
        except SyncError as exc:
            raise HTTPError(400, str(exc)) from None

    @router.route("POST", "/api/sync")
    async def trigger(request: Request) -> Response:
        fields = await _fields(request)
        model = _text(fields, "model")
        peer = _text(fields, "peer")
        sync_type = _text(fields, "sync_type")
        if model is None:
            if peer is not None or sync_type is not None:
                raise HTTPError(400, "peer and sync_type need a model")
            results = []
            for policy in sync.policies():
                results.extend(await sync.sync_glob(policy))
            return json_response({"results": results})
        try:
            return json_response(await sync.synchronize_model(model, peer, sync_type))
        except SyncError as exc:
            raise HTTPError(404 if "no peer holds" in str(exc) else 400, str(exc)) from None

    @router.route("GET", "/api/sync/conflicts")
    async def conflicts(request: Request) -> Response:
        return json_response({"conflicts": await sync.conflicts()})

    @router.route("POST", "/api/sync/resolve")
    async def resolve(request: Request) -> Response:
        fields = await _fields(request)
        model = _text(fields, "model", required=True)
        pick = _text(fields, "pick", required=True)
        assert model is not None and pick is not None
        try:
            return json_response(await sync.resolve_conflict(model, pick))
        except SyncError as exc:
            raise HTTPError(400, str(exc)) from None

    @router.route("GET", "/api/sync/policies")
    async def policies(request: Request) -> Response:
        return json_response({"policies": [p.to_json() for p in sync.policies()]})

    @router.route("POST", "/api/sync/policies")
    async def set_policy(request: Request) -> Response:
        try:
            policy = await sync.set_policy(await request.json())
        except ValueError as exc:
            raise HTTPError(400, f"policy: {exc}") from None
        return json_response(policy.to_json())

    @router.route("DELETE", "/api/sync/policies")
    async def remove_policy(request: Request) -> Response:
        glob = request.arg("glob")
        if not glob:
            raise HTTPError(400, "missing ?glob=")
        if not await sync.remove_policy(glob):
            raise HTTPError(404, f"no run-time policy for {glob!r}")
        return json_response({"removed": glob})

    @router.route("POST", "/api/sync/versions")
    async def create_version(request: Request) -> Response:
        fields = await _fields(request)
        model = _text(fields, "model", required=True)
        path = _text(fields, "path", required=True)
        assert model is not None and path is not None
        try:
            return json_response(await sync.create_model_version(model, path))
        except SyncError as exc:
            raise HTTPError(400, str(exc)) from None
