"""Tests for node/mdns.py: the address and TXT rules, then two real nodes on a LAN.

The LAN is two network namespaces joined by a veth pair with 10.99.0.0/24 addresses,
created and deleted by the test: multicast never leaves them. Each node is
``tests/_mdns_node.py`` run inside one namespace; it reports on stdout as JSON lines.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, cast

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from node.mdns import MdnsDiscovery, advertised_addrs, decode_txt, encode_txt
from node.p2p import P2PHost

ROOT = Path(__file__).resolve().parent.parent
NODE_SCRIPT = Path(__file__).resolve().parent / "_mdns_node.py"
ADDR_A = "10.99.0.1"
ADDR_B = "10.99.0.2"
DISCOVERY_SECONDS = 10.0

Event = dict[str, Any]


def new_peer_id() -> str:
    return str(ID.from_pubkey(create_new_key_pair().public_key))


# --- addresses and records -----------------------------------------------------------------


def test_wildcard_listener_is_advertised_as_each_lan_address() -> None:
    peer = new_peer_id()
    ips = ["127.0.0.1", "10.99.0.1", "192.168.1.5", "::1", "fe80::1", "fd00::2"]
    assert advertised_addrs(["/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/4002"], ips, peer) == [
        f"/ip4/10.99.0.1/tcp/4001/p2p/{peer}",
        f"/ip4/192.168.1.5/tcp/4001/p2p/{peer}",
        f"/ip6/fd00::2/tcp/4002/p2p/{peer}",
    ]


def test_loopback_and_non_tcp_listeners_are_not_advertised() -> None:
    peer = new_peer_id()
    listen = [
        f"/ip4/127.0.0.1/tcp/4001/p2p/{peer}",
        "/ip4/10.99.0.1/udp/4001",
        f"/ip4/10.99.0.1/tcp/4003/p2p/{peer}",
        "/ip4/10.99.0.1/tcp/4003",
    ]
    assert advertised_addrs(listen, ["10.99.0.1"], peer) == [f"/ip4/10.99.0.1/tcp/4003/p2p/{peer}"]


def test_txt_record_round_trips_every_address() -> None:
    peer = new_peer_id()
    addrs = [f"/ip4/10.99.0.1/tcp/4001/p2p/{peer}", f"/ip6/fd00::2/tcp/4001/p2p/{peer}"]
    data = encode_txt(addrs)
    assert data.count(b"dnsaddr=") == 2  # one string each, as the spec says: no dnsaddr2=
    assert decode_txt(data) == (peer, addrs)


def test_txt_record_keeps_only_dialable_addresses_of_one_peer() -> None:
    peer, other = new_peer_id(), new_peer_id()
    strings = [
        b"id=whatever",
        b"dnsaddr=not a multiaddr",
        f"dnsaddr=/ip4/0.0.0.0/tcp/4001/p2p/{peer}".encode(),  # py-libp2p's own advert
        f"dnsaddr=/ip4/127.0.0.1/tcp/4001/p2p/{peer}".encode(),
        f"dnsaddr=/ip4/10.99.0.9/udp/4001/quic-v1/p2p/{peer}".encode(),
        b"dnsaddr=/ip4/10.99.0.9/tcp/4001",
        f"DNSADDR=/ip4/10.99.0.9/tcp/4001/ipfs/{peer}".encode(),
        f"dnsaddr=/ip4/10.99.0.10/tcp/4001/p2p/{other}".encode(),
    ]
    data = b"".join(bytes([len(s)]) + s for s in strings)
    assert decode_txt(data) == (peer, [f"/ip4/10.99.0.9/tcp/4001/p2p/{peer}"])


@pytest.mark.parametrize(
    "data",
    [b"", b"\x05dnsa", b"\x0bdnsaddr=/x", b"\x1ednsaddr=/ip4/10.0.0.1/tcp/1/p2p/"],
)
def test_txt_record_without_a_usable_address_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode_txt(data)


@pytest.mark.parametrize("name", ["_dmm._udp.local", "dmm._udp.local.", "_dmm.local.", ""])
def test_service_name_must_be_a_dns_sd_name(name: str) -> None:
    with pytest.raises(ValueError):
        MdnsDiscovery(cast(P2PHost, object()), service_name=name)  # host unused here


# --- two nodes on a LAN of network namespaces ----------------------------------------------


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@pytest.fixture
def lan() -> Iterator[tuple[str, str]]:
    """Two network namespaces on one veth link, multicast on; deleted afterwards."""
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` to create network namespaces")
    namespaces = [f"dmm-mdns-{os.getpid()}-a", f"dmm-mdns-{os.getpid()}-b"]
    created: list[str] = []
    try:
        for ns in namespaces:
            done = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True)
            if done.returncode != 0:
                pytest.skip(
                    f"cannot create a network namespace (needs CAP_NET_ADMIN): "
                    f"{done.stderr.strip()}"
                )
            created.append(ns)
        ns_a, ns_b = namespaces
        ip("link", "add", "name", "dmm0", "netns", ns_a, "type", "veth",
           "peer", "name", "dmm1", "netns", ns_b)  # fmt: skip
        for ns, dev, addr in ((ns_a, "dmm0", ADDR_A), (ns_b, "dmm1", ADDR_B)):
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up", "multicast", "on")
            ip("-n", ns, "link", "set", "lo", "up")
        yield ns_a, ns_b
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


class Node:
    """A `_mdns_node.py` process in a namespace, read one JSON event at a time."""

    def __init__(self, name: str, process: trio.Process, stderr: IO[bytes]) -> None:
        self.name = name
        self.process = process
        self.stderr = stderr
        self.events: list[Event] = []
        self._taken: set[int] = set()
        self._buffer = b""

    def describe(self) -> str:
        self.stderr.seek(0)
        lines = [json.dumps(event) for event in self.events]
        return (
            f"node {self.name} events:\n"
            + "\n".join(lines)
            + "\nstderr:\n"
            + (self.stderr.read().decode(errors="replace")[-3000:])
        )

    async def _next(self) -> Event:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some()
            if not chunk:
                raise AssertionError(f"node {self.name} exited\n{self.describe()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        event: Event = json.loads(line)
        self.events.append(event)
        return event

    async def expect(self, what: str, match: Callable[[Event], bool], deadline: float) -> Event:
        """The first event so far or by `deadline` that matches and no earlier call took."""
        with trio.move_on_at(deadline):
            index = 0
            while True:
                if index == len(self.events):
                    await self._next()
                if index not in self._taken and match(self.events[index]):
                    self._taken.add(index)
                    return self.events[index]
                index += 1
        raise AssertionError(f"node {self.name}: no {what} in time\n{self.describe()}")

    async def stop(self) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.aclose()


async def start_node(name: str, ns: str, listen: str, stderr: IO[bytes], *options: str) -> Node:
    process = await trio.lowlevel.open_process(
        [
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            str(NODE_SCRIPT),
            "--listen",
            listen,
            *options,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        cwd=ROOT,
    )
    return Node(name, process, stderr)


def connected_to(peer: str) -> Callable[[Event], bool]:
    return lambda event: event["event"] == "connected" and event["peer"] == peer


async def test_two_nodes_find_and_connect_to_each_other_on_a_lan(
    lan: tuple[str, str], tmp_path: Path
) -> None:
    ns_a, ns_b = lan
    nodes: list[Node] = []
    try:
        with open(tmp_path / "a.err", "w+b") as err_a, open(tmp_path / "b.err", "w+b") as err_b:
            # A listens on the wildcard (advertised as 10.99.0.1), B on its one address.
            nodes.append(a := await start_node("a", ns_a, "/ip4/0.0.0.0/tcp/0", err_a))
            nodes.append(b := await start_node("b", ns_b, f"/ip4/{ADDR_B}/tcp/0", err_b))
            started = trio.current_time()
            ready = started + DISCOVERY_SECONDS
            ready_a = await a.expect("ready", lambda e: e["event"] == "ready", ready)
            ready_b = await b.expect("ready", lambda e: e["event"] == "ready", ready)
            peer_a, peer_b = ready_a["peer_id"], ready_b["peer_id"]
            [listen_a], [listen_b] = ready_a["listen"], ready_b["listen"]

            # No bootstrap anywhere: each learns the other from mDNS alone.
            deadline = started + DISCOVERY_SECONDS
            found_b = await a.expect(f"connection to {peer_b}", connected_to(peer_b), deadline)
            found_a = await b.expect(f"connection to {peer_a}", connected_to(peer_a), deadline)
            assert trio.current_time() - started < DISCOVERY_SECONDS
            assert found_b["addrs"] == [listen_b]
            assert found_a["addrs"] == [listen_a.replace("/0.0.0.0/", f"/{ADDR_A}/")]

            # Each sees its own records too (multicast loops back): let a few more rounds
            # of answers pass, then check neither ever connected to itself.
            await trio.sleep(1.0)
            await a.stop()
            stopped = await a.expect("stop", lambda e: e["event"] == "stopped", deadline + 5)
            assert stopped["seconds"] < 1.0, a.describe()
            assert stopped["connected"] == [peer_b], a.describe()
            # A's goodbye (its unregistration) reaches B.
            await b.expect(
                f"{peer_a} leaving",
                lambda e: e["event"] == "log" and f"peer {peer_a} left" in e["message"],
                trio.current_time() + 3,
            )
            await b.stop()
            await b.expect("stop", lambda e: e["event"] == "stopped", trio.current_time() + 5)
            for node, me, other in ((a, peer_a, peer_b), (b, peer_b, peer_a)):
                peers = {e["peer"] for e in node.events if e["event"] == "connected"}
                assert peers == {other}, node.describe()
                assert not [e for e in node.events if e.get("level") in ("WARNING", "ERROR")], (
                    node.describe()
                )
                assert me != other
            assert await a.process.wait() == 0, a.describe()
            assert await b.process.wait() == 0, b.describe()
    finally:
        with trio.CancelScope(shield=True):
            for node in nodes:
                if node.process.returncode is None:
                    node.process.kill()
                    await node.process.wait()


def log_line(level: str, text: str) -> Callable[[Event], bool]:
    return lambda e: e["event"] == "log" and e["level"] == level and text in e["message"]


async def test_an_unreachable_peer_is_logged_once_and_retried_until_it_connects(
    lan: tuple[str, str], tmp_path: Path
) -> None:
    ns_a, ns_b = lan
    # Unicast between the two is unreachable; multicast (mDNS) still flows.
    ip("-n", ns_a, "route", "add", "unreachable", f"{ADDR_B}/32")
    ip("-n", ns_b, "route", "add", "unreachable", f"{ADDR_A}/32")
    retry = ("--retry", "0.5")
    nodes: list[Node] = []
    try:
        with open(tmp_path / "a.err", "w+b") as err_a, open(tmp_path / "b.err", "w+b") as err_b:
            nodes.append(a := await start_node("a", ns_a, f"/ip4/{ADDR_A}/tcp/0", err_a, *retry))
            nodes.append(b := await start_node("b", ns_b, f"/ip4/{ADDR_B}/tcp/0", err_b, *retry))
            deadline = trio.current_time() + DISCOVERY_SECONDS
            peer_a = (await a.expect("ready", lambda e: e["event"] == "ready", deadline))["peer_id"]
            peer_b = (await b.expect("ready", lambda e: e["event"] == "ready", deadline))["peer_id"]
            failed = f"cannot connect to peer {peer_b}"
            await a.expect("a warning", log_line("WARNING", failed), deadline)
            for _ in range(2):  # two more attempts, quietly
                await a.expect("a retry", log_line("DEBUG", failed), trio.current_time() + 3)

            ip("-n", ns_a, "route", "del", "unreachable", f"{ADDR_B}/32")
            ip("-n", ns_b, "route", "del", "unreachable", f"{ADDR_A}/32")
            deadline = trio.current_time() + 5
            await a.expect(f"connection to {peer_b}", connected_to(peer_b), deadline)
            await b.expect(f"connection to {peer_a}", connected_to(peer_a), deadline)
            for node in (a, b):
                await node.stop()
                await node.expect("stop", lambda e: e["event"] == "stopped", deadline + 5)
            warnings = [e for e in a.events if e.get("level") == "WARNING"]
            assert len(warnings) == 1, a.describe()
    finally:
        with trio.CancelScope(shield=True):
            for node in nodes:
                if node.process.returncode is None:
                    node.process.kill()
                    await node.process.wait()
