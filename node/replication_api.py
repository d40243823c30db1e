"""HTTP routes of the ReplicationManager: ``/api/replicas``, ``/api/policy``, ``/api/replicate``.

- ``GET /api/replicas[?model=NAME]``: every model a check has seen (or one), with its
  holders, their health (``healthy``, ``degraded``, ``unreachable``), the policy and status.
- ``GET /api/policy``: the policies in force and the defaults.
- ``POST /api/policy`` with a policy object (``glob``, ``min_replicas``, ...): add or
  replace the policy for that glob; persisted, enforced at once.
- ``POST /api/replicate`` with ``{"model": NAME, "peer": PEER_ID}``: ask that peer to hold
  the model; answers its decision (``code``, ``reason``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from node.config import validate_peer_id
from node.http import HTTPError, Request, Response, Router, json_response
from node.replication_policy import PolicyError, parse_policy
from storage.names import InvalidName, parse_model_name

if TYPE_CHECKING:
    from node.daemon import Node

__all__ = ["add_replication_routes"]


def add_replication_routes(router: Router, node: Node) -> None:
    manager = node.replication

    @router.route("GET", "/api/replicas")
    async def replicas(request: Request) -> Response:
        model = request.arg("model")
        if not model:
            return json_response({"models": manager.get_all_replicas()})
        try:
            return json_response(manager.get_replicas(model))
        except InvalidName as exc:
            raise HTTPError(400, str(exc)) from None
        except KeyError as exc:
            raise HTTPError(404, str(exc.args[0])) from None

    @router.route("GET", "/api/policy")
    async def show_policy(request: Request) -> Response:
        d = manager.defaults
        return json_response(
            {
                "policies": [p.to_json() for p in manager.policies()],
                "defaults": {
                    "min_replicas": d.min_replicas,
                    "max_replicas": d.max_replicas,
                    "replication_factor": d.replication_factor,
                },
            }
        )

    @router.route("POST", "/api/policy")
    async def set_policy(request: Request) -> Response:
        body = await request.json()
        try:
            policy = parse_policy(body, manager.defaults)
        except PolicyError as exc:
            raise HTTPError(400, f"policy: {exc}") from None
        await manager.set_replication_policy(policy)
        return json_response({"policy": policy.to_json()})

    @router.route("POST", "/api/replicate")
    async def replicate(request: Request) -> Response:
        body = await request.json()
        model, peer = body.get("model"), body.get("peer")
        if not isinstance(model, str) or not isinstance(peer, str):
            raise HTTPError(400, "model and peer are required strings")
        try:
            parse_model_name(model)
            validate_peer_id(peer)
        except (InvalidName, ValueError) as exc:
            raise HTTPError(400, str(exc)) from None
        try:
            return json_response(await manager.replicate_model(model, peer))
        except KeyError as exc:
            raise HTTPError(404, str(exc.args[0])) from None
        except ConnectionError as exc:
            raise HTTPError(502, str(exc)) from None
