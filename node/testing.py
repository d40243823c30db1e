"""Real nodes for tests and benchmarks: configs in a scratch folder, loopback, free ports.

Like ``trio.testing``, this is part of the product: the test suite and ``scripts/bench``
start swarms with it. Nothing here is faked; every node is a full ``open_node``.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from node.config import Config, load_config
from node.daemon import Node, open_node


def node_config(
    root: Path,
    name: str,
    bootstrap: Sequence[str] = (),
    extra: str = "",
    *,
    upstream_registry: str = "",
    fixed_ports: bool = False,
) -> Config:
    """A loopback-only config in ``root/name`` (mDNS off, ports chosen by the OS).

    With `fixed_ports` the ports are chosen now (free ones), so the node keeps its
    addresses when it restarts. No upstream registry unless one is given: tests never
    reach the internet.
    """
    p2p_port, api_port = (free_port(), free_port()) if fixed_ports else (0, 0)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    boot = ", ".join(f'"{addr}"' for addr in bootstrap)
    path = folder / "node.toml"
    path.write_text(
        f'[node]\nname = "{name}"\ndata_dir = "data"\n'
        f'[storage]\nmodels_dir = "models"\n'
        f'[network]\nlisten = ["/ip4/127.0.0.1/tcp/{p2p_port}"]\n'
        f"bootstrap = [{boot}]\nmdns = false\n"
        f'[api]\nlisten = "127.0.0.1:{api_port}"\nupstream_registry = "{upstream_registry}"\n'
        f"{extra}"
    )
    return load_config(path)


def free_port() -> int:
    """A loopback TCP port nothing listens on at this moment."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@asynccontextmanager
async def open_chain(root: Path, count: int) -> AsyncIterator[list[Node]]:
    """``count`` nodes in a line: each bootstraps only from the one before it."""
    async with AsyncExitStack() as stack:
        nodes: list[Node] = []
        for i in range(count):
            boot = [nodes[-1].host.listen_addrs[0]] if nodes else []
            config = node_config(root, f"n{i}", boot)
            nodes.append(await stack.enter_async_context(open_node(config)))
        yield nodes


@asynccontextmanager
async def open_swarm(root: Path, count: int, *, seeds: int = 1) -> AsyncIterator[list[Node]]:
    """``count`` nodes; the first ``seeds`` chain together, every other bootstraps from them."""
    async with AsyncExitStack() as stack:
        nodes: list[Node] = []
        for i in range(count):
            boot = [n.host.listen_addrs[0] for n in nodes[:seeds]]
            config = node_config(root, f"n{i}", boot)
            nodes.append(await stack.enter_async_context(open_node(config)))
        yield nodes
