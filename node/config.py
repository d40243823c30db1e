"""Node configuration: the TOML schema, its defaults and its validation.

The shipped ``node.toml`` is the documentation of every key; a test keeps its values and the
defaults below in step. Every problem is reported as one ``ConfigError`` line naming the file
and the key, so the CLI can print it and exit 2.
"""

from __future__ import annotations

import ipaddress
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
    "ACCESS_KEYS",
    "CHUNK_SIZE_MAX",
    "CHUNK_SIZE_MIN",
    "CONFIG_ENV",
    "KNOWN_KEYS",
    "ROLES",
    "AccessConfig",
    "AccessRule",
    "ApiConfig",
    "AuditConfig",
    "Compression",
    "Config",
    "ConfigError",
    "HooksConfig",
    "LimitsConfig",
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
            "sync_type",
            "conflict_strategy",
            "trusted_authors",
            "policies",
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
        "api": ("listen", "upstream", "upstream_registry", "token", "token_file"),
        "metrics": ("enabled", "interval"),
        "hooks": (
            "timeout",
            "pre-pull",
            "post-pull",
            "pre-push",
            "post-push",
            "pre-delete",
            "post-delete",
            "on-conflict",
            "on-replica-change",
        ),
        "limits": (
            "peer_requests",
            "requests",
            "peer_upload_rate",
            "peer_download_rate",
            "download_rate",
            "peer_streams",
            "streams",
            "max_wantlist",
            "disconnect_after",
            "max_violations",
            "ban_for",
            "max_peers_tracked",
        ),
        "audit": ("enabled", "path", "max_size", "keep"),
    }
)

# ``[[access]]`` rules: an array of tables, so not a section of KNOWN_KEYS. node.toml shows
# one in a comment: with no rule at all every peer may do everything.
ACCESS_KEYS: Final = ("peers", "models", "roles")
ROLES: Final = ("reader", "replicator", "publisher")
# An API token shorter than this is refused: it is the only thing guarding the API.
_MIN_TOKEN_LENGTH: Final = 16


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


SyncType: TypeAlias = Literal["full", "delta"]
SYNC_TYPES: Final[tuple[SyncType, ...]] = ("full", "delta")
ConflictStrategy: TypeAlias = Literal["newest", "prefer-author", "keep-both", "manual"]
CONFLICT_STRATEGIES: Final[tuple[ConflictStrategy, ...]] = (
    "newest",
    "prefer-author",
    "keep-both",
    "manual",
)
POLICY_KEYS: Final = ("glob", "interval", "sync_type", "conflict_strategy", "trusted_authors")


@dataclass(frozen=True, slots=True)
class SyncPolicy:
    """How the node keeps the models matching ``glob`` (over ``name:tag``) in sync."""

    glob: str
    interval: float
    sync_type: SyncType
    conflict_strategy: ConflictStrategy
    trusted_authors: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "glob": self.glob,
            "interval": self.interval,
            "sync_type": self.sync_type,
            "conflict_strategy": self.conflict_strategy,
            "trusted_authors": list(self.trusted_authors),
        }


def parse_sync_policy(obj: object, defaults: SyncPolicy) -> SyncPolicy:
    """A policy from a TOML table or JSON object; missing fields come from ``defaults``.

    Raises ``ValueError("<field>: <problem>")``, one line.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"a policy is a table with a glob, got {_toml_type(obj)}")
    for key in obj:
        if key not in POLICY_KEYS:
            raise ValueError(f"{key}: unknown key" + _suggest(str(key), POLICY_KEYS))
    glob = obj.get("glob")
    if not isinstance(glob, str) or not glob or len(glob) > 255:
        raise ValueError('glob: expected a glob over name:tag such as "llama3*"')
    interval = defaults.interval
    if "interval" in obj:
        value = obj["interval"]
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError(f'interval: expected a duration such as "30s", got {_quote(value)}')
        interval = parse_duration(value)
        if interval <= 0:
            raise ValueError(f"interval: {_quote(value)} must be longer than zero")
    sync_type = obj.get("sync_type", defaults.sync_type)
    if sync_type not in SYNC_TYPES:
        raise ValueError(f"sync_type: {_quote(sync_type)} is not one of full, delta")
    strategy = obj.get("conflict_strategy", defaults.conflict_strategy)
    if strategy not in CONFLICT_STRATEGIES:
        raise ValueError(
            f"conflict_strategy: {_quote(strategy)} is not one of " + ", ".join(CONFLICT_STRATEGIES)
        )
    trusted = obj.get("trusted_authors", list(defaults.trusted_authors))
    if not isinstance(trusted, list | tuple) or not all(isinstance(t, str) for t in trusted):
        raise ValueError("trusted_authors: expected an array of peer ids")
    for peer in trusted:
        try:
            validate_peer_id(peer)
        except ValueError as exc:
            raise ValueError(f"trusted_authors: {exc}") from None
    return SyncPolicy(glob, interval, sync_type, strategy, tuple(trusted))


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
    # Defaults for every followed model; [[sync.policies]] entries override them per glob.
    sync_type: SyncType = "delta"
    conflict_strategy: ConflictStrategy = "newest"
    trusted_authors: tuple[str, ...] = ()
    policies: tuple[SyncPolicy, ...] = ()

    def default_policy(self, glob: str = "*") -> SyncPolicy:
        return SyncPolicy(
            glob=glob,
            interval=self.sync_interval,
            sync_type=self.sync_type,
            conflict_strategy=self.conflict_strategy,
            trusted_authors=self.trusted_authors,
        )


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
    upstream_registry: str  # host[:port] or http(s)://host[:port]; "" = no fallback
    # Bearer token every request but GET / and /api/version must carry; None = no auth
    # (loopback only). Kept out of repr so it never reaches a log line.
    token: str | None = field(default=None, repr=False)

    @property
    def upstream_registry_url(self) -> str | None:
        """Base URL of the upstream OCI registry (https unless a scheme was given)."""
        if not self.upstream_registry:
            return None
        if "://" in self.upstream_registry:
            return self.upstream_registry
        return "https://" + self.upstream_registry

    @property
    def listen(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool
    interval: float


@dataclass(frozen=True, slots=True)
class HooksConfig:
    timeout: float
    # event -> shell commands, in order; read-only, excluded from hashing like node.tags.
    commands: Mapping[str, tuple[str, ...]] = field(hash=False)


@dataclass(frozen=True, slots=True)
class AccessRule:
    """Grants ``roles`` on models matching ``models`` (a glob) to ``peers`` ("*" = any)."""

    peers: tuple[str, ...]
    models: str
    roles: frozenset[str]


@dataclass(frozen=True, slots=True)
class AccessConfig:
    rules: tuple[AccessRule, ...] = ()  # empty = every peer may do everything


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    peer_requests: float  # requests/s per peer (catalog + blocks + new streams)
    requests: float  # requests/s over all peers
    peer_upload_rate: int  # bytes/s, 0 = unlimited (total: storage.upload_rate_limit)
    peer_download_rate: int
    download_rate: int
    peer_streams: int  # concurrent inbound streams per peer
    streams: int  # concurrent inbound streams over all peers
    max_wantlist: int  # outstanding block requests per stream
    disconnect_after: float  # seconds continuously over the request rate
    max_violations: int  # refused or malformed requests before a disconnect
    ban_for: float
    max_peers_tracked: int


@dataclass(frozen=True, slots=True)
class AuditConfig:
    enabled: bool
    path: Path
    max_size: int
    keep: int


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
    hooks: HooksConfig
    limits: LimitsConfig
    audit: AuditConfig
    access: AccessConfig = AccessConfig()


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
        sections = (*KNOWN_KEYS, "access")
        for name, table in self.doc.items():
            if name == "access":
                self.check_access_schema(table)
                continue
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

    def check_access_schema(self, rules: Any) -> None:
        if not isinstance(rules, list):
            raise self.error("access", "must be an array of tables: write each rule as [[access]]")
        for i, rule in enumerate(rules):
            if not isinstance(rule, dict):
                raise self.error(f"access[{i}]", "must be a table: write each rule as [[access]]")
            for key in rule:
                if key not in ACCESS_KEYS:
                    raise self.error(
                        f"access[{i}].{key}", "unknown key" + _suggest(key, ACCESS_KEYS)
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
        interval = self.duration("sync.sync_interval", "5m", positive=True)
        defaults = self.sync_defaults(interval)
        return SyncConfig(
            sync_interval=interval,
            worker_count=self.integer("sync.worker_count", 4, minimum=1),
            chunk_size=avg,
            min_chunk_size=low,
            max_chunk_size=high,
            delta_dir=self.path("sync.delta_dir", lambda: data_dir / "deltas"),
            cas_dir=self.path("sync.cas_dir", lambda: data_dir / "cas"),
            follow=self.string_list("sync.follow"),
            sync_type=defaults.sync_type,
            conflict_strategy=defaults.conflict_strategy,
            trusted_authors=defaults.trusted_authors,
            policies=self.sync_policies(defaults),
        )

    def sync_defaults(self, interval: float) -> SyncPolicy:
        fields: dict[str, Any] = {}
        for key in ("sync_type", "conflict_strategy", "trusted_authors"):
            value = self.raw(f"sync.{key}")
            if value is not _MISSING:
                fields[key] = value
        builtin = SyncPolicy("*", interval, "delta", "newest")
        try:
            return parse_sync_policy({"glob": "*", **fields}, builtin)
        except ValueError as exc:
            key, _, problem = str(exc).partition(": ")
            raise self.error(f"sync.{key}", problem) from None

    def sync_policies(self, defaults: SyncPolicy) -> tuple[SyncPolicy, ...]:
        tables = self.typed("sync.policies", (list,), "an array of tables ([[sync.policies]])")
        if tables is _MISSING:
            return ()
        policies = []
        for i, table in enumerate(tables):
            try:
                policies.append(parse_sync_policy(table, defaults))
            except ValueError as exc:
                key, sep, problem = str(exc).partition(": ")
                where = f"sync.policies[{i}].{key}" if sep else f"sync.policies[{i}]"
                raise self.error(where, problem if sep else str(exc)) from None
        return tuple(policies)

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
        registry = self.string("api.upstream_registry", "registry.ollama.ai").rstrip("/")
        if registry:
            # A bare host means https, as Ollama does; a scheme is allowed for a local
            # or plain-http registry (http://127.0.0.1:5000).
            parts = urlsplit(registry if "://" in registry else "https://" + registry)
            if (
                parts.scheme not in ("http", "https")
                or not _REGISTRY_RE.fullmatch(parts.netloc)
                or parts.path
                or parts.query
                or parts.fragment
            ):
                raise self.error(
                    "api.upstream_registry",
                    f"{_quote(registry)} is not a registry host or http(s)://host[:port] "
                    "(e.g. registry.ollama.ai)",
                )
        return ApiConfig(
            host=host,
            port=port,
            upstream=upstream.rstrip("/") or None,
            upstream_registry=registry,
            token=self.api_token(host),
        )

    def metrics(self) -> MetricsConfig:
        return MetricsConfig(
            enabled=self.boolean("metrics.enabled", True),
            interval=self.duration("metrics.interval", "15s", positive=True),
        )

    def hooks(self) -> HooksConfig:
        commands = {
            event: cmds
            for event in KNOWN_KEYS["hooks"]
            if event != "timeout" and (cmds := self.string_list(f"hooks.{event}"))
        }
        return HooksConfig(
            timeout=self.duration("hooks.timeout", "30s", positive=True),
            commands=MappingProxyType(commands),
        )

    def access(self) -> AccessConfig:
        rules: list[AccessRule] = []
        for i, table in enumerate(self.doc.get("access", [])):
            where = f"access[{i}]"
            peers = table.get("peers", _MISSING)
            if not isinstance(peers, list) or not peers:
                raise self.error(f"{where}.peers", 'must be a non-empty array of peer ids or "*"')
            for j, peer in enumerate(peers):
                if peer == "*":
                    continue
                if not isinstance(peer, str):
                    raise self.error(
                        f"{where}.peers[{j}]", f"expected a string, got {_quote(peer)}"
                    )
                try:
                    validate_peer_id(peer)
                except ValueError as exc:
                    raise self.error(f"{where}.peers[{j}]", str(exc)) from None
            models = table.get("models", "*")
            if not isinstance(models, str) or not models or len(models) > 256:
                raise self.error(
                    f"{where}.models", 'must be a glob of 1..256 characters, e.g. "llama*"'
                )
            roles = table.get("roles", _MISSING)
            if not isinstance(roles, list) or not roles:
                raise self.error(
                    f"{where}.roles", f"must be a non-empty array of: {', '.join(ROLES)}"
                )
            for j, role in enumerate(roles):
                if role not in ROLES:
                    raise self.error(
                        f"{where}.roles[{j}]",
                        f"{_quote(role)} is not a role (one of: {', '.join(ROLES)})",
                    )
            rules.append(AccessRule(tuple(peers), models, frozenset(roles)))
        return AccessConfig(tuple(rules))

    def rate(self, key: str, default: float) -> float:
        value = self.typed(key, (int, float), "a number")
        if value is _MISSING:
            return default
        if not math.isfinite(value) or value <= 0:
            raise self.error(key, f"{_quote(value)} must be a positive number")
        return float(value)

    def limits(self) -> LimitsConfig:
        peer_requests = self.rate("limits.peer_requests", 1000.0)
        requests = self.rate("limits.requests", 5000.0)
        if requests < peer_requests:
            raise self.error(
                "limits.requests", f"{requests:g} is below limits.peer_requests ({peer_requests:g})"
            )
        peer_streams = self.integer("limits.peer_streams", 32, minimum=1)
        streams = self.integer("limits.streams", 1024, minimum=1)
        if streams < peer_streams:
            raise self.error(
                "limits.streams", f"{streams} is below limits.peer_streams ({peer_streams})"
            )
        rates = {}
        for key in ("peer_upload_rate", "peer_download_rate", "download_rate"):
            rate = self.size(f"limits.{key}", "0")
            # A 2 MiB block must pass within the 30 s write timeout.
            if 0 < rate < 128 * KiB:
                raise self.error(f"limits.{key}", f"{format_size(rate)} is below 128KiB (or 0)")
            rates[key] = rate
        return LimitsConfig(
            peer_requests=peer_requests,
            requests=requests,
            peer_upload_rate=rates["peer_upload_rate"],
            peer_download_rate=rates["peer_download_rate"],
            download_rate=rates["download_rate"],
            peer_streams=peer_streams,
            streams=streams,
            max_wantlist=self.integer("limits.max_wantlist", 64, minimum=1),
            disconnect_after=self.duration("limits.disconnect_after", "10s", positive=True),
            max_violations=self.integer("limits.max_violations", 10, minimum=1),
            ban_for=self.duration("limits.ban_for", "10m", positive=True),
            max_peers_tracked=self.integer("limits.max_peers_tracked", 4096, minimum=16),
        )

    def audit(self, data_dir: Path) -> AuditConfig:
        max_size = self.size("audit.max_size", "10MiB")
        if max_size < 4 * KiB:
            raise self.error("audit.max_size", f"{format_size(max_size)} is below 4KiB")
        return AuditConfig(
            enabled=self.boolean("audit.enabled", True),
            path=self.path("audit.path", lambda: data_dir / "audit.log"),
            max_size=max_size,
            keep=self.integer("audit.keep", 5, minimum=1),
        )

    def api_token(self, host: str) -> str | None:
        token = self.string("api.token", "")
        token_file = self.path("api.token_file", lambda: Path())
        if token and token_file != Path():
            raise self.error("api.token_file", "set api.token or api.token_file, not both")
        key = "api.token"
        if token_file != Path():
            key = "api.token_file"
            try:
                token = token_file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                reason = getattr(exc, "strerror", None) or exc
                raise self.error(key, f"cannot read {token_file}: {reason}") from None
            if not token:
                raise self.error(key, f"{token_file} is empty")
        if token:
            # Never echo the token itself.
            if len(token) < _MIN_TOKEN_LENGTH or not token.isprintable() or " " in token:
                raise self.error(
                    key,
                    f"the token must be at least {_MIN_TOKEN_LENGTH} printable characters"
                    " without spaces",
                )
            return token
        if not _is_loopback(host):
            raise self.error(
                "api.listen",
                f"{host} is not a loopback address: set api.token or api.token_file"
                " (e.g. the output of `openssl rand -hex 32`)",
            )
        return None

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
            hooks=self.hooks(),
            limits=self.limits(),
            audit=self.audit(node.data_dir),
            access=self.access(),
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


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
