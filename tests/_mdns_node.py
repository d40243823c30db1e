"""One dmm host with LAN discovery, driven by tests/test_mdns.py (run inside a netns).

    python tests/_mdns_node.py [--listen MULTIADDR] [--service-name NAME] [--retry SECONDS]

Prints one JSON object per line on stdout:
    {"event": "ready", "peer_id": ..., "listen": [...]}   once discovery runs
    {"event": "connected", "peer": ..., "addrs": [...]}   each on_peer call
    {"event": "log", "level": ..., "message": ...}        each dmm.mdns record, DEBUG up
    {"event": "stopped", "seconds": ..., "connected": [...]}
"stopped" follows end of stdin: `seconds` is how long discovery took to stop once
cancelled, `connected` the peers the host was connected to just before.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from node.mdns import DMM_SERVICE_NAME, RETRY_SECONDS, MdnsDiscovery
from node.p2p import open_host


def emit(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


class _EmitLog(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        emit("log", level=record.levelname, message=record.getMessage())


async def _stdin_closed() -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stdin:
        while await stdin.receive_some():
            pass


async def main(listen: str, service_name: str, retry: float) -> None:
    async with open_host(create_new_key_pair(), [listen]) as host:

        async def on_peer(peer_id: str, addrs: list[str]) -> None:
            emit("connected", peer=peer_id, addrs=addrs)

        mdns = MdnsDiscovery(host, on_peer, service_name=service_name, retry_interval=retry)
        async with trio.open_nursery() as nursery:
            await nursery.start(mdns.run)
            emit("ready", peer_id=host.peer_id, listen=host.listen_addrs)
            await _stdin_closed()
            connected = host.connected_peers()
            started = trio.current_time()
            nursery.cancel_scope.cancel()
        emit("stopped", seconds=trio.current_time() - started, connected=connected)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", default="/ip4/0.0.0.0/tcp/0")
    parser.add_argument("--service-name", default=DMM_SERVICE_NAME)
    parser.add_argument("--retry", type=float, default=RETRY_SECONDS)
    args = parser.parse_args()
    mdns_log = logging.getLogger("dmm.mdns")
    mdns_log.setLevel(logging.DEBUG)
    mdns_log.addHandler(_EmitLog())
    mdns_log.propagate = False
    trio.run(main, args.listen, args.service_name, args.retry)
