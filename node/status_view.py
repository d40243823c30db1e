"""``dmm status``: the running node at a glance — peers, transfers, replicas, recent events.

The view is drawn from a snapshot the CLI gathers over the node's HTTP API; this module
only turns a snapshot into rich renderables, so it is the same live or ``--once``.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

MAX_PEERS_SHOWN = 12


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _ago(at: float, now: float) -> str:
    return f"{_duration(max(now - at, 0))} ago"


def header(status: dict[str, Any]) -> RenderableType:
    metrics = status.get("metrics") or {}
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("node", f"{status['peer_id']} ({status.get('name', '')})")
    grid.add_row("p2p", " ".join(status.get("listen", [])))
    grid.add_row("api", " ".join(status.get("api", [])))
    walks = status.get("dht_provides_in_flight", 0)
    spreading = f" ({walks} provide walks under way)" if walks else ""
    grid.add_row(
        "models",
        f"{status.get('models', 0)} in the store, {status.get('published', 0)} provided"
        f"{spreading}, "
        f"{_size(metrics.get('storage_bytes', 0))} of blobs, "
        f"dedup x{metrics.get('dedup_ratio', 1.0):.2f}",
    )
    grid.add_row(
        "traffic",
        f"in {_size(metrics.get('rate_in', 0))}/s  out {_size(metrics.get('rate_out', 0))}/s",
    )
    grid.add_row("uptime", _duration(status.get("uptime", 0)))
    return Panel(grid, title="dmm node", title_align="left")


def peers_panel(status: dict[str, Any], peers: list[dict[str, Any]]) -> RenderableType:
    table = Table(expand=True, show_edge=False, box=None)
    table.add_column("peer")
    table.add_column("state")
    for peer in peers[:MAX_PEERS_SHOWN]:
        table.add_row(peer["peer_id"], "connected" if peer.get("connected") else "known")
    more = len(peers) - MAX_PEERS_SHOWN
    title = (
        f"peers: {status.get('peers', len(peers))} connected, "
        f"{status.get('dht_routing_table', 0)} in the DHT table"
    )
    body: RenderableType = table if peers else Text("no peers connected", style="dim")
    if more > 0:
        body = Group(table, Text(f"... and {more} more", style="dim"))
    return Panel(body, title=title, title_align="left")


def transfers_panel(transfers: list[dict[str, Any]]) -> RenderableType:
    if not transfers:
        return Panel(Text("no transfers", style="dim"), title="transfers", title_align="left")
    table = Table(expand=True, show_edge=False, box=None)
    table.add_column("model")
    table.add_column("progress", ratio=1)
    table.add_column("done", justify="right")
    table.add_column("rate", justify="right")
    table.add_column("eta", justify="right")
    table.add_column("peers", justify="right")
    for t in transfers:
        total = max(int(t.get("total") or 0), 1)
        done = int(t.get("completed") or 0)
        table.add_row(
            t["model"],
            ProgressBar(total=total, completed=min(done, total)),
            f"{_size(done)}/{_size(t.get('total') or 0)}",
            f"{_size(t.get('rate') or 0)}/s",
            _duration(t.get("eta")),
            str(t.get("peers", 0)),
        )
    return Panel(table, title=f"transfers: {len(transfers)}", title_align="left")


def replicas_panel(replicas: list[dict[str, Any]] | None) -> RenderableType:
    if replicas is None:
        body: RenderableType = Text("replication is not running on this node", style="dim")
        return Panel(body, title="replicas", title_align="left")
    if not replicas:
        return Panel(
            Text("no replicated models", style="dim"), title="replicas", title_align="left"
        )
    table = Table(expand=True, show_edge=False, box=None)
    table.add_column("model")
    table.add_column("healthy / holders", justify="right")
    table.add_column("status")
    table.add_column("unhealthy holders")
    for entry in replicas:
        holders = entry.get("replicas") or []
        sick = [
            f"{h.get('peer_id', '?')[-8:]} {h.get('health')}"
            for h in holders
            if h.get("health") not in (None, "healthy")
        ]
        table.add_row(
            str(entry.get("model", "?")),
            f"{entry.get('healthy', 0)} / {len(holders)}",
            str(entry.get("status", "-")),
            ", ".join(sick) or "-",
        )
    return Panel(table, title="replicas", title_align="left")


def events_panel(events: list[dict[str, Any]], now: float) -> RenderableType:
    if not events:
        return Panel(Text("nothing yet", style="dim"), title="recent events", title_align="left")
    table = Table(expand=True, show_edge=False, box=None, show_header=False)
    table.add_column("when", style="dim", no_wrap=True)
    table.add_column("what", style="bold", no_wrap=True)
    table.add_column("detail")
    for e in events:
        subject = " ".join(x for x in (e.get("model", ""), e.get("peer", "")) if x)
        detail = f"{subject}: {e['text']}" if subject else e["text"]
        table.add_row(_ago(e["at"], now), e["kind"], detail)
    return Panel(table, title="recent events", title_align="left")


def render(snapshot: dict[str, Any], now: float | None = None) -> RenderableType:
    """The whole view for ``snapshot`` (``status``, ``peers``, ``replicas`` as gathered)."""
    now = time.time() if now is None else now
    status = snapshot["status"]
    parts: list[RenderableType] = [
        header(status),
        peers_panel(status, snapshot.get("peers", [])),
        transfers_panel(status.get("transfers", [])),
        replicas_panel(snapshot.get("replicas")),
        events_panel(status.get("events", []), now),
    ]
    error = snapshot.get("error")
    if error:
        parts.insert(0, Text(error, style="bold red"))
    return Group(*parts)
