"""Helpers for the security tests: node configs with extra [network]/[api] keys and rules."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from node.config import Config, load_config
from node.p2p import P2PHost
from node.provider import BLOCKS_PROTOCOL
from protocols.blocks import NEED_DATA, BlockExchange, EndOfStream, Message, Role


def write_config(
    root: Path,
    name: str,
    *,
    bootstrap: Sequence[str] = (),
    network: str = "",
    api: str = 'listen = "127.0.0.1:0"\n',
    extra: str = "",
) -> Path:
    """A loopback node.toml in ``root/name``; ``network``/``api`` are added to those tables,
    ``extra`` (whole tables, e.g. ``[limits]`` or ``[[access]]``) goes at the end."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    boot = ", ".join(f'"{addr}"' for addr in bootstrap)
    path = folder / "node.toml"
    path.write_text(
        f'[node]\nname = "{name}"\ndata_dir = "data"\n'
        f'[storage]\nmodels_dir = "models"\n'
        f'[network]\nlisten = ["/ip4/127.0.0.1/tcp/0"]\nbootstrap = [{boot}]\nmdns = false\n'
        f"{network}"
        f"[api]\n{api}"
        f"{extra}"
    )
    return path


def config(root: Path, name: str, **kwargs: Any) -> Config:
    return load_config(write_config(root, name, **kwargs))


def audit_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of an audit file, parsed (each must be one JSON object)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


async def blocks_exchange(host: P2PHost, peer: str, requests: Sequence[Message]) -> list[Any]:
    """Send ``requests`` on one raw ``/dmm/blocks/1`` stream, all before reading a reply (as
    many as given: a misbehaving client); every event until the stream ends."""
    stream = await host.open_stream(peer, BLOCKS_PROTOCOL)
    conn = BlockExchange(Role.CLIENT, max_in_flight=max(len(requests), 1))
    for request in requests:
        await stream.send_all(conn.send(request))
    conn.send(EndOfStream())
    await stream.send_eof()
    events: list[Any] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            data = await stream.receive_some(conn.max_read)
            conn.receive_eof() if not data else conn.receive_data(data)
        elif isinstance(event, EndOfStream):
            break
        else:
            events.append(event)
    await stream.aclose()
    return events
