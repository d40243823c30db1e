"""LAN discovery over multicast DNS: advertise our addresses, find peers, connect to them.

The records follow the libp2p mDNS spec (``discovery/mdns.md`` r2): a node registers
``<peer-name>.<service-name>`` with PTR, SRV and A records and one TXT record holding a
``dnsaddr=/ip4/<ip>/tcp/<port>/p2p/<peer-id>`` string per address. The peer-name is random
for each run (the spec asks for any unique name under 64 characters); the peer id travels
in the TXT record only.

The default service name is ``_dmm._udp.local.``, not the spec's ``_p2p._udp.local.``:
every libp2p node on a LAN (IPFS and others) answers ``_p2p``, and dialing each of them
buys connections that speak none of dmm's protocols, while they in turn would dial every
dmm node. A separate name is the spec's own device for separate networks (``_p2p-X``).
Pass ``service_name=LIBP2P_SERVICE_NAME`` to be found by other libp2p implementations.

Why not py-libp2p 0.8.1's ``libp2p.discovery.mdns.MDNSDiscovery`` — measured with our
host, two nodes in two network namespaces:

1. It advertises listeners as bound, ``/ip4/0.0.0.0/tcp/N``, which no peer can dial, and
   takes its A record from the route to 8.8.8.8 (127.0.0.1 where there is no default
   route).
2. ``start()`` registers synchronously and blocks the trio loop for 1.7 s; ``stop()``
   blocks it for 0.25 s.
3. Found peers go to a module-global callback list shared by every host in the process,
   called from zeroconf's browser thread; nothing connects to them.
4. A second address goes under TXT key ``dnsaddr2`` (and so on), where the spec and the
   go, js and rust implementations repeat ``dnsaddr=``: they see one address of ours.

So this module drives zeroconf itself. Every zeroconf operation runs as a coroutine on
zeroconf's own asyncio loop thread while trio waits on an event; browser events come back
to trio through its token. Nothing blocks the trio loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from functools import partial
from typing import Any, TypeVar

import ifaddr
import multiaddr.exceptions
import trio
from libp2p.peer.id import ID
from multiaddr import Multiaddr
from zeroconf import (
    InterfaceChoice,
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

from node.p2p import DialError, P2PHost

__all__ = [
    "CONNECT_TIMEOUT",
    "DMM_SERVICE_NAME",
    "LIBP2P_SERVICE_NAME",
    "MAX_SERVICES",
    "RETRY_SECONDS",
    "MdnsDiscovery",
    "OnPeer",
    "advertised_addrs",
    "decode_txt",
    "encode_txt",
    "interface_ips",
]

log = logging.getLogger("dmm.mdns")

DMM_SERVICE_NAME = "_dmm._udp.local."
LIBP2P_SERVICE_NAME = "_p2p._udp.local."

# A peer we could not connect to (or whose record we could not read) is tried again this
# often while it stays on the LAN; our own addresses are re-read as often.
RETRY_SECONDS = 10.0
# Each address of a found peer gets this long to connect.
CONNECT_TIMEOUT = 5.0
# How long to wait for a peer's SRV/TXT/A answer (usually already in zeroconf's cache).
_RESOLVE_MS = 3000
# Cancelling `MdnsDiscovery.run` sends our goodbye (3 packets 125 ms apart) and stops
# zeroconf's threads within this long; past it the closing thread is abandoned.
_STOP_SECONDS = 0.9
# Service names tracked at once: a LAN flooding us with names cannot grow our state.
MAX_SERVICES = 256
# Addresses taken from one peer's TXT record.
_MAX_PEER_ADDRS = 16

# RFC 6763 section 7: "_<1-15 letters, digits, hyphens>._udp|_tcp", here in .local.
_SERVICE_NAME = re.compile(r"_[a-z0-9](?:[a-z0-9-]{0,13}[a-z0-9])?\._(?:udp|tcp)\.local\.")
_TXT_KEY = b"dnsaddr="
_TXT_STRING_BYTES = 255
_PEER_NAME_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
_PEER_NAME_CHARS = 32

OnPeer = Callable[[str, list[str]], Awaitable[None]]
_T = TypeVar("_T")


# --- addresses and TXT records (no I/O) ---------------------------------------------------


def interface_ips() -> list[str]:
    """Every IP address on this machine's interfaces (IPv6 ones without their zone)."""
    ips: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            ips.append(ip.ip if isinstance(ip.ip, str) else ip.ip[0])
    return ips


def _lan_dialable(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether another machine on the LAN could dial `ip`.

    Loopback is this machine only (the spec: not sent, ignored on receipt); an IPv6
    link-local address needs a zone that a multiaddr does not carry.
    """
    if ip.is_loopback or ip.is_unspecified or ip.is_multicast:
        return False
    return not (ip.version == 6 and ip.is_link_local)


def _tcp_endpoint(addr: Multiaddr) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """The IP and port of an ``/ip4|ip6/<ip>/tcp/<port>[/p2p/<id>]`` multiaddr.

    Raises ``ValueError`` for any other shape (DNS names, QUIC, relays...): our host
    dials TCP only.
    """
    names = [protocol.name for protocol in addr.protocols()]
    if names not in (["ip4", "tcp"], ["ip6", "tcp"], ["ip4", "tcp", "p2p"], ["ip6", "tcp", "p2p"]):
        raise ValueError(f"not an IP/TCP address: {addr}")
    ip = ipaddress.ip_address(addr.value_for_protocol(names[0]))
    return ip, int(addr.value_for_protocol("tcp"))


def advertised_addrs(listen_addrs: Iterable[str], ips: Iterable[str], peer_id: str) -> list[str]:
    """The ``/ip4|ip6/<ip>/tcp/<port>/p2p/<peer_id>`` addresses to advertise for a host
    listening on `listen_addrs`, on a machine whose interfaces have `ips`.

    An unspecified listener (``0.0.0.0``, ``::``) stands for each interface address of its
    family. Loopback and IPv6 link-local addresses are left out, as are non-TCP listeners.
    Order follows `listen_addrs`, without duplicates.
    """
    interface = [ipaddress.ip_address(ip) for ip in ips]
    result: list[str] = []
    for text in listen_addrs:
        try:
            ip, port = _tcp_endpoint(Multiaddr(text))
        except (ValueError, multiaddr.exceptions.Error):
            continue
        candidates = (
            [i for i in interface if i.version == ip.version] if ip.is_unspecified else [ip]
        )
        for candidate in candidates:
            if not _lan_dialable(candidate):
                continue
            addr = f"/ip{candidate.version}/{candidate}/tcp/{port}/p2p/{peer_id}"
            if addr not in result:
                result.append(addr)
    return result


def encode_txt(addrs: Iterable[str]) -> bytes:
    """A TXT record's data: one length-prefixed ``dnsaddr=<addr>`` string per address.

    Raises ``ValueError`` for an address too long for one TXT string (255 bytes).
    """
    data = bytearray()
    for addr in addrs:
        entry = _TXT_KEY + addr.encode()
        if len(entry) > _TXT_STRING_BYTES:
            raise ValueError(f"address too long for a TXT string: {addr}")
        data.append(len(entry))
        data += entry
    return bytes(data)


def _txt_strings(data: bytes) -> list[bytes]:
    strings: list[bytes] = []
    offset = 0
    while offset < len(data):
        end = offset + 1 + data[offset]
        if end > len(data):
            raise ValueError("truncated TXT record")
        strings.append(data[offset + 1 : end])
        offset = end
    return strings


def decode_txt(data: bytes) -> tuple[str, list[str]]:
    """The peer id and the addresses we can dial in a peer's TXT record data.

    Takes the ``dnsaddr=`` strings (key case-insensitive) that hold an IP/TCP multiaddr
    ending in ``/p2p/<id>`` (``/ipfs/<id>`` accepted) and reachable from the LAN, all
    naming the peer the first one names, at most 16. Raises ``ValueError`` if none do.
    """
    peer_id: str | None = None
    addrs: list[str] = []
    for entry in _txt_strings(data):
        if not entry.lower().startswith(_TXT_KEY) or len(addrs) >= _MAX_PEER_ADDRS:
            continue
        try:
            addr = Multiaddr(entry[len(_TXT_KEY) :].decode("ascii").replace("/ipfs/", "/p2p/"))
            ip, _ = _tcp_endpoint(addr)
            if addr.protocols()[-1].name != "p2p" or not _lan_dialable(ip):
                continue
            peer = addr.value_for_protocol("p2p")
            ID.from_base58(peer)
        except (ValueError, multiaddr.exceptions.Error):
            continue
        if peer_id is None:
            peer_id = peer
        if peer == peer_id and str(addr) not in addrs:
            addrs.append(str(addr))
    if peer_id is None:
        raise ValueError("no dialable dnsaddr=/.../p2p/<id> in TXT record")
    return peer_id, addrs


# --- zeroconf from trio -------------------------------------------------------------------


async def _in_zeroconf_loop(zc: Zeroconf, make: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run the coroutine `make()` on zeroconf's loop thread; trio waits without blocking.

    Cancelling the caller cancels the coroutine.
    """
    assert zc.loop is not None
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: object) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(done.set)

    future = asyncio.run_coroutine_threadsafe(make(), zc.loop)
    future.add_done_callback(wake)
    try:
        await done.wait()
    finally:
        future.cancel()  # no effect once it is done
    return future.result()


def _open_zeroconf() -> Zeroconf:
    # Its own loop thread even if some asyncio loop runs here; every IPv4 interface.
    return Zeroconf(InterfaceChoice.All, ip_version=IPVersion.V4Only, use_asyncio=False)


def _close_zeroconf(zc: Zeroconf, browser: ServiceBrowser | None) -> None:
    if browser is not None:
        browser.cancel()
    zc.close()  # sends the goodbye for our registration, then stops zeroconf's threads


# --- the service --------------------------------------------------------------------------


class MdnsDiscovery:
    """Advertise `host` on the LAN and connect to the dmm nodes found there.

    For each peer found, `run` connects to it (unless already connected) and then awaits
    ``on_peer(peer_id, addrs)``, `addrs` being the peer's advertised ``.../p2p/<id>``
    multiaddrs. That happens again when the peer advertises new addresses, or when it
    leaves the LAN and comes back. A peer that cannot be connected to, or whose `on_peer`
    raised, is logged once and tried again every `retry_interval` seconds while it stays.
    This node's own records are never acted on.
    """

    def __init__(
        self,
        host: P2PHost,
        on_peer: OnPeer | None = None,
        *,
        service_name: str = DMM_SERVICE_NAME,
        retry_interval: float = RETRY_SECONDS,
    ) -> None:
        if not _SERVICE_NAME.fullmatch(service_name):
            raise ValueError(f"not a DNS-SD service name like '_dmm._udp.local.': {service_name!r}")
        if retry_interval <= 0:
            raise ValueError("retry_interval must be positive")
        self.service_name = service_name
        self.retry_interval = retry_interval
        self._host = host
        self._on_peer = on_peer
        self._peer_name = "".join(
            secrets.choice(_PEER_NAME_ALPHABET) for _ in range(_PEER_NAME_CHARS)
        )
        self._instance_name = f"{self._peer_name}.{service_name}"
        self._advertised: list[str] = []
        self._reset()

    @property
    def instance_name(self) -> str:
        """Our ``<peer-name>.<service-name>`` on the LAN."""
        return self._instance_name

    @property
    def advertised(self) -> list[str]:
        """The addresses currently in our TXT record (empty when not registered)."""
        return list(self._advertised)

    def _reset(self) -> None:
        self._zc: Zeroconf | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._registered: ServiceInfo | None = None
        self._advertised = []
        self._wakeup = trio.Event()
        self._changes: dict[str, bool] = {}  # name -> removed, from the browser thread
        self._seen: set[str] = set()  # names on the LAN now, ours excluded
        self._peers: dict[str, str] = {}  # name -> peer id, once its record was read
        self._done: dict[str, tuple[str, tuple[str, ...]]] = {}  # name -> handled record
        self._own: set[str] = set()  # names carrying our peer id (an earlier run of ours)
        self._stale: set[str] = set()  # names to (re)process
        self._busy: set[str] = set()  # names a task is processing
        self._warned: set[str] = set()  # names whose failure was logged at WARNING

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Advertise and browse until cancelled, then unregister and stop within 1 s.

        Started once browsing has begun; registering our name (about 1.5 s of probing the
        LAN, as mDNS requires) goes on in the background. Raises ``OSError`` if zeroconf
        cannot open its multicast sockets.
        """
        self._reset()
        self._token = trio.lowlevel.current_trio_token()
        zc = await trio.to_thread.run_sync(_open_zeroconf)
        self._zc = zc
        browser: ServiceBrowser | None = None
        try:
            browser = ServiceBrowser(zc, self.service_name, handlers=[self._on_state_change])
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._advertise, zc)
                nursery.start_soon(self._retry, nursery)
                task_status.started()
                await self._dispatch(nursery)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(_STOP_SECONDS) as scope:
                await trio.to_thread.run_sync(_close_zeroconf, zc, browser, abandon_on_cancel=True)
            if scope.cancelled_caught:
                log.warning("mdns: zeroconf did not stop within %s s", _STOP_SECONDS)
            if self._registered is not None:
                log.info("mdns: peer %s no longer advertised", self._host.peer_id)
            self._registered = None
            self._advertised = []
            self._zc = None

    # --- advertising

    def _service_info(self, addrs: list[str]) -> ServiceInfo:
        endpoints = [_tcp_endpoint(Multiaddr(addr)) for addr in addrs]
        ips = list(dict.fromkeys(str(ip) for ip, _ in endpoints))
        return ServiceInfo(
            self.service_name,
            self._instance_name,
            port=endpoints[0][1],
            properties=encode_txt(addrs),
            server=f"{self._peer_name}.local.",
            parsed_addresses=ips,
        )

    async def _advertise(self, zc: Zeroconf) -> None:
        """Keep our record in step with the addresses the host listens on."""
        warned_empty = False
        while True:
            addrs = advertised_addrs(self._host.listen_addrs, interface_ips(), self._host.peer_id)
            if addrs and addrs != self._advertised:
                info = self._service_info(addrs)
                if self._registered is None:
                    await _in_zeroconf_loop(zc, partial(_register, zc, info))
                    self._instance_name = info.name  # kept unless the name was taken
                    log.info(
                        "mdns: advertising peer %s at %s as %s",
                        self._host.peer_id,
                        ", ".join(addrs),
                        info.name,
                    )
                else:
                    await _in_zeroconf_loop(zc, partial(_update, zc, info))
                    log.info(
                        "mdns: peer %s now advertised at %s", self._host.peer_id, ", ".join(addrs)
                    )
                self._registered = info
                self._advertised = addrs
                warned_empty = False
            elif not addrs and self._registered is not None:
                await _in_zeroconf_loop(zc, partial(_unregister, zc, self._registered))
                self._registered = None
                self._advertised = []
                log.warning(
                    "mdns: peer %s has no LAN address left to advertise", self._host.peer_id
                )
            elif not addrs and not warned_empty:
                warned_empty = True
                log.warning(
                    "mdns: peer %s listens on no LAN address (%s); finding peers only",
                    self._host.peer_id,
                    ", ".join(self._host.listen_addrs),
                )
            await trio.sleep(self.retry_interval)

    # --- browsing

    def _on_state_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        """Called in zeroconf's browser thread: hand the change to trio, never block."""
        assert self._token is not None
        removed = state_change is ServiceStateChange.Removed
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._note_change, name, removed)

    def _note_change(self, name: str, removed: bool) -> None:
        if name.lower() == self._instance_name.lower():
            return
        if not removed and name not in self._seen and len(self._seen) >= MAX_SERVICES:
            log.debug("mdns: ignoring %s: already tracking %d services", name, MAX_SERVICES)
            return
        self._changes[name] = removed
        self._wakeup.set()

    async def _dispatch(self, nursery: trio.Nursery) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            changes, self._changes = self._changes, {}
            for name, removed in changes.items():
                if removed:
                    self._forget(name)
                else:
                    self._seen.add(name)
                    self._process(name, nursery)

    async def _retry(self, nursery: trio.Nursery) -> None:
        while True:
            await trio.sleep(self.retry_interval)
            for name in list(self._seen):
                if name not in self._done and name not in self._own:
                    self._process(name, nursery)

    def _process(self, name: str, nursery: trio.Nursery) -> None:
        self._stale.add(name)
        if name not in self._busy:
            self._busy.add(name)
            nursery.start_soon(self._handle, name)

    def _forget(self, name: str) -> None:
        self._seen.discard(name)
        self._stale.discard(name)
        self._own.discard(name)
        self._warned.discard(name)
        self._done.pop(name, None)
        peer = self._peers.pop(name, None)
        if peer is not None:
            log.info("mdns: peer %s left the LAN (%s)", peer, name)

    async def _handle(self, name: str) -> None:
        try:
            while name in self._stale and name in self._seen:
                self._stale.discard(name)
                await self._handle_once(name)
        finally:
            self._busy.discard(name)

    def _warn_once(self, name: str, message: str, *args: object) -> None:
        if name in self._warned:
            log.debug(message, *args)
        else:
            self._warned.add(name)
            log.warning(message + "; retrying every %g s", *args, self.retry_interval)

    async def _handle_once(self, name: str) -> None:
        zc = self._zc
        assert zc is not None
        info = ServiceInfo(self.service_name, name)
        if not await _in_zeroconf_loop(zc, partial(info.async_request, zc, _RESOLVE_MS)):
            log.debug("mdns: no record for %s yet", name)
            return
        try:
            peer, addrs = decode_txt(info.text or b"")
        except ValueError as exc:
            self._warn_once(name, "mdns: unusable record %s: %s", name, exc)
            return
        if peer == self._host.peer_id:
            self._own.add(name)
            log.debug("mdns: %s is this node (peer %s)", name, peer)
            return
        record = (peer, tuple(addrs))
        if self._done.get(name) == record or name not in self._seen:
            return
        if self._peers.get(name) != peer:
            log.info("mdns: found peer %s at %s", peer, ", ".join(addrs))
        self._peers[name] = peer
        error = await self._connect(peer, addrs)
        if error is not None:
            self._warn_once(name, "mdns: cannot connect to peer %s: %s", peer, error)
            return
        if self._on_peer is not None:
            try:
                await self._on_peer(peer, list(addrs))
            except Exception as exc:  # a failing callback must not end LAN discovery
                log.debug("mdns: on_peer failed for peer %s", peer, exc_info=True)
                self._warn_once(name, "mdns: on_peer failed for peer %s: %r", peer, exc)
                return
        self._warned.discard(name)
        if name in self._seen:
            self._done[name] = record

    async def _connect(self, peer: str, addrs: list[str]) -> str | None:
        """Connect to `peer` at the first of `addrs` that works; the errors if none does."""
        if peer in self._host.connected_peers():
            log.debug("mdns: peer %s already connected", peer)
            return None
        errors: list[str] = []
        for addr in addrs:
            with trio.move_on_after(CONNECT_TIMEOUT):
                try:
                    await self._host.connect(addr)
                except (DialError, ValueError) as exc:
                    errors.append(str(exc))
                    continue
                log.info("mdns: connected to peer %s at %s", peer, addr)
                return None
            errors.append(f"{addr}: no connection within {CONNECT_TIMEOUT:g} s")
        return "; ".join(errors)


async def _register(zc: Zeroconf, info: ServiceInfo) -> None:
    announced = await zc.async_register_service(info, allow_name_change=True)
    await announced


async def _update(zc: Zeroconf, info: ServiceInfo) -> None:
    announced = await zc.async_update_service(info)
    await announced


async def _unregister(zc: Zeroconf, info: ServiceInfo) -> None:
    goodbye = await zc.async_unregister_service(info)
    await goodbye
