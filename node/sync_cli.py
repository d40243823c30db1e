"""``dmm sync``, ``dmm sync status``, ``dmm conflicts``, ``dmm resolve``: the running node's
SyncManager over its HTTP API (``node/sync_api.py``)."""

from __future__ import annotations

import argparse
import urllib.parse
from collections.abc import Callable
from typing import Any

from node.cli import EXIT_OK, UsageError, api_call, emit_json, human_size, print_table
from node.config import SYNC_TYPES, Config
from storage.names import parse_model_name

SYNC_TIMEOUT = 3600.0  # a sync may fetch a whole model

Add = Callable[..., argparse.ArgumentParser]


def _query(**fields: str | None) -> str:
    present = {k: v for k, v in fields.items() if v}
    return f"?{urllib.parse.urlencode(present)}" if present else ""


def cmd_sync(args: argparse.Namespace, config: Config) -> int:
    if args.target == "status":
        if args.peer or args.type:
            raise UsageError("`dmm sync status` takes no --peer or --type")
        return _status(args, config)
    if args.name is not None:
        raise UsageError(f"unexpected argument {args.name!r} (did you mean `dmm sync status`?)")
    if args.target is None and (args.peer or args.type):
        raise UsageError("--peer and --type need a model name")
    if args.target is not None:
        parse_model_name(args.target)  # InvalidName: exit 2 before asking the node
    query = _query(model=args.target, peer=args.peer, sync_type=args.type)
    result = api_call(config, "POST", f"/api/sync{query}", timeout=SYNC_TIMEOUT)
    results = [result] if args.target else result["results"]
    if args.json:
        emit_json(result)
        return EXIT_OK
    for item in results:
        if "error" in item:
            print(f"{item['model']}: {item['error']}")
            continue
        states = ", ".join(f"{p['peer'][-8:]} {p['state']}" for p in item.get("peers", []))
        version = (item.get("version") or "-")[:12]
        what = "updated" if item["changed"] else "unchanged"
        extra = f", {human_size(item['bytes_fetched'])} fetched" if item["bytes_fetched"] else ""
        merged = f", merge {item['merge'][:12]} signed" if item.get("merge") else ""
        print(
            f"{item['model']}: {what} at {version}{extra}{merged}"
            + (f" ({states})" if states else "")
        )
    if not results:
        print("no followed model to sync (set [sync] follow or a policy)")
    return EXIT_OK


def _status(args: argparse.Namespace, config: Config) -> int:
    if args.name:
        parse_model_name(args.name)
        data = api_call(config, "GET", f"/api/sync/status{_query(model=args.name)}", timeout=60)
        if args.json:
            emit_json(data)
            return EXIT_OK
        followed = "followed" if data["followed"] else "not followed"
        print(f"{data['model']}: {followed}, strategy {data['policy']['conflict_strategy']}")
        print(f"  local    {data['local'] or '(not held)'}")
        print(f"  heads    {', '.join(h[:12] for h in data['heads']) or '(none known)'}")
        if data["conflict"]:
            print("  conflict yes: see `dmm conflicts`")
        _peer_table(data["peers"])
        return EXIT_OK
    data = api_call(config, "GET", "/api/sync/status")
    if args.json:
        emit_json(data)
        return EXIT_OK
    for policy in data["policies"]:
        print(
            f"policy {policy['glob']}: every {policy['interval']:g}s, {policy['sync_type']}, "
            f"{policy['conflict_strategy']}"
        )
    _peer_table([p for m in data["models"] for p in m["peers"]])
    print(f"{data['syncs']} sync(s) since the node started")
    return EXIT_OK


def _peer_table(states: list[dict[str, Any]]) -> None:
    if not states:
        print("no peer compared yet")
        return
    print_table(
        [(s["model"], s["peer"], s["state"], s.get("reason", "")) for s in states],
        ("MODEL", "PEER", "STATE", "REASON"),
    )


def cmd_conflicts(args: argparse.Namespace, config: Config) -> int:
    conflicts = api_call(config, "GET", "/api/sync/conflicts")["conflicts"]
    if args.json:
        emit_json({"conflicts": conflicts})
        return EXIT_OK
    for conflict in conflicts:
        print(f"{conflict['model']}  (strategy {conflict['strategy']})")
        rows = []
        for head in conflict["heads"]:
            mark = "*" if head["version"] == conflict["suggested"] else ""
            held = "held" if head["manifest"] == conflict["local"] else ""
            rows.append(
                (
                    f"{head['version'][:12]}{mark}",
                    head["original"][:12],
                    head["author"][-12:],
                    head["manifest"][7:19],
                    human_size(head["size"]),
                    held,
                )
            )
        print_table(rows, ("  VERSION", "ORIGINAL", "AUTHOR", "MANIFEST", "SIZE", "HERE"))
    if conflicts:
        print("* = the pick of the newest rule; settle with `dmm resolve NAME:TAG --pick VERSION`")
    else:
        print("no conflicts")
    return EXIT_OK


def cmd_resolve(args: argparse.Namespace, config: Config) -> int:
    parse_model_name(args.name)
    query = _query(model=args.name, pick=args.pick)
    result = api_call(config, "POST", f"/api/sync/resolve{query}", timeout=SYNC_TIMEOUT)
    if args.json:
        emit_json(result)
        return EXIT_OK
    print(
        f"{result['model']} settled on {result['picked'][:12]} ({result['manifest'][7:19]}); "
        f"merge {result['merge'][:12]} signed and announced"
    )
    return EXIT_OK


def add_sync_commands(add: Add) -> None:
    """Register the commands; ``add`` is ``node.cli.build_parser``'s helper."""
    p = add(
        "sync",
        cmd_sync,
        "sync a model with its peers now (`dmm sync status [NAME]`: how models stand)",
    )
    p.usage = "dmm sync [NAME[:TAG]] [--peer ID] [--type full|delta] | dmm sync status [NAME]"
    p.add_argument(
        "target",
        nargs="?",
        metavar="NAME[:TAG]",
        help="the model to sync (default: every followed model); `status` shows sync states",
    )
    p.add_argument("name", nargs="?", metavar="NAME", help=argparse.SUPPRESS)
    p.add_argument("--peer", metavar="ID", help="sync with this peer only (default: every holder)")
    p.add_argument(
        "--type",
        choices=SYNC_TYPES,
        help="delta reuses local chunks, full fetches each missing blob whole "
        "(default: the model's policy)",
    )

    add(
        "conflicts",
        cmd_conflicts,
        "list versions of one name:tag that do not descend from each other",
    )

    p = add("resolve", cmd_resolve, "settle a conflict on one version, recorded as a merge version")
    p.add_argument("name", metavar="NAME:TAG")
    p.add_argument(
        "--pick",
        required=True,
        metavar="VERSION",
        help="a version id (or its first hex digits) from `dmm conflicts`",
    )
