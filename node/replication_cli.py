"""``dmm replicas`` and ``dmm policy set|show``: talk to the running node's replication API."""

from __future__ import annotations

import argparse
import json
import urllib.parse
from collections.abc import Callable
from typing import Any

from node.config import Config, validate_peer_id

__all__ = ["add_replication_commands"]

Add = Callable[..., argparse.ArgumentParser]


def _api(config: Config, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    import urllib.error
    import urllib.request

    # fail() exits 1 with "dmm: ..." on stderr. Raising node.cli's exceptions would not do:
    # under `python -m node.cli` that module is __main__, whose except clauses would not
    # match the classes of an imported node.cli.
    from node.cli import fail

    url = f"http://{config.api.listen}{path}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        fail(f"the node answered {exc.code}: {message}")
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        fail(
            f"no node answers at http://{config.api.listen} ({getattr(exc, 'reason', exc)}); "
            "start one with `dmm node start`"
        )


def cmd_replicas(args: argparse.Namespace, config: Config) -> int:
    from node.cli import emit_json, print_table

    query = f"?{urllib.parse.urlencode({'model': args.name})}" if args.name else ""
    result = _api(config, "GET", f"/api/replicas{query}")
    models = [result] if args.name else result["models"]
    if args.json:
        emit_json(result)
        return 0
    rows = []
    for m in models:
        policy = m["policy"]
        wanted = f"{policy['min_replicas']}..{policy['max_replicas']}" if policy else "-"
        for r in m["replicas"] or [{"peer_id": "-", "health": "-", "pinned": None}]:
            kind = "pinned" if r["pinned"] else ("replica" if r["pinned"] is False else "?")
            rows.append(
                (
                    m["model"],
                    f"{m['healthy']} ({wanted})",
                    m["status"],
                    r["peer_id"],
                    r["health"],
                    kind,
                )
            )
    print_table(rows, ("MODEL", "HEALTHY (WANTED)", "STATUS", "PEER", "HEALTH", "COPY"))
    return 0


def _requirement(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected key=value, e.g. region=eu")
    return key, value


def _peer(text: str) -> str:
    try:
        return validate_peer_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_policy_set(args: argparse.Namespace, config: Config) -> int:
    from node.cli import emit_json

    body: dict[str, Any] = {"glob": args.glob, "constraints": dict(args.require)}
    for key, value in (
        ("min_replicas", args.min),
        ("max_replicas", args.max),
        ("replication_factor", args.factor),
        ("priority", args.priority),
        ("sync_interval", args.interval),
    ):
        if value is not None:
            body[key] = value
    body["preferred_peers"] = args.prefer
    body["excluded_peers"] = args.exclude
    result = _api(config, "POST", "/api/policy", body)
    if args.json:
        emit_json(result)
        return 0
    p = result["policy"]
    print(
        f"policy {p['glob']!r} set: min {p['min_replicas']}, max {p['max_replicas']}, "
        f"factor {p['replication_factor']}"
    )
    return 0


def cmd_policy_show(args: argparse.Namespace, config: Config) -> int:
    from node.cli import emit_json, print_table

    result = _api(config, "GET", "/api/policy")
    if args.json:
        emit_json(result)
        return 0
    rows = [
        (
            p["glob"],
            str(p["min_replicas"]),
            str(p["max_replicas"]),
            str(p["replication_factor"]),
            str(p["priority"]),
            " ".join(f"{k}={v}" for k, v in sorted(p["constraints"].items())) or "-",
            " ".join(p["preferred_peers"]) or "-",
            " ".join(p["excluded_peers"]) or "-",
        )
        for p in result["policies"]
    ]
    print_table(rows, ("GLOB", "MIN", "MAX", "FACTOR", "PRIORITY", "REQUIRE", "PREFER", "EXCLUDE"))
    d = result["defaults"]
    print(
        f"{len(rows)} polic{'y' if len(rows) == 1 else 'ies'}; models matching none are not "
        f"replicated (defaults for omitted counts: min {d['min_replicas']}, "
        f"max {d['max_replicas']}, factor {d['replication_factor']})"
    )
    return 0


def add_replication_commands(
    sub: Any, add: Add, common: argparse.ArgumentParser, data: argparse.ArgumentParser
) -> None:
    """Register ``replicas`` and ``policy`` on the ``dmm`` parser."""
    p = add(
        "replicas",
        cmd_replicas,
        "where copies of each replicated model are, and their health "
        "(healthy, degraded, unreachable)",
    )
    p.add_argument("name", metavar="NAME", nargs="?", help="only this model")

    policy = sub.add_parser(
        "policy",
        help="replication policies: how many copies of which models, where",
        description="replication policies: how many copies of which models, where",
    )
    policy_sub = policy.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    p = policy_sub.add_parser(
        "set",
        parents=[common, data],
        help="add or replace the policy for a glob (persisted, enforced at once)",
        description="add or replace the policy for a glob of model names on the running "
        "node; it is persisted and enforced at once. Counts left out take the "
        "[replication] defaults.",
    )
    p.add_argument("glob", metavar="GLOB", help="fnmatch glob over name:tag, e.g. 'llama3*'")
    p.add_argument("--min", type=int, metavar="N", help="heal when fewer healthy copies than N")
    p.add_argument("--max", type=int, metavar="N", help="release replica-only copies above N")
    p.add_argument("--factor", type=int, metavar="N", help="copies to aim for (min..max)")
    p.add_argument(
        "--prefer",
        action="append",
        default=[],
        type=_peer,
        metavar="ID",
        help="peer id to ask first (repeatable)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        type=_peer,
        metavar="ID",
        help="peer id that never holds a copy (repeatable)",
    )
    p.add_argument(
        "--require",
        action="append",
        default=[],
        type=_requirement,
        metavar="KEY=VALUE",
        help="tag a holder must carry in its [node.tags], e.g. region=eu (repeatable)",
    )
    p.add_argument("--priority", type=int, metavar="N", help="higher heals first (default 0)")
    p.add_argument(
        "--interval",
        metavar="DURATION",
        help="re-check this often (default: [replication] policy_enforcement_interval)",
    )
    p.set_defaults(func=cmd_policy_set)
    p = policy_sub.add_parser(
        "show", parents=[common, data], help="the policies in force on the running node"
    )
    p.set_defaults(func=cmd_policy_show)
