"""Node configuration: the TOML schema, its defaults and its validation.

The shipped ``node.toml`` is the documentation of every key; a test keeps its values and the
defaults below in step. Every problem is reported as one ``ConfigError`` line naming the file
and the key, so the CLI can print it and exit 2.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from difflib import get_close_matches
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Final, Literal, TypeAlias
from urllib.parse import urlsplit

import base58
import multiaddr
import multihash  # type: ignore[import-untyped]  # ships no type hints

from node.replication_policy import Policy, PolicyDefaults, PolicyError, parse_policy

__all__ = [
    "CHUNK_SIZE_MAX",
    "CHUNK_SIZE_MIN",
    "CONFIG_ENV",
    "KNOWN_KEYS",
    "ApiConfig",
    "Compression",
    "Config",
    "ConfigError",
    "MetricsConfig",
    "NetworkConfig",
    "NodeConfig",
    "ReplicationConfig",
    "StorageConfig",
    "SyncConfig",
    "default_data_dir",
    "default_models_dir",
    "default_node_name",
    "format_size",
    "load_config",
    "parse_duration",
    "parse_host_port",
    "parse_size",
    "resolve_config_path",
    "validate_peer_id",
]

KiB: Final = 1024
MiB: Final = 1024 * KiB

CONFIG_ENV: Final = "DMM_CONFIG"
OLLAMA_MODELS_ENV: Final = "OLLAMA_MODELS"

# Bounds every chunk size (min, avg, max) must lie in.
CHUNK_SIZE_MIN: Final = 64 * KiB
CHUNK_SIZE_MAX: Final = 16 * MiB
# pyfastcdc refuses larger values (measured with 0.3.1): catch them here, not mid-import.
_FASTCDC_MAX_AVG: Final = 4 * MiB
_FASTCDC_MAX_MIN: Final = 1 * MiB

Compression: TypeAlias = Literal["none", "zstd"]
_COMPRESSIONS: Final[tuple[Compression, ...]] = ("none", "zstd")

# The schema: every section and key the file may hold. node.toml must set each one.
KNOWN_KEYS: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "node": ("name", "data_dir", "tags"),
        "storage": (
            "models_dir",
            "cache_dir",
            "cleanup_age",
            "compression",
            "upload_slots",
            "upload_rate_limit",
        ),
        "sync": (
            "sync_interval",
            "worker_count",
            "chunk_size",
            "min_chunk_size",
            "max_chunk_size",
            "delta_dir",
            "cas_dir",
            "follow",
        ),
        "replication": (
            "default_min_replicas",
            "default_max_replicas",
            "default_replication_factor",
            "worker_count",
            "health_check_interval",
            "health_check_timeout",
            "policy_enforcement_interval",
            "replica_capacity",
            "policy",
        ),
        "network": ("listen", "bootstrap", "mdns", "allowlist"),
        "api": ("listen", "upstream", "upstream_registry"),
        "metrics": ("enabled", "interval"),
    }
)


class ConfigError(ValueError):
    """A bad config file or setting. ``str()`` is one line: ``FILE: KEY: what is wrong``."""

    exit_code: ClassVar[int] = 2

    def __init__(self, source: str, key: str | None, problem: str) -> None:
        self.source = source
        self.key = key
        # One line, always: the CLI prints it as-is.
        self.problem = " ".join(problem.split())
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {self.problem}")


@dataclass(frozen=True, slots=True)
class NodeConfig:
    name: str
    data_dir: Path
    # Read-only view; excluded from hashing because mappings are unhashable.
    tags: Mapping[str, str] = field(hash=False)


@dataclass(frozen=True, slots=True)
class StorageConfig:
    models_dir: Path
    cache_dir: Path
    cleanup_age: float
    compression: Compression
    upload_slots: int
    upload_rate_limit: int  # bytes/s, 0 = unlimited


@dataclass(frozen=True, slots=True)
class SyncConfig:
    sync_interval: float
    worker_count: int
    chunk_size: int
    min_chunk_size: int
    max_chunk_size: int
    delta_dir: Path
    cas_dir: Path
    follow: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ReplicationConfig:
    default_min_replicas: int
    default_max_replicas: int
    default_replication_factor: int
    worker_count: int
    health_check_interval: float
    health_check_timeout: float
    policy_enforcement_interval: float
    # Bytes of replica-only copies this node accepts for others; 0 = as free disk allows.
    replica_capacity: int = 0
    # [[replication.policy]] tables, in file order (node/replication_policy.py).
    policies: tuple[Policy, ...] = ()


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    listen: tuple[str, ...]
    bootstrap: tuple[str, ...]
    mdns: bool
    allowlist: tuple[str, ...]  # empty = any peer may connect


@dataclass(frozen=True, slots=True)
class ApiConfig:
    host: str
    port: int
    upstream: str | None  # base URL of a real Ollama, no trailing slash
    upstream_registry: str

    @property
    def listen(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool
    interval: float


@dataclass(frozen=True, slots=True)
class Config:
    path: Path | None  # absolute path of the file read, None = built-in defaults
    node: NodeConfig
    storage: StorageConfig
    sync: SyncConfig
    replication: ReplicationConfig
    network: NetworkConfig
    api: ApiConfig
    metrics: MetricsConfig


# --- value parsers (usable on their own; raise ValueError with a message) ---------------------

_DURATION_UNITS: Final = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
}
_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_DURATION_FULL: Final = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d|w))+")
_DURATION_HINT: Final = "use e.g. 30s, 5m, 1h30m, 7d, 250ms"

_SIZE_UNITS: Final = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE: Final = re.compile(r"(\d+(?:\.\d+)?) ?([A-Za-z]*)")
_SIZE_HINT: Final = "use e.g. 1MiB, 512KiB"


def _quote(value: object) -> str:
    """Render a value the way it would be written in TOML, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def parse_duration(value: str | int | float) -> float:
    """Seconds from ``"30s"``, ``"5m"``, ``"1h30m"``, ``"7d"``, ``"250ms"``; a number is seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{_quote(value)} is not a duration ({_DURATION_HINT})")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        if value == "0":
            return 0.0
        if not _DURATION_FULL.fullmatch(value):
            raise ValueError(f"{_quote(value)} is not a duration ({_DURATION_HINT})")
        seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(value))
    else:
        raise ValueError(f"{_quote(value)} is not a duration ({_DURATION_HINT})")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{_quote(value)} is not a duration (must be finite and not negative)")
    return seconds


def parse_size(value: str | int) -> int:
    """Bytes from ``"1MiB"``, ``"512KiB"``, ``"2GB"`` (units 1000-based) or a plain int."""
    if isinstance(value, bool):
        raise ValueError(f"{_quote(value)} is not a size ({_SIZE_HINT})")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is not a size (must not be negative)")
        return value
    if not isinstance(value, str):
        raise ValueError(f"{_quote(value)} is not a size ({_SIZE_HINT})")
    match = _SIZE_RE.fullmatch(value)
    unit = _SIZE_UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise ValueError(f"{_quote(value)} is not a size ({_SIZE_HINT})")
    try:
        # Decimal, not float: "1.5MiB" must come out exact.
        size = Decimal(match.group(1)) * unit
    except InvalidOperation as exc:
        raise ValueError(f"{_quote(value)} is not a size ({_SIZE_HINT})") from exc
    if size != size.to_integral_value():
        raise ValueError(f"{_quote(value)} is not a whole number of bytes")
    return int(size)


def format_size(size: int) -> str:
    """``"256KiB"``, ``"1MiB"``; plain bytes when not a whole number of either."""
    for unit, name in ((MiB, "MiB"), (KiB, "KiB")):
        if size and size % unit == 0:
            return f"{size // unit}{name}"
    return f"{size}B"


def validate_peer_id(text: str) -> str:
    """``text`` if it is a base58 libp2p peer id (``12D3KooW...`` or ``Qm...``), else ValueError.

    Checked by hand rather than with ``libp2p.peer.id.ID``: importing libp2p takes ~1.7 s,
    too long for every CLI command, and ``ID.from_base58`` accepts any base58 text anyway.
    ``ID.from_base58(text)`` is the libp2p object for a text that passes.
    """
    problem = f"{_quote(text)} is not a peer id (expected base58 like 12D3KooW...)"
    try:
        mh = multihash.decode(base58.b58decode(text))
    except ValueError as exc:
        raise ValueError(problem) from exc
    if mh.name == "sha2-256" and len(mh.digest) == 32:
        return text
    if mh.name == "id" and _is_inlined_public_key(mh.digest):
        return text
    raise ValueError(problem)


def _is_inlined_public_key(data: bytes) -> bool:
    """A libp2p PublicKey protobuf small enough to inline: field 1 = key type, field 2 = key."""
    if len(data) < 5 or data[0] != 0x08 or data[2] != 0x12 or data[3] != len(data) - 4:
        return False
    key_type = data[1]  # 0 RSA, 1 Ed25519, 2 Secp256k1, 3 ECDSA
    return key_type <= 3 and (key_type != 1 or len(data) - 4 == 32)


def parse_host_port(text: str) -> tuple[str, int]:
    """``("127.0.0.1", 11435)`` from ``"127.0.0.1:11435"``; IPv6 hosts in brackets."""
    problem = f"{_quote(text)} is not host:port (e.g. 127.0.0.1:11435 or [::1]:11435)"
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(problem)
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(problem)
        if ":" in host:
            raise ValueError(f"{_quote(text)}: an IPv6 host needs brackets, e.g. [::1]:11435")
    if not host or any(c.isspace() for c in host):
        raise ValueError(problem)
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(problem)
    port = int(port_text)
    # 0 asks the OS for a free port (tests, several nodes on one machine).
    if not 0 <= port <= 65535:
        raise ValueError(f"{_quote(text)}: port must be 0..65535 (0 = any free port)")
    return host, port


def resolve_config_path(explicit: str | None) -> Path | None:
    """The config file to read: ``explicit``, else ``$DMM_CONFIG``, else ``./node.toml``, else
    ``~/.config/dmm/node.toml``, else None (built-in defaults).

    A file named explicitly or by ``$DMM_CONFIG`` must exist.
    """
    for given, how in ((explicit, "--config"), (os.environ.get(CONFIG_ENV), f"${CONFIG_ENV}")):
        if given:
            path = Path(given).expanduser()
            if not path.is_file():
                what = "is not a file" if path.exists() else "file not found"
                raise ConfigError(str(path), None, f"{what} (named by {how})")
            return path
    for candidate in (Path("node.toml"), Path("~/.config/dmm/node.toml").expanduser()):
        if candidate.is_file():
            return candidate
    return None


# --- loading ------------------------------------------------------------------------------------

_MISSING: Final = object()
_VAR_RE: Final = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
_REGISTRY_RE: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::\d{1,5})?")
_TOML_POS_RE: Final = re.compile(r"^(.*) \(at (line (\d+), column (\d+)|end of document)\)$")


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return "date/time"


def _suggest(word: str, choices: tuple[str, ...] | list[str]) -> str:
    close = get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


class _Loader:
    """Reads one parsed TOML document into a Config, raising ConfigError on the first problem."""

    def __init__(self, source: str, base_dir: Path, doc: dict[str, Any]) -> None:
        self.source = source
        self.base_dir = base_dir
        self.doc = doc

    def error(self, key: str | None, problem: str) -> ConfigError:
        return ConfigError(self.source, key, problem)

    def check_schema(self) -> None:
        sections = tuple(KNOWN_KEYS)
        for name, table in self.doc.items():
            if name not in KNOWN_KEYS:
                if not isinstance(table, dict):
                    raise self.error(
                        name, "settings belong in a section, e.g. [node]" + _suggest(name, sections)
                    )
                raise self.error(name, "unknown section" + _suggest(name, sections))
            if not isinstance(table, dict):
                raise self.error(name, f"must be a table ([{name}]), got {_toml_type(table)}")
            for key in table:
                if key not in KNOWN_KEYS[name]:
                    raise self.error(
                        f"{name}.{key}", "unknown key" + _suggest(key, KNOWN_KEYS[name])
                    )

    def raw(self, key: str) -> Any:
        section, _, name = key.partition(".")
        return self.doc.get(section, {}).get(name, _MISSING)

    def typed(self, key: str, kinds: tuple[type, ...], what: str) -> Any:
        value = self.raw(key)
        # bool is an int in Python but never a number in a config file.
        if value is not _MISSING and (
            not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)
        ):
            raise self.error(key, f"expected {what}, got {_toml_type(value)} {_quote(value)}")
        return value

    def string(self, key: str, default: str) -> str:
        value = self.typed(key, (str,), "a string")
        return default if value is _MISSING else value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.typed(key, (bool,), "true or false")
        return default if value is _MISSING else value

    def integer(self, key: str, default: int, minimum: int) -> int:
        value = self.typed(key, (int,), "an integer")
        if value is _MISSING:
            return default
        if value < minimum:
            raise self.error(key, f"{value} is too small (minimum {minimum})")
        return int(value)

    def duration(self, key: str, default: str, *, positive: bool) -> float:
        value = self.typed(key, (str, int, float), 'a duration such as "30s"')
        try:
            seconds = parse_duration(default if value is _MISSING else value)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None
        if positive and seconds <= 0:
            raise self.error(key, f"{_quote(value)} must be longer than zero")
        return seconds

    def size(self, key: str, default: str) -> int:
        size = self.optional_size(key)
        return parse_size(default) if size is None else size

    def optional_size(self, key: str) -> int | None:
        value = self.typed(key, (str, int), 'a size such as "1MiB"')
        if value is _MISSING:
            return None
        try:
            return parse_size(value)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None

    def string_list(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.typed(key, (list,), "an array of strings")
        if value is _MISSING:
            return default
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error(
                    f"{key}[{i}]", f"expected a string, got {_toml_type(item)} {_quote(item)}"
                )
            if not item:
                raise self.error(f"{key}[{i}]", "must not be empty")
        return tuple(value)

    def path(self, key: str, default: Callable[[], Path]) -> Path:
        """An absolute path; empty or missing means ``default()``."""
        value = self.string(key, "")
        if not value:
            return default()

        def expand_var(match: re.Match[str]) -> str:
            name = match.group(1) or match.group(2)
            if name not in os.environ:
                raise self.error(key, f"{_quote(value)} uses ${name}, which is not set")
            return os.environ[name]

        text = _VAR_RE.sub(expand_var, value)
        try:
            path = Path(text).expanduser()
        except RuntimeError as exc:  # "~user" with no such user, or no home directory
            raise self.error(key, f"{_quote(value)}: {exc}") from None
        if not path.is_absolute():
            path = self.base_dir / path
        return Path(os.path.normpath(path))

    # --- sections ---

    def node(self) -> NodeConfig:
        name = self.string("node.name", "") or default_node_name()
        if len(name) > 255 or not name.isprintable():
            raise self.error("node.name", f"{_quote(name)} must be printable and at most 255 chars")
        data_dir = self.path("node.data_dir", default_data_dir)
        tags_raw = self.typed("node.tags", (dict,), "a table of strings")
        tags: dict[str, str] = {}
        if tags_raw is not _MISSING:
            for tag, tag_value in tags_raw.items():
                if not isinstance(tag_value, str):
                    raise self.error(
                        f"node.tags.{tag}",
                        f"expected a string, got {_toml_type(tag_value)} {_quote(tag_value)}",
                    )
                tags[tag] = tag_value
        return NodeConfig(name=name, data_dir=data_dir, tags=MappingProxyType(tags))

    def storage(self, data_dir: Path) -> StorageConfig:
        compression = self.string("storage.compression", "none")
        if compression not in _COMPRESSIONS:
            raise self.error(
                "storage.compression", f"{_quote(compression)} is not one of: none, zstd"
            )
        return StorageConfig(
            models_dir=self.path("storage.models_dir", default_models_dir),
            cache_dir=self.path("storage.cache_dir", lambda: data_dir / "cache"),
            cleanup_age=self.duration("storage.cleanup_age", "7d", positive=False),
            compression="zstd" if compression == "zstd" else "none",
            upload_slots=self.integer("storage.upload_slots", 4, minimum=1),
            upload_rate_limit=self.size("storage.upload_rate_limit", "0"),
        )

    def sync(self, data_dir: Path) -> SyncConfig:
        avg = self.size("sync.chunk_size", "1MiB")
        self.check_chunk_bound("sync.chunk_size", avg)
        if avg > _FASTCDC_MAX_AVG:
            raise self.error(
                "sync.chunk_size", f"{format_size(avg)} is above the chunker's limit of 4MiB"
            )
        # Derived bounds are clamped into range so any valid chunk_size works on its own.
        low = self.optional_size("sync.min_chunk_size")
        if low is None:
            low = max(avg // 4, CHUNK_SIZE_MIN)
        else:
            self.check_chunk_bound("sync.min_chunk_size", low)
        high = self.optional_size("sync.max_chunk_size")
        if high is None:
            high = min(avg * 2, CHUNK_SIZE_MAX)
        else:
            self.check_chunk_bound("sync.max_chunk_size", high)
        if low > avg:
            raise self.error(
                "sync.min_chunk_size",
                f"{format_size(low)} is larger than chunk_size ({format_size(avg)})",
            )
        if high < avg:
            raise self.error(
                "sync.max_chunk_size",
                f"{format_size(high)} is smaller than chunk_size ({format_size(avg)})",
            )
        if low > _FASTCDC_MAX_MIN:
            raise self.error(
                "sync.min_chunk_size",
                f"{format_size(low)} is above the chunker's limit of 1MiB",
            )
        return SyncConfig(
            sync_interval=self.duration("sync.sync_interval", "5m", positive=True),
            worker_count=self.integer("sync.worker_count", 4, minimum=1),
            chunk_size=avg,
            min_chunk_size=low,
            max_chunk_size=high,
            delta_dir=self.path("sync.delta_dir", lambda: data_dir / "deltas"),
            cas_dir=self.path("sync.cas_dir", lambda: data_dir / "cas"),
            follow=self.string_list("sync.follow"),
        )

    def check_chunk_bound(self, key: str, size: int) -> None:
        if not CHUNK_SIZE_MIN <= size <= CHUNK_SIZE_MAX:
            raise self.error(key, f"{format_size(size)} is outside 64KiB..16MiB")

    def replication(self) -> ReplicationConfig:
        low = self.integer("replication.default_min_replicas", 1, minimum=1)
        high = self.integer("replication.default_max_replicas", 3, minimum=1)
        factor = self.integer("replication.default_replication_factor", 2, minimum=1)
        if low > high:
            raise self.error(
                "replication.default_min_replicas",
                f"{low} is larger than default_max_replicas ({high})",
            )
        if not low <= factor <= high:
            raise self.error(
                "replication.default_replication_factor",
                f"{factor} is outside default_min_replicas..default_max_replicas ({low}..{high})",
            )
        interval = self.duration("replication.health_check_interval", "30s", positive=True)
        timeout = self.duration("replication.health_check_timeout", "5s", positive=True)
        if timeout > interval:
            raise self.error(
                "replication.health_check_timeout",
                f"{timeout:g}s is longer than health_check_interval ({interval:g}s)",
            )
        return ReplicationConfig(
            default_min_replicas=low,
            default_max_replicas=high,
            default_replication_factor=factor,
            worker_count=self.integer("replication.worker_count", 2, minimum=1),
            health_check_interval=interval,
            health_check_timeout=timeout,
            policy_enforcement_interval=self.duration(
                "replication.policy_enforcement_interval", "1m", positive=True
            ),
            replica_capacity=self.size("replication.replica_capacity", "0"),
            policies=self.policies(PolicyDefaults(low, high, factor)),
        )

    def policies(self, defaults: PolicyDefaults) -> tuple[Policy, ...]:
        tables = self.typed(
            "replication.policy", (list,), "an array of tables [[replication.policy]]"
        )
        if tables is _MISSING:
            return ()
        policies: list[Policy] = []
        for i, table in enumerate(tables):
            key = f"replication.policy[{i}]"
            if not isinstance(table, dict):
                raise self.error(key, f"expected a table, got {_toml_type(table)}")
            try:
                policy = parse_policy(table, defaults)
            except PolicyError as exc:
                raise self.error(f"{key}.{exc.field}", exc.problem) from None
            if any(p.glob == policy.glob for p in policies):
                raise self.error(f"{key}.glob", f"{_quote(policy.glob)} has a policy already")
            policies.append(policy)
        return tuple(policies)

    def multiaddrs(self, key: str, default: tuple[str, ...], *, with_peer: bool) -> tuple[str, ...]:
        addrs = self.string_list(key, default)
        for i, text in enumerate(addrs):
            item = f"{key}[{i}]"
            # The multiaddr package also takes "ip4/1.2.3.4", which is not multiaddr syntax.
            if not text.startswith("/"):
                raise self.error(item, f"{_quote(text)} is not a multiaddr (must start with /)")
            try:
                addr = multiaddr.Multiaddr(text)
            except ValueError as exc:
                # StringParseError's str() repeats the address; its .message is the reason.
                reason = getattr(exc, "message", None) or str(exc)
                raise self.error(item, f"{_quote(text)} is not a multiaddr ({reason})") from None
            if not with_peer:
                continue
            parts = list(addr.items())
            if not parts or parts[-1][0].name != "p2p":
                raise self.error(item, f"{_quote(text)} must end in /p2p/<peer id>")
            try:
                validate_peer_id(str(parts[-1][1]))
            except ValueError as exc:
                raise self.error(item, str(exc)) from None
        return addrs

    def network(self) -> NetworkConfig:
        allowlist = self.string_list("network.allowlist")
        for i, text in enumerate(allowlist):
            try:
                validate_peer_id(text)
            except ValueError as exc:
                raise self.error(f"network.allowlist[{i}]", str(exc)) from None
        return NetworkConfig(
            listen=self.multiaddrs("network.listen", ("/ip4/0.0.0.0/tcp/4001",), with_peer=False),
            bootstrap=self.multiaddrs("network.bootstrap", (), with_peer=True),
            mdns=self.boolean("network.mdns", True),
            allowlist=allowlist,
        )

    def api(self) -> ApiConfig:
        try:
            host, port = parse_host_port(self.string("api.listen", "127.0.0.1:11435"))
        except ValueError as exc:
            raise self.error("api.listen", str(exc)) from None
        upstream = self.string("api.upstream", "")
        if upstream:
            parts = urlsplit(upstream)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise self.error(
                    "api.upstream",
                    f"{_quote(upstream)} is not an http(s) URL (e.g. http://127.0.0.1:11434)",
                )
            if parts.query or parts.fragment:
                raise self.error("api.upstream", f"{_quote(upstream)} must not have ? or #")
        registry = self.string("api.upstream_registry", "registry.ollama.ai")
        if not _REGISTRY_RE.fullmatch(registry):
            raise self.error(
                "api.upstream_registry",
                f"{_quote(registry)} is not a registry host (e.g. registry.ollama.ai)",
            )
        return ApiConfig(
            host=host,
            port=port,
            upstream=upstream.rstrip("/") or None,
            upstream_registry=registry,
        )

    def metrics(self) -> MetricsConfig:
        return MetricsConfig(
            enabled=self.boolean("metrics.enabled", True),
            interval=self.duration("metrics.interval", "15s", positive=True),
        )

    def load(self, path: Path | None) -> Config:
        self.check_schema()
        node = self.node()
        return Config(
            path=path,
            node=node,
            storage=self.storage(node.data_dir),
            sync=self.sync(node.data_dir),
            replication=self.replication(),
            network=self.network(),
            api=self.api(),
            metrics=self.metrics(),
        )


def default_node_name() -> str:
    return socket.gethostname() or "dmm"


def default_data_dir() -> Path:
    return Path("~/.local/share/dmm").expanduser()


def default_models_dir() -> Path:
    """``$OLLAMA_MODELS`` if set (as Ollama does), else ``~/.ollama/models``."""
    env = os.environ.get(OLLAMA_MODELS_ENV)
    if env:
        return Path(os.path.normpath(Path(env).expanduser().absolute()))
    return Path("~/.ollama/models").expanduser()


def load_config(path: Path | None) -> Config:
    """Read and validate ``path`` (None = built-in defaults). Raises ConfigError."""
    if path is None:
        return _Loader("<defaults>", Path.cwd(), {}).load(None)
    source = str(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(source, None, "file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(source, None, f"not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(source, None, f"cannot read: {exc.strerror or exc}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, _toml_position(str(exc), text), _toml_problem(exc)) from None
    absolute = path.absolute()
    return _Loader(source, absolute.parent, doc).load(absolute)


def _toml_position(message: str, text: str) -> str:
    match = _TOML_POS_RE.match(message)
    if match is None or match.group(3) is None:
        return f"line {text.count(chr(10)) + 1}"
    return f"line {match.group(3)}, column {match.group(4)}"


def _toml_problem(exc: tomllib.TOMLDecodeError) -> str:
    match = _TOML_POS_RE.match(str(exc))
    detail = match.group(1) if match else str(exc)
    return f"invalid TOML: {detail}"
