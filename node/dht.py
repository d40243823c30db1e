"""The Kademlia DHT as dmm uses it: provider keys, signed version records, re-providing.

`Dht` runs py-libp2p's Kademlia in server mode on the node's host, through
`node.p2p.KadDht`, which handles the library's defects (protocol id, strictness, lookups
that stop at the local store, duplicates, rate limits; see ``node/p2p.py``).

Keys (DESIGN.md, "Discovery keys"):

- Provider keys are text: ``/dmm/model/<name>``, ``/dmm/index/<p>``, blob digests. Each
  travels as the sha2-256 multihash of its UTF-8 text (34 bytes), so a key of any length
  fits the 80-byte limit peers put on ``ADD_PROVIDER``, and no key is taken for a CID.
  Provider keys are not values: no validator ever sees them.
- Signed version records are values under ``version_key(model, tag)``
  (``/dmm/version/<host>/<namespace>/<model>:<tag>``, namespace ``dmm`` to the library).
  Every node validates what it stores with ``validate_record_key`` and keeps the newest
  (``select_newest_value``); any other ``/dmm/`` key, and any other namespace, is
  refused. Peers serve keys of at most 128 bytes (`KAD_MAX_VALUE_KEY_BYTES`): a version
  key longer than that raises ``ValueError`` here rather than being stored unreachable.

Provider records expire `PROVIDER_RECORD_TTL` (48 h, wall clock) after they were stored,
values `VALUE_RECORD_TTL` (24 h) after. `Dht` remembers the keys it provides and the
records it put, and re-provides every ``reprovide_interval`` (default: half the provider
TTL) and puts again every ``reput_interval`` (default: half the value TTL). Provides are
paced on trio's clock, below what receivers accept from one peer
(`KAD_ADD_PROVIDER_LIMIT` per window).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.records.validator import Validator
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from node.acl import Acl
from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.records import (
    VersionRecord,
    select_newest_value,
    validate_record_key,
    version_key,
)

from .p2p import (
    KAD_ADD_PROVIDER_LIMIT,
    KAD_ADD_PROVIDER_WINDOW,
    KAD_MAX_VALUE_KEY_BYTES,
    KAD_PROTOCOL_ID,
    KAD_PROVIDER_RECORD_TTL,
    KAD_VALUE_RECORD_TTL,
    KadDht,
    P2PHost,
)

__all__ = [
    "DEFAULT_PROVIDE_BURST",
    "DEFAULT_PROVIDE_RATE",
    "DEFAULT_REPROVIDE_INTERVAL",
    "DEFAULT_REPUT_INTERVAL",
    "NAMESPACE",
    "PROVIDER_RECORD_TTL",
    "VALUE_RECORD_TTL",
    "Dht",
    "DhtStats",
    "ProviderInfo",
    "provider_key_bytes",
]

log = logging.getLogger("dmm.dht")

# The library's namespace of every dmm key: "/dmm/version/..." splits as ("dmm", ...).
NAMESPACE = "dmm"
PROVIDER_RECORD_TTL = KAD_PROVIDER_RECORD_TTL
DEFAULT_REPROVIDE_INTERVAL = PROVIDER_RECORD_TTL / 2
VALUE_RECORD_TTL = KAD_VALUE_RECORD_TTL
DEFAULT_REPUT_INTERVAL = VALUE_RECORD_TTL / 2
# Each provide sends one ADD_PROVIDER to each of the closest peers; over any window a
# peer sees at most burst + rate * window of them, well under what it accepts.
DEFAULT_PROVIDE_RATE = 10.0
DEFAULT_PROVIDE_BURST = 20
# Provides walking at once. A new model provides ~8 keys together: 8 walks at once took
# each 25x as long as one alone on a busy node (24 at once: 30 s each), and walks slow
# enough that every request outlived its timeout stored their record nowhere.
PROVIDE_WALKS = 2
# How long a found provider's addresses stay in the peerstore, for dialing it.
PROVIDER_ADDR_TTL = 3600

_SHA2_256_MULTIHASH = b"\x12\x20"


def provider_key_bytes(key: str) -> bytes:
    """The bytes provider key `key` travels as: the sha2-256 multihash of its UTF-8 text."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"a provider key is a non-empty string, not {key!r}")
    return _SHA2_256_MULTIHASH + hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True, slots=True)
class ProviderInfo:
    """A peer providing a key; `addrs` are full multiaddrs ending in ``/p2p/<peer_id>``."""

    peer_id: str
    addrs: tuple[str, ...]


@dataclass(slots=True)
class DhtStats:
    provides: int = 0  # `provide` calls that reached the network step
    reprovides: int = 0  # keys provided again by the re-provide loop
    reprovide_rounds: int = 0
    reputs: int = 0  # version records put again by the re-put loop


class _VersionRecordValidator(Validator):
    """The library's validator for the ``dmm`` namespace: version records only, and with
    an ACL only those whose author holds the publisher role for the model."""

    def __init__(
        self,
        acl: Acl | None = None,
        on_rejected: Callable[[str, VersionRecord | None, str], None] | None = None,
    ) -> None:
        self._acl = acl
        self._on_rejected = on_rejected

    def validate(self, key: str, value: bytes) -> None:
        try:
            record = validate_record_key(key, value)
        except RemoteProtocolError as exc:
            self._rejected(key, None, str(exc))
            raise ValueError(str(exc)) from None
        if self._acl is not None:
            refusal = self._acl.publish_refusal(record)
            if refusal is not None:
                self._rejected(key, record, refusal)
                raise ValueError(refusal)

    def _rejected(self, key: str, record: VersionRecord | None, reason: str) -> None:
        if self._on_rejected is not None:
            self._on_rejected(key, record, reason)

    def select(self, key: str, values: list[bytes]) -> int:
        return select_newest_value(key, values)


class _Pacer:
    """Spaces events ``1/rate`` s apart on trio's clock, letting `burst` through at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self._interval = 1.0 / rate
        self._span = (burst - 1) * self._interval
        self._next = -math.inf

    async def wait(self) -> None:
        now = trio.current_time()
        slot = max(self._next, now - self._span)
        self._next = slot + self._interval
        if slot > now:
            await trio.sleep_until(slot)
        else:
            await trio.lowlevel.checkpoint()


class Dht:
    """The node's DHT service: start ``run`` with ``nursery.start``.

    The DHT protocol is served from construction on; ``run`` adds expiry of stored
    records and our re-providing and re-putting (the node's bootstrapper refreshes the
    routing table). All methods may be called once ``run`` has started.
    """

    def __init__(
        self,
        host: P2PHost,
        *,
        reprovide_interval: float = DEFAULT_REPROVIDE_INTERVAL,
        reput_interval: float = DEFAULT_REPUT_INTERVAL,
        provide_rate: float = DEFAULT_PROVIDE_RATE,
        provide_burst: int = DEFAULT_PROVIDE_BURST,
        acl: Acl | None = None,
        on_rejected: Callable[[str, VersionRecord | None, str], None] | None = None,
    ) -> None:
        """``on_rejected(key, record or None, reason)`` hears of every value refused by the
        validator (invalid, or its author may not publish it under ``acl``)."""
        if not 0 < reprovide_interval < PROVIDER_RECORD_TTL:
            raise ValueError("reprovide_interval must be between 0 and the provider TTL")
        if not 0 < reput_interval < VALUE_RECORD_TTL:
            raise ValueError("reput_interval must be between 0 and the value TTL")
        if provide_rate <= 0 or provide_burst < 1:
            raise ValueError("provide_rate must be > 0 and provide_burst >= 1")
        if provide_burst + provide_rate * KAD_ADD_PROVIDER_WINDOW > KAD_ADD_PROVIDER_LIMIT:
            raise ValueError(
                f"peers accept {KAD_ADD_PROVIDER_LIMIT} provides per "
                f"{KAD_ADD_PROVIDER_WINDOW:g} s from one peer: lower the rate or burst"
            )
        self._host = host
        self._kad = KadDht(host, {NAMESPACE: _VersionRecordValidator(acl, on_rejected)})
        self._reprovide_interval = reprovide_interval
        self._reput_interval = reput_interval
        self._pacer = _Pacer(provide_rate, provide_burst)
        self._provide_walks = trio.Semaphore(PROVIDE_WALKS)
        # Key text -> key bytes, for every key we provide until `unprovide`.
        self._provided: dict[str, bytes] = {}
        # Version key -> the record we last put under it, until a newer one shows up.
        self._put: dict[str, VersionRecord] = {}
        self._reprovide_requested = trio.Event()
        self._provides_in_flight = 0
        self.stats = DhtStats()
        # Called with (operation, seconds) after each lookup: the metrics listen.
        self.query_listeners: list[Callable[[str, float], None]] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self._kad), trio.open_nursery() as nursery:
            nursery.start_soon(self._reprovide_loop)
            nursery.start_soon(self._kad.close_idle_streams_forever)
            nursery.start_soon(self._reput_loop)
            log.info("DHT serving %s on %s", KAD_PROTOCOL_ID, self._host.peer_id)
            task_status.started()

    # --------------------------------------------------------------- routing table

    async def add_peer(self, peer_id: str) -> bool:
        """Add a connected (or otherwise addressable) DHT peer to the routing table.

        False when its addresses are unknown or it does not serve our DHT. Adding the
        first peer starts a re-provide round, so keys provided while alone spread.
        """
        was_empty = self._kad.get_routing_table_size() == 0
        added = await self._kad.add_peer(ID.from_base58(peer_id))
        log.debug("routing table %s %s", "added" if added else "did not add", peer_id)
        if added and was_empty and self._provided:
            self.reprovide_nowait()
        return added

    async def refresh(self) -> None:
        """Look up our own key, and random keys where the table is thin, filling it."""
        await self._kad.refresh_routing_table()

    def _timed(self, op: str, started: float) -> None:
        elapsed = trio.current_time() - started
        for listener in self.query_listeners:
            listener(op, elapsed)

    def routing_table_size(self) -> int:
        return self._kad.get_routing_table_size()

    def routing_table_peers(self) -> list[str]:
        return [str(peer) for peer in self._kad.routing_table.get_peer_ids()]

    # ------------------------------------------------------------------ providers

    async def provide(self, key: str) -> bool:
        """Announce that we hold `key`, now and at every re-provide until `unprovide`.

        True if at least one peer was told; with no peer reachable the key is still
        kept and goes out with the next re-provide round.
        """
        key_bytes = provider_key_bytes(key)
        self._provided[key] = key_bytes
        sent = await self._provide_once(key, key_bytes)
        self.stats.provides += 1
        if sent:
            log.debug("provided %s", key)
        else:
            log.debug("provided %s locally; no peer reachable yet", key)
        return sent

    def unprovide(self, key: str) -> None:
        """Stop providing `key`: no more re-provides, and our own record is withdrawn.

        Peers keep the records they hold until those expire.
        """
        key_bytes = self._provided.pop(key, None)
        if key_bytes is not None:
            self._kad.stop_providing(key_bytes)
            log.debug("stopped providing %s", key)

    def provided_keys(self) -> list[str]:
        return list(self._provided)

    def reprovide_nowait(self) -> None:
        """Re-provide every key now rather than at the next interval."""
        self._reprovide_requested.set()

    async def find_providers(
        self,
        key: str,
        count: int = 20,
        *,
        timeout: float = math.inf,
        on_found: Callable[[ProviderInfo], None] | None = None,
    ) -> list[ProviderInfo]:
        """Up to `count` other peers providing `key`, each once (we never list ourselves).

        With a `timeout`, the lookup returns what it found by then (what this node's own
        provider store knows at least) rather than nothing. Their addresses are added to
        the peerstore, so ``P2PHost.open_stream`` can dial them. `on_found` gets each
        provider the moment the walk finds it, addresses already added.
        """
        if count < 1:
            raise ValueError("count must be at least 1")
        started = trio.current_time()
        providers: list[ProviderInfo] = []

        def found(info: PeerInfo) -> None:
            provider = self._remember(info)
            providers.append(provider)
            if on_found is not None:
                on_found(provider)

        await self._kad.find_providers_of(
            provider_key_bytes(key), count, timeout=timeout, on_found=found
        )
        self._timed("find_providers", started)
        log.debug(
            "found %d providers of %s: %s",
            len(providers),
            key,
            ", ".join(p.peer_id for p in providers) or "none",
        )
        return providers

    def _remember(self, info: PeerInfo) -> ProviderInfo:
        suffix = f"/p2p/{info.peer_id}"
        transport = [str(addr).split("/p2p/", 1)[0] for addr in info.addrs]
        transport = [addr for addr in dict.fromkeys(transport) if addr]
        if transport:
            self._host.host.get_peerstore().add_addrs(
                info.peer_id, [Multiaddr(addr) for addr in transport], PROVIDER_ADDR_TTL
            )
        return ProviderInfo(str(info.peer_id), tuple(addr + suffix for addr in transport))

    @property
    def provides_in_flight(self) -> int:
        """Provides (first ones and re-provides) started and not yet done, paced ones
        included: each is a walk of the DHT."""
        return self._provides_in_flight

    async def _provide_once(self, key: str, key_bytes: bytes) -> bool:
        self._provides_in_flight += 1
        try:
            async with self._provide_walks:
                await self._pacer.wait()
                sent = await self._kad.provide_key(key_bytes)
        finally:
            self._provides_in_flight -= 1
        if key not in self._provided:
            # `unprovide` ran while this provide was in flight.
            self._kad.stop_providing(key_bytes)
        return sent

    async def _reprovide_loop(self) -> None:
        while True:
            round_start = trio.current_time()
            with trio.move_on_at(round_start + self._reprovide_interval):
                await self._reprovide_requested.wait()
            self._reprovide_requested = trio.Event()
            await self._reprovide_all()

    async def _reprovide_all(self) -> None:
        keys = list(self._provided.items())
        if not keys:
            return
        start = trio.current_time()
        reached = 0
        for key, key_bytes in keys:
            if key not in self._provided:
                continue
            reached += await self._provide_once(key, key_bytes)
            self.stats.reprovides += 1
        self.stats.reprovide_rounds += 1
        log.info(
            "re-provided %d keys (%d reached a peer) in %.2f s",
            len(keys),
            reached,
            trio.current_time() - start,
        )

    # ------------------------------------------------------------ version records

    async def put_version(self, record: VersionRecord) -> bool:
        """Store `record` here and at the peers closest to its key.

        False (nothing sent) when this node already holds a newer record for the same
        ``model:tag``. Raises ``LocalProtocolError`` for an invalid record and
        ``ValueError`` for a key too long to be served.
        """
        key = version_key(record.model, record.tag)
        _check_value_key(key)
        value = record.encode()
        try:
            validate_record_key(key, value)
        except RemoteProtocolError as exc:
            raise LocalProtocolError(f"cannot put {record.name}: {exc}") from None
        if not await self._put_value(key, record):
            self._put.pop(key, None)
            return False
        self._put[key] = record
        log.info(
            "put version %s %s by %s", record.name, record.version_id.hex()[:16], record.author
        )
        return True

    async def _put_value(self, key: str, record: VersionRecord) -> bool:
        try:
            await self._kad.put_value(key, record.encode())
        except ValueError as exc:  # the only one left once validated: a newer one is here
            log.info("did not put %s by %s: %s", record.name, record.author, exc)
            return False
        return True

    async def _reput_loop(self) -> None:
        while True:
            await trio.sleep(self._reput_interval)
            records = list(self._put.items())
            for key, record in records:
                if self._put.get(key) is not record:
                    continue
                if not await self._put_value(key, record):
                    self._put.pop(key, None)
                self.stats.reputs += 1
            if records:
                log.info("put %d version records again", len(records))

    async def get_version(self, model_full: str, tag: str) -> VersionRecord | None:
        """The newest valid record for ``model_full:tag`` held here or by the closest
        peers, or None. Raises ``LocalProtocolError`` for an invalid name."""
        key = version_key(model_full, tag)
        _check_value_key(key)
        started = trio.current_time()
        value = await self._kad.get_newest_value(key)
        self._timed("get_version", started)
        if value is None:
            log.debug("no version record for %s:%s", model_full, tag)
            return None
        try:
            record = validate_record_key(key, value)
        except RemoteProtocolError as exc:  # every path validated it: a bug if seen
            log.error("version record for %s:%s failed validation: %s", model_full, tag, exc)
            return None
        log.debug("got version %s by %s", record.name, record.author)
        return record


def _check_value_key(key: str) -> None:
    if len(key.encode()) > KAD_MAX_VALUE_KEY_BYTES:
        raise ValueError(
            f"DHT key {key[:60]}... is {len(key.encode())} bytes; peers serve at most "
            f"{KAD_MAX_VALUE_KEY_BYTES}"
        )
