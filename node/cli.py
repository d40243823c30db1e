"""``dmm``: the command line. Exit 0 ok, 1 failure, 2 bad usage or config."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import trio

from node.config import Config, ConfigError, load_config, parse_duration, resolve_config_path
from node.local import open_store
from node.progress import progress_reporter, pull_progress
from node.replication_cli import add_replication_commands
from node.versions import VersionBook
from storage.cas import BlobMismatchError, StoreBusyError
from storage.db import DatabaseError
from storage.fsutil import StoreFullError
from storage.gguf import GGUFError, details, model_info
from storage.manifest import LAYER_PREFIX, ManifestError
from storage.names import InvalidName, parse_model_name
from storage.store import ModelNotFound, ModelStore, StoreError

if TYPE_CHECKING:
    from node.identity import Identity

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad arguments: exit code 2."""


class CommandError(Exception):
    """The command failed for a reason its message states: exit code 1."""


def _identity(config: Config) -> Identity:
    # Imported here: libp2p takes over a second to import, and most commands never need it.
    from node.identity import IdentityError, load_or_create_identity

    try:
        return load_or_create_identity(config.node.data_dir)
    except IdentityError as exc:
        raise CommandError(str(exc)) from None


# --- formatting ---------------------------------------------------------------------------


def human_size(n: float) -> str:
    """Decimal units, as `ollama list` prints them."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_age(seconds: float) -> str:
    """Relative time in the words `ollama list` uses."""
    seconds = max(seconds, 0)
    if seconds < 45:
        return "Less than a minute ago"
    if seconds < 90:
        return "About a minute ago"
    for size, unit in (
        (86400 * 365, "year"),
        (86400 * 30, "month"),
        (86400 * 7, "week"),
        (86400, "day"),
        (3600, "hour"),
        (60, "minute"),
    ):
        if seconds >= size:
            value = int(seconds // size)
            return f"{value} {unit}{'s' if value != 1 else ''} ago"
    return "Less than a minute ago"


def print_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("    ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def emit_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def fail(message: str, code: int = EXIT_FAIL) -> NoReturn:
    print(f"dmm: {message}", file=sys.stderr)
    raise SystemExit(code)


# --- commands -----------------------------------------------------------------------------


def cmd_id(args: argparse.Namespace, config: Config) -> int:
    ident = _identity(config)
    if args.json:
        emit_json({"peer_id": ident.peer_id_str, "name": config.node.name})
    else:
        print(ident.peer_id_str)
    return EXIT_OK


def _read_text_file(path: str | None, what: str) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--{what} {path}: {exc}") from None


def _read_params(path: str | None) -> dict[str, Any] | None:
    text = _read_text_file(path, "params")
    if text is None:
        return None
    try:
        params = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"--params {path}: not valid JSON ({exc})") from None
    if not isinstance(params, dict):
        raise UsageError(f'--params {path}: must hold a JSON object such as {{"temperature": 0.7}}')
    return params


def cmd_add(args: argparse.Namespace, config: Config) -> int:
    template = _read_text_file(args.template, "template")
    system = _read_text_file(args.system, "system")
    license_text = _read_text_file(args.license, "license")
    params = _read_params(args.params)
    ident = _identity(config)
    started = time.monotonic()
    with open_store(config) as store, progress_reporter(not args.json) as reporter:
        result = store.add_model(
            args.name,
            Path(args.file),
            template=template,
            system=system,
            params=params,
            license_text=license_text,
            reporter=reporter,
        )
        record = VersionBook(store.db, ident).record_local(result.name, result.digest, result.size)
    elapsed = time.monotonic() - started
    if args.json:
        emit_json(
            {
                "name": result.name.display,
                "digest": result.digest,
                "size": result.size,
                "model_blob": result.model_blob,
                "copied_bytes": result.copied_bytes,
                "version": record.version_id.hex(),
                "changed": result.changed,
                "seconds": round(elapsed, 3),
            }
        )
        tell_node(config, quiet=True)
        return EXIT_OK
    how = "copied into the store" if result.copied_bytes else "already in the store, nothing copied"
    state = "added" if result.changed else "unchanged"
    print(
        f"{state} {result.name.display} ({human_size(result.size)}, {result.digest[7:19]}): "
        f"model blob {how}, {elapsed:.1f}s"
    )
    tell_node(config, quiet=False)
    return EXIT_OK


def cmd_import(args: argparse.Namespace, config: Config) -> int:
    source = Path(args.source).expanduser().absolute() if args.source else None
    if source is not None and not (source / "manifests").is_dir():
        raise UsageError(f"--from {source}: not an Ollama models directory (no manifests/ in it)")
    ident = _identity(config)
    with open_store(config) as store, progress_reporter(not args.json) as reporter:
        report = store.import_models(source, reporter)
        book = VersionBook(store.db, ident)
        for entry in store.list_models():
            book.record_local(entry.name, entry.digest, entry.size)
    if args.json:
        emit_json(
            {
                "new": report.models_new,
                "updated": report.models_updated,
                "unchanged": report.models_unchanged,
                "blobs_linked": report.blobs_linked,
                "blobs_copied": report.blobs_copied,
                "blobs_indexed": report.blobs_indexed,
                "bytes_indexed": report.bytes_indexed,
                "errors": report.errors,
            }
        )
    else:
        for name in report.models_new:
            print(f"imported {name}")
        for name in report.models_updated:
            print(f"updated  {name}")
        print(
            f"{len(report.models_new)} new, {len(report.models_updated)} updated, "
            f"{len(report.models_unchanged)} unchanged; {report.blobs_indexed} blobs indexed "
            f"({human_size(report.bytes_indexed)}; {report.blobs_linked} hard-linked, "
            f"{report.blobs_copied} copied)"
        )
        for error in report.errors:
            print(f"error: {error}", file=sys.stderr)
    tell_node(config, quiet=args.json)
    return EXIT_FAIL if report.errors else EXIT_OK


def cmd_ls(args: argparse.Namespace, config: Config) -> int:
    with open_store(config) as store:
        models = store.list_models()
        broken = store.broken_manifests()
    now = time.time()
    if args.json:
        emit_json(
            {
                "models": [
                    {
                        "name": m.name.display,
                        "model": m.name.full,
                        "digest": m.digest,
                        "size": m.size,
                        "modified_at": m.modified,
                    }
                    for m in models
                ]
            }
        )
    else:
        print_table(
            [
                (m.name.display, m.digest[7:19], human_size(m.size), human_age(now - m.modified))
                for m in models
            ],
            ("NAME", "ID", "SIZE", "MODIFIED"),
        )
    for item in broken:
        print(f"warning: {item.path}: {item.reason}", file=sys.stderr)
    return EXIT_OK


def _show_data(store: ModelStore, name: str) -> dict[str, Any]:
    stored = store.get(name)
    info = store.model_info(stored.name)
    manifest = stored.manifest
    chunks = 0
    for layer in manifest.all_layers():
        chunks += len(store.db.blob_chunks(layer.digest))
    data: dict[str, Any] = {
        "name": stored.name.display,
        "model": stored.name.full,
        "digest": stored.digest,
        "size": manifest.total_size,
        "modified_at": stored.mtime,
        "details": details(info) if info else {},
        "model_info": model_info(info) if info else {},
        "template": store.text_layer(manifest, "template"),
        "system": store.text_layer(manifest, "system"),
        "parameters": store.text_layer(manifest, "params"),
        "license": store.text_layer(manifest, "license"),
        "layers": [
            {"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}
            for layer in manifest.all_layers()
        ],
        "chunks": chunks,
        "versions": [
            {
                "id": v.id,
                "manifest": v.manifest_digest,
                "parents": list(v.parents),
                "author": v.author,
                "hlc": v.hlc,
                "created_at": v.created_at,
            }
            for v in store.db.versions(stored.name.full)
        ],
    }
    return data


def cmd_show(args: argparse.Namespace, config: Config) -> int:
    with open_store(config) as store:
        data = _show_data(store, args.name)
    if args.json:
        emit_json(data)
        return EXIT_OK
    d, mi = data["details"], data["model_info"]
    arch = mi.get("general.architecture", d.get("family", ""))
    print(f"  Model  {data['name']}  ({data['digest'][7:19]}, {human_size(data['size'])})")
    rows = [
        ("architecture", arch),
        ("parameters", d.get("parameter_size", "")),
        ("context length", mi.get(f"{arch}.context_length", "")),
        ("embedding length", mi.get(f"{arch}.embedding_length", "")),
        ("quantization", d.get("quantization_level", "")),
    ]
    for key, value in rows:
        if value not in ("", None):
            print(f"    {key:<20}{value}")
    if data["parameters"]:
        print("\n  Parameters")
        try:
            for key, value in json.loads(data["parameters"]).items():
                print(f"    {key:<20}{value}")
        except (ValueError, AttributeError):
            print(f"    {data['parameters']}")
    for title in ("template", "system", "license"):
        text = data[title]
        if text:
            first = text.strip().splitlines()[0] if text.strip() else ""
            more = " ..." if len(text.strip().splitlines()) > 1 else ""
            print(f"\n  {title.capitalize()}\n    {first[:96]}{more}")
    print("\n  Layers")
    for layer in data["layers"]:
        media_type = layer["mediaType"]
        kind = media_type.rsplit(".", 1)[-1] if media_type.startswith(LAYER_PREFIX) else "config"
        print(f"    {kind:<12}{layer['digest'][7:19]}  {human_size(layer['size'])}")
    print(f"\n  {data['chunks']} chunks, {len(data['versions'])} version(s) known")
    return EXIT_OK


def cmd_rm(args: argparse.Namespace, config: Config) -> int:
    names = [parse_model_name(name) for name in args.names]  # all valid before any is deleted
    removed = []
    # A running node deletes through its hooks (pre-delete may refuse) and withdraws at once.
    through_node = True
    for name in names:
        if through_node:
            try:
                api_call(config, "DELETE", "/api/delete", body={"model": name.full})
            except NodeUnreachable:
                through_node = False
        if not through_node:
            with open_store(config) as store:
                store.remove(name.full)
        removed.append(name.display)
        if not args.json:
            print(f"deleted '{name.display}' (its blobs stay until `dmm gc`)")
    if args.json:
        emit_json({"deleted": removed})
    if not through_node:
        tell_node(config, quiet=args.json)
    return EXIT_OK


def cmd_verify(args: argparse.Namespace, config: Config) -> int:
    with open_store(config) as store, progress_reporter(not args.json) as reporter:
        report = store.verify(args.name, reporter)
    if args.json:
        emit_json(
            {
                "ok": report.ok,
                "checked": report.checked,
                "bytes_checked": report.bytes_checked,
                "bad": [
                    {
                        "digest": b.result.digest,
                        "status": b.result.status,
                        "detail": b.result.detail,
                        "models": list(b.models),
                    }
                    for b in report.bad
                ],
                "broken_manifests": [
                    {"path": str(m.path), "reason": m.reason} for m in report.broken_manifests
                ],
            }
        )
    else:
        for bad in report.bad:
            breaks = ", ".join(bad.models) if bad.models else "no model"
            print(
                f"{bad.result.status}: {bad.result.digest} ({bad.result.detail}); breaks {breaks}"
            )
        for m in report.broken_manifests:
            print(f"broken manifest: {m.path}: {m.reason}")
        verdict = "all good" if report.ok else f"{len(report.bad)} bad blob(s)"
        print(f"verified {report.checked} blobs ({human_size(report.bytes_checked)}): {verdict}")
        if not report.ok:
            print(
                "to repair: `dmm rm` the broken models and add or pull them again", file=sys.stderr
            )
    return EXIT_OK if report.ok else EXIT_FAIL


def cmd_gc(args: argparse.Namespace, config: Config) -> int:
    try:
        age = parse_duration(args.older_than) if args.older_than else config.storage.cleanup_age
    except ValueError as exc:
        raise UsageError(f"--older-than: {exc}") from None
    with open_store(config) as store:
        report = store.gc(age, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    if args.json:
        emit_json(
            {
                "dry_run": args.dry_run,
                "removed": [{"digest": d, "size": s} for d, s in report.removed],
                "freed": report.freed,
                "temp_files": [str(p) for p in report.temp_files],
                "kept_young": report.kept_young,
            }
        )
        return EXIT_OK
    for digest, size in report.removed:
        print(f"{verb} {digest} ({human_size(size)})")
    for path in report.temp_files:
        print(f"{verb} leftover {path.name}")
    print(
        f"{verb} {len(report.removed)} blobs, {human_size(report.freed)}; "
        f"{report.kept_young} unreferenced blob(s) younger than the age limit kept"
    )
    return EXIT_OK


# --- talking to the running node ---------------------------------------------------------


class NodeUnreachable(CommandError):
    pass


def api_headers(config: Config) -> dict[str, str]:
    """The bearer token of ``[api] token`` / ``token_file``, when one is set."""
    return {"authorization": f"Bearer {config.api.token}"} if config.api.token else {}


def api_call(
    config: Config,
    method: str,
    path: str,
    timeout: float = 30.0,
    body: dict[str, Any] | None = None,
) -> Any:
    """JSON from the node's HTTP API at ``[api] listen`` (None for an empty answer)."""
    url = f"http://{config.api.listen}{path}"
    data = json.dumps(body).encode() if body is not None else b"" if method == "POST" else None
    request = urllib.request.Request(
        url,
        method=method,
        data=data,
        headers={"content-type": "application/json", **api_headers(config)},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
            return json.loads(raw) if raw.strip() else None
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        raise CommandError(f"the node answered {exc.code}: {message}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        raise NodeUnreachable(
            f"no node answers at http://{config.api.listen} ({getattr(exc, 'reason', exc)}); "
            "start one with `dmm node start`"
        ) from None


def tell_node(config: Config, quiet: bool) -> None:
    """A local change: have a running node on this store announce it now (if one runs)."""
    try:
        result = api_call(config, "POST", "/api/dmm/refresh", timeout=10.0)
    except NodeUnreachable:
        return
    except CommandError as exc:
        print(f"warning: the running node was not told: {exc}", file=sys.stderr)
        return
    if not quiet and (result.get("published") or result.get("removed")):
        print(
            f"the running node announced {result['published']} model(s) and withdrew "
            f"{result['removed']}"
        )


def cmd_node_start(args: argparse.Namespace, config: Config) -> int:
    from node.daemon import run_until_signalled

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.verbose:
        # Only dmm's own debug events: other libraries' debug output (multiaddr logs every
        # address it parses) would bury them. py-libp2p's, a line per frame, take -vv.
        logging.getLogger("dmm").setLevel(logging.DEBUG)
        logging.getLogger("dmm.p2p").setLevel(logging.DEBUG if args.verbose > 1 else logging.INFO)
    trio.run(run_until_signalled, config)
    return EXIT_OK


def cmd_node_status(args: argparse.Namespace, config: Config) -> int:
    status = api_call(config, "GET", "/api/status")
    if args.json:
        emit_json(status)
        return EXIT_OK
    print(f"node      {status['peer_id']} ({status['name']})")
    print(f"p2p       {' '.join(status['listen'])}")
    print(f"api       {' '.join(status['api'])}")
    print(f"peers     {status['peers']} connected, {status['dht_routing_table']} in the DHT table")
    providing = status.get("dht_provides_in_flight", 0)
    spreading = f" ({providing} provide walks under way)" if providing else ""
    print(f"models    {status['models']} in the store, {status['published']} provided{spreading}")
    print(f"uptime    {status['uptime']:.0f}s")
    hooks = status.get("hooks", {})
    own = {
        event: [h for h in names if h not in ("log", "count")]
        for event, names in hooks.get("hooks", {}).items()
    }
    listed = "; ".join(f"{event}: {', '.join(names)}" for event, names in own.items() if names)
    fired = ", ".join(f"{event} {n}" for event, n in sorted(hooks.get("counts", {}).items()))
    print(f"hooks     {listed or 'none configured'}")
    if fired:
        print(f"fired     {fired}")
    return EXIT_OK


def _status_snapshot(config: Config) -> dict[str, Any]:
    snapshot: dict[str, Any] = {
        "status": api_call(config, "GET", "/api/status", timeout=10.0),
        "peers": api_call(config, "GET", "/api/peers", timeout=10.0)["peers"],
    }
    try:
        replicas = api_call(config, "GET", "/api/replicas", timeout=10.0)
        snapshot["replicas"] = replicas.get("models", [])
    except NodeUnreachable:
        raise
    except CommandError:
        snapshot["replicas"] = None  # this node runs no replication manager
    return snapshot


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    from rich.console import Console
    from rich.live import Live

    from node.status_view import render

    if args.interval <= 0:
        raise UsageError("--interval must be positive")
    snapshot = _status_snapshot(config)
    if args.json:
        emit_json(snapshot)
        return EXIT_OK
    console = Console()
    if args.once or not console.is_terminal:
        console.print(render(snapshot))
        return EXIT_OK
    try:
        with Live(render(snapshot), console=console, screen=False, auto_refresh=False) as live:
            while True:
                time.sleep(args.interval)
                try:
                    snapshot = _status_snapshot(config)
                    snapshot.pop("error", None)
                except CommandError as exc:
                    snapshot["error"] = f"{exc} (retrying every {args.interval:g}s)"
                live.update(render(snapshot), refresh=True)
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_peers(args: argparse.Namespace, config: Config) -> int:
    answer = api_call(config, "GET", "/api/peers")
    peers = answer["peers"]
    refused = answer.get("refused", [])
    if args.json:
        emit_json({"peers": peers, "refused": refused, "limits": answer.get("limits", {})})
        return EXIT_OK
    for peer in peers:
        print(peer["peer_id"])
    print(f"{len(peers)} peer(s) connected")
    if refused:
        print()
        print_table(
            [
                (
                    r["peer_id"],
                    str(r["count"]),
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["last"])),
                    r["reason"],
                )
                for r in refused
            ],
            ("REFUSED PEER", "ATTEMPTS", "LAST", "REASON"),
        )
    return EXIT_OK


def cmd_find(args: argparse.Namespace, config: Config) -> int:
    query = urllib.parse.urlencode({"glob": args.glob, "timeout": args.timeout})
    result = api_call(config, "GET", f"/api/find?{query}", timeout=args.timeout + 30)
    if args.json:
        emit_json(result)
        return EXIT_OK
    print_table(
        [
            (
                m["name"],
                m["version"][:12],
                human_size(m["size"]),
                str(len(m["peers"])),
                m["availability"],
            )
            for m in result["models"]
        ],
        ("NAME", "VERSION", "SIZE", "PEERS", "AVAILABLE"),
    )
    print(
        f"{len(result['models'])} match(es) for {args.glob!r} from "
        f"{result['providers_asked']} node(s) in {result['seconds']:.2f}s"
    )
    silent = result.get("providers_silent", [])
    if silent:
        print(
            f"{len(silent)} node(s) did not answer within {args.timeout:g}s, so matches may be"
            " missing (try a longer --timeout): " + ", ".join(silent)
        )
    return EXIT_OK


def _api_stream(config: Config, path: str, body: dict[str, Any], what: str) -> Any:
    """Open a streaming POST to the node's API; the response yields NDJSON lines."""
    url = f"http://{config.api.listen}{path}"
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"content-type": "application/json", **api_headers(config)},
    )
    try:
        return urllib.request.urlopen(request, timeout=600)
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            reason = exc.reason
        raise CommandError(f"the node refused the {what}: {reason}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        raise NodeUnreachable(
            f"no node answers at http://{config.api.listen} ({getattr(exc, 'reason', exc)}); "
            "start one with `dmm node start`"
        ) from None


def cmd_pull(args: argparse.Namespace, config: Config) -> int:
    """Stream /api/pull from the node and draw it: one bar per blob, with peers and rate."""
    response = _api_stream(config, "/api/pull", {"model": args.name, "stream": True}, "pull")
    last: dict[str, Any] = {}
    with response, pull_progress(enabled=not args.json) as show:
        for line in response:
            if not line.strip():
                continue
            event = json.loads(line)
            if "error" in event:
                raise CommandError(f"pull of {args.name} failed: {event['error']}")
            show(event)
            last = event
    if last.get("status") != "success":
        raise CommandError(f"pull of {args.name} ended early; run it again to resume")
    if args.json:
        emit_json(last)
    elif last.get("already_complete"):
        print(f"{args.name} is already complete here; nothing to fetch")
    elif "registry" in last:  # no peer had it: node/upstream.py pulled it
        print(
            f"pulled {args.name}: {human_size(last.get('bytes_fetched', 0))} fetched from "
            f"{last['registry']} (no peer had it)"
        )
    else:
        peers = last.get("peers", [])
        print(
            f"pulled {args.name}: {human_size(last.get('bytes_fetched', 0))} fetched from "
            f"{len(peers)} peer(s), {human_size(last.get('bytes_local', 0))} copied from "
            "local blobs"
        )
    return EXIT_OK


def cmd_push(args: argparse.Namespace, config: Config) -> int:
    """Stream /api/push: the running node publishes a local model to the swarm."""
    parse_model_name(args.name)  # a bad name is bad usage (exit 2), not a node failure
    response = _api_stream(config, "/api/push", {"model": args.name, "stream": True}, "push")
    last: dict[str, Any] = {}
    seen: set[str] = set()
    with response:
        for line in response:
            if not line.strip():
                continue
            event = json.loads(line)
            if "error" in event:
                raise CommandError(f"push of {args.name} failed: {event['error']}")
            status = str(event.get("status", ""))
            if not args.json and status not in seen:
                seen.add(status)
                print(status, file=sys.stderr)
            last = event
    if last.get("status") != "success":
        raise CommandError(f"push of {args.name} ended early; run it again")
    if args.json:
        emit_json({"model": args.name, "status": "success", "version": last.get("version")})
    else:
        print(f"pushed {args.name}: version {str(last.get('version'))[:12]} announced to the swarm")
    return EXIT_OK


# --- parser -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        help="node configuration (default: $DMM_CONFIG, ./node.toml, ~/.config/dmm/node.toml)",
    )
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--json", action="store_true", help="print machine-readable JSON")

    parser = argparse.ArgumentParser(
        prog="dmm",
        description="Peer-to-peer model manager for Ollama: the node's store is an Ollama "
        "models directory; models move between nodes in verified chunks.",
        parents=[common],
        epilog="Exit status: 0 ok, 1 failure, 2 bad usage or configuration.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(
        name: str, func: Callable[[argparse.Namespace, Config], int], help_: str, json_: bool = True
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name, help=help_, description=help_, parents=[common, data] if json_ else [common]
        )
        p.set_defaults(func=func)
        return p

    add("id", cmd_id, "print this node's peer id (created on first use, stable after)")

    node_parser = sub.add_parser(
        "node",
        help="run the node, or ask the running one how it is",
        description="run the node, or ask the running one how it is",
    )
    node_sub = node_parser.add_subparsers(dest="node_command", metavar="ACTION", required=True)
    p = node_sub.add_parser(
        "start",
        parents=[common],
        help="run the node in the foreground until SIGINT/SIGTERM",
        description="run the node in the foreground until SIGINT/SIGTERM: "
        "listen on [network] listen, join the DHT through [network] "
        "bootstrap, provide every model in the store, serve the HTTP API on "
        "[api] listen",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log dmm's debug events too; -vv adds py-libp2p's (very many)",
    )
    p.set_defaults(func=cmd_node_start)
    p = node_sub.add_parser("status", parents=[common, data], help="the running node's state")
    p.set_defaults(func=cmd_node_status)

    p = add(
        "status",
        cmd_status,
        "a live view of the running node: peers, transfers, replicas, recent events "
        "(Ctrl-C to leave)",
    )
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="how often the live view refreshes (default 1)",
    )

    add(
        "peers",
        cmd_peers,
        "peers the running node is connected to, and peers whose connections it refused",
    )

    p = add("pull", cmd_pull, "pull a model from the peers that hold it (resumes if interrupted)")
    p.add_argument("name", metavar="NAME[:TAG]")

    p = add(
        "push",
        cmd_push,
        "publish a local model to the swarm now (signed version record, DHT, gossip); "
        "[hooks] pre-push may refuse it",
    )
    p.add_argument("name", metavar="NAME[:TAG]", help="a model in this node's store")

    p = add("find", cmd_find, "find models anywhere on the network by glob, e.g. 'llama*'")
    p.add_argument("glob", metavar="GLOB", help="fnmatch glob over name:tag (quote it)")
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for holders to answer (default 10)",
    )

    p = add("add", cmd_add, "add a GGUF file to the store as an Ollama model")
    p.add_argument("name", metavar="NAME[:TAG]", help="model name, e.g. mymodel:q4 or ns/model")
    p.add_argument("file", metavar="FILE", help="the GGUF weights file")
    p.add_argument("--template", metavar="FILE", help="prompt template layer (Go template text)")
    p.add_argument("--system", metavar="FILE", help="system prompt layer")
    p.add_argument("--params", metavar="FILE", help="parameters layer: a JSON object of options")
    p.add_argument("--license", metavar="FILE", help="license layer")

    p = add("import", cmd_import, "index an existing Ollama store (this node's, or --from DIR)")
    p.add_argument(
        "--from",
        dest="source",
        metavar="DIR",
        help="another Ollama models directory: blobs are hard-linked when on the "
        "same filesystem, copied otherwise",
    )

    add("ls", cmd_ls, "list the models in the store")

    p = add("show", cmd_show, "show a model's details, layers and versions")
    p.add_argument("name", metavar="NAME[:TAG]")

    p = add("rm", cmd_rm, "delete models (their blobs are kept until gc)")
    p.add_argument("names", metavar="NAME[:TAG]", nargs="+")

    p = add("verify", cmd_verify, "re-hash blobs; name each corrupt one and the models it breaks")
    p.add_argument("name", metavar="NAME[:TAG]", nargs="?", help="only this model's blobs")

    p = add("gc", cmd_gc, "delete blobs no model references, older than [storage] cleanup_age")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed")
    p.add_argument(
        "--older-than",
        metavar="DURATION",
        help="override cleanup_age, e.g. 0s to remove every unreferenced blob",
    )

    add_replication_commands(sub, add, common, data)

    from node.sync_cli import add_sync_commands  # imported here: it imports this module

    add_sync_commands(add)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(resolve_config_path(args.config))
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    try:
        return int(args.func(args, config))
    except (UsageError, InvalidName) as exc:
        fail(str(exc), EXIT_USAGE)
    except (ModelNotFound, CommandError) as exc:
        fail(str(exc))
    except (
        StoreError,
        BlobMismatchError,
        ManifestError,
        GGUFError,
        StoreBusyError,
        DatabaseError,
        StoreFullError,
    ) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))
    except KeyboardInterrupt:
        fail("interrupted; nothing was left half-written", 130)


if __name__ == "__main__":
    # `python -m node.cli`: modules that import node.cli (node/sync_cli.py) must get this
    # module, not a second copy whose exception classes main() would not catch.
    sys.modules.setdefault("node.cli", sys.modules[__name__])
    sys.exit(main())
