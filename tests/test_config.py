"""Config loading: the shipped node.toml, defaults, parsing tables and one-line errors."""

from __future__ import annotations

import dataclasses
import math
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from node.config import (
    KNOWN_KEYS,
    Config,
    ConfigError,
    format_size,
    load_config,
    parse_duration,
    parse_host_port,
    parse_size,
    resolve_config_path,
    validate_peer_id,
)

SHIPPED = Path(__file__).resolve().parent.parent / "node.toml"
PEER_A = "12D3KooWBuiXxuFsE9X1NzjAM1yy17AQ5ohip8dmoEzSATYMZz3K"  # ed25519, inlined key
PEER_B = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"  # sha2-256 (RSA-style) id
KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Each test gets its own HOME and no config-related variables from the real environment."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("DMM_CONFIG", raising=False)
    monkeypatch.delenv("OLLAMA_MODELS", raising=False)
    return home


def _write(tmp_path: Path, text: str, name: str = "node.toml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- the shipped file ----------------------------------------------------------------------------


@pytest.mark.parametrize("ollama_models", [None, "/srv/ollama/models"])
def test_shipped_node_toml_equals_builtin_defaults(
    monkeypatch: pytest.MonkeyPatch, ollama_models: str | None
) -> None:
    """The file's values and the code's defaults must not drift.

    Only ``Config.path`` differs. Machine-dependent defaults (node.name, storage.models_dir and
    the data_dir sub-folders) are written as "" in the file, so they compare equal too.
    """
    if ollama_models is not None:
        monkeypatch.setenv("OLLAMA_MODELS", ollama_models)
    shipped = load_config(SHIPPED)
    builtin = load_config(None)
    assert shipped.path == SHIPPED
    assert builtin.path is None
    for section in dataclasses.fields(Config):
        if section.name == "path":
            continue
        ours, theirs = getattr(shipped, section.name), getattr(builtin, section.name)
        for item in dataclasses.fields(ours):
            key = f"{section.name}.{item.name}"
            assert getattr(ours, item.name) == getattr(theirs, item.name), key
    assert dataclasses.replace(shipped, path=None) == builtin


def test_shipped_node_toml_sets_every_known_key() -> None:
    # The shipped file is the documentation: every setting must appear in it.
    doc = tomllib.loads(SHIPPED.read_text())
    assert set(doc) == set(KNOWN_KEYS)
    for section, keys in KNOWN_KEYS.items():
        assert set(doc[section]) == set(keys), section


def test_defaults(_clean_env: Path) -> None:
    home = _clean_env
    config = load_config(None)
    data = home / ".local/share/dmm"
    assert config.node.name == socket.gethostname()
    assert config.node.data_dir == data
    assert dict(config.node.tags) == {}
    assert config.storage.models_dir == home / ".ollama/models"
    assert config.storage.cache_dir == data / "cache"
    assert config.storage.cleanup_age == 7 * 86400
    assert config.storage.compression == "none"
    assert config.storage.upload_slots == 4
    assert config.storage.upload_rate_limit == 0
    assert config.sync.sync_interval == 300
    assert (config.sync.min_chunk_size, config.sync.chunk_size, config.sync.max_chunk_size) == (
        256 * KiB,
        1 * MiB,
        2 * MiB,
    )
    assert config.sync.delta_dir == data / "deltas"
    assert config.sync.cas_dir == data / "cas"
    assert config.sync.follow == ()
    r = config.replication
    assert (r.default_min_replicas, r.default_replication_factor, r.default_max_replicas) == (
        1,
        2,
        3,
    )
    assert (r.health_check_interval, r.health_check_timeout) == (30, 5)
    assert r.policy_enforcement_interval == 60
    assert config.network.listen == ("/ip4/0.0.0.0/tcp/4001",)
    assert config.network.bootstrap == config.network.allowlist == ()
    assert config.network.mdns is True
    assert (config.api.host, config.api.port, config.api.listen) == (
        "127.0.0.1",
        11435,
        "127.0.0.1:11435",
    )
    assert config.api.upstream is None
    assert config.api.upstream_registry == "registry.ollama.ai"
    assert config.metrics.enabled is True
    assert config.metrics.interval == 15


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path, "")
    assert dataclasses.replace(load_config(path), path=None) == load_config(None)


# --- value parsers -------------------------------------------------------------------------------

DURATIONS: list[tuple[str | int | float, float]] = [
    ("30s", 30),
    ("5m", 300),
    ("7d", 7 * 86400),
    ("1h30m", 5400),
    ("250ms", 0.25),
    ("1.5h", 5400),
    ("2w", 14 * 86400),
    ("1d12h", 36 * 3600),
    ("1m30s500ms", 90.5),
    ("0", 0),
    ("0s", 0),
    (90, 90),
    (0.5, 0.5),
]


@pytest.mark.parametrize(("text", "seconds"), DURATIONS)
def test_parse_duration(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["", "30", "s", "5 m", " 5m", "-5s", "5M", "1h-30m", "abc", "1e3s", "5min", True, -1, math.inf],
)
def test_parse_duration_rejects(text: str | int | float) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


SIZES: list[tuple[str | int, int]] = [
    ("1MiB", MiB),
    ("512KiB", 512 * KiB),
    ("2GB", 2_000_000_000),
    ("2GiB", 2 * 1024 * MiB),
    ("1TiB", 1024**4),
    ("64kb", 64_000),
    ("1mib", MiB),
    ("1 MiB", MiB),
    ("1.5MiB", 3 * MiB // 2),
    ("10B", 10),
    ("10", 10),
    ("0", 0),
    (1048576, MiB),
    (0, 0),
]


@pytest.mark.parametrize(("text", "size"), SIZES)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("1XB", "is not a size (use e.g. 1MiB, 512KiB)"),
        ("", "is not a size"),
        ("MiB", "is not a size"),
        ("-1MiB", "is not a size"),
        ("1,000", "is not a size"),
        ("1MiB ", "is not a size"),
        ("1  MiB", "is not a size"),
        ("1.5B", "is not a whole number of bytes"),
        (-1, "must not be negative"),
        (True, "is not a size"),
    ],
)
def test_parse_size_rejects(text: str | int, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        parse_size(text)


@pytest.mark.parametrize(
    ("size", "text"), [(0, "0B"), (1000, "1000B"), (64 * KiB, "64KiB"), (1536 * KiB, "1536KiB")]
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:11435", "127.0.0.1", 11435),
        ("0.0.0.0:1", "0.0.0.0", 1),
        ("localhost:65535", "localhost", 65535),
        ("[::1]:8080", "::1", 8080),
        ("127.0.0.1:0", "127.0.0.1", 0),
    ],
)
def test_parse_host_port(text: str, host: str, port: int) -> None:
    assert parse_host_port(text) == (host, port)


@pytest.mark.parametrize(
    "text", ["127.0.0.1", ":11435", "host:", "host:-1", "host:65536", "::1:80", "[::1]", "h:x"]
)
def test_parse_host_port_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(text)


def test_config_does_not_import_libp2p() -> None:
    # Importing libp2p takes seconds; every CLI command loads the config.
    code = "import sys, node.config; sys.exit('libp2p' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_validate_peer_id_agrees_with_libp2p() -> None:
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.secp256k1 import create_new_key_pair as create_secp256k1
    from libp2p.peer.id import ID

    fresh = [
        ID.from_pubkey(create().public_key).to_base58()
        for create in (create_new_key_pair, create_secp256k1)
    ]
    for text in [PEER_A, PEER_B, *fresh]:
        assert validate_peer_id(text) == text
        assert ID.from_base58(text).to_base58() == text
        # The key inlined in an identity-multihash id is one libp2p can extract.
        if not text.startswith("Qm"):
            assert ID.from_base58(text).extract_public_key() is not None


@pytest.mark.parametrize(
    "text", ["", "abc", PEER_A[:-1], PEER_A + "a", "12D3KooW0OIl", "not a peer", "é"]
)
def test_validate_peer_id_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a peer id"):
        validate_peer_id(text)


# --- errors: one line, naming file and key -------------------------------------------------------

ERRORS: list[tuple[str, str, str]] = [
    # (file text, key named, part of the problem)
    ("[snyc]\n", "snyc", "unknown section (did you mean sync?)"),
    ('[sync]\nchunk_sise = "1MiB"\n', "sync.chunk_sise", "unknown key (did you mean chunk_size?)"),
    ("[sync]\nbogus = 1\n", "sync.bogus", "unknown key"),
    ('name = "x"\n', "name", "settings belong in a section"),
    ("node = 3\n", "node", "must be a table ([node]), got integer"),
    ("[node]\ndata_dir = 5\n", "node.data_dir", "expected a string, got integer 5"),
    ('[node]\ntags = "eu"\n', "node.tags", "expected a table of strings"),
    ("[node.tags]\nregion = 1\n", "node.tags.region", "expected a string, got integer 1"),
    ('[node]\nname = "a\\tb"\n', "node.name", "must be printable"),
    ('[sync]\nworker_count = "4"\n', "sync.worker_count", 'expected an integer, got string "4"'),
    ("[sync]\nworker_count = true\n", "sync.worker_count", "got boolean true"),
    ("[sync]\nworker_count = 2.0\n", "sync.worker_count", "got float 2.0"),
    ("[sync]\nworker_count = 0\n", "sync.worker_count", "0 is too small (minimum 1)"),
    ("[storage]\nupload_slots = -1\n", "storage.upload_slots", "too small"),
    ("[replication]\nworker_count = -3\n", "replication.worker_count", "too small"),
    ('[sync]\nchunk_size = "1XB"\n', "sync.chunk_size", '"1XB" is not a size'),
    ("[sync]\nchunk_size = []\n", "sync.chunk_size", "expected a size"),
    ('[storage]\nupload_rate_limit = "fast"\n', "storage.upload_rate_limit", "is not a size"),
    ('[storage]\nupload_rate_limit = "1.5B"\n', "storage.upload_rate_limit", "whole number"),
    ('[sync]\nsync_interval = "5 minutes"\n', "sync.sync_interval", "is not a duration"),
    ('[sync]\nsync_interval = "0s"\n', "sync.sync_interval", "must be longer than zero"),
    ("[metrics]\ninterval = 0\n", "metrics.interval", "must be longer than zero"),
    ("[metrics]\ninterval = nan\n", "metrics.interval", "is not a duration"),
    ("[metrics]\ninterval = true\n", "metrics.interval", "expected a duration"),
    ('[storage]\ncleanup_age = "-1d"\n', "storage.cleanup_age", "is not a duration"),
    ('[storage]\ncompression = "lz4"\n', "storage.compression", '"lz4" is not one of: none, zstd'),
    ('[sync]\nchunk_size = "32KiB"\n', "sync.chunk_size", "32KiB is outside 64KiB..16MiB"),
    ('[sync]\nchunk_size = "8MiB"\n', "sync.chunk_size", "chunker's limit of 4MiB"),
    ('[sync]\nmax_chunk_size = "32MiB"\n', "sync.max_chunk_size", "outside 64KiB..16MiB"),
    ('[sync]\nmin_chunk_size = "16KiB"\n', "sync.min_chunk_size", "outside 64KiB..16MiB"),
    (
        '[sync]\nmin_chunk_size = "2MiB"\n',
        "sync.min_chunk_size",
        "2MiB is larger than chunk_size (1MiB)",
    ),
    ('[sync]\nmax_chunk_size = "512KiB"\n', "sync.max_chunk_size", "smaller than chunk_size"),
    (
        '[sync]\nchunk_size = "4MiB"\nmin_chunk_size = "2MiB"\n',
        "sync.min_chunk_size",
        "chunker's limit of 1MiB",
    ),
    ('[sync]\nfollow = ["llama*", ""]\n', "sync.follow[1]", "must not be empty"),
    ('[sync]\nfollow = "llama*"\n', "sync.follow", "expected an array of strings"),
    (
        "[replication]\ndefault_min_replicas = 4\n",
        "replication.default_min_replicas",
        "4 is larger than default_max_replicas (3)",
    ),
    (
        "[replication]\ndefault_replication_factor = 5\n",
        "replication.default_replication_factor",
        "outside default_min_replicas..default_max_replicas (1..3)",
    ),
    ("[replication]\ndefault_min_replicas = 0\n", "replication.default_min_replicas", "small"),
    (
        '[replication]\nhealth_check_timeout = "1m"\n',
        "replication.health_check_timeout",
        "longer than health_check_interval",
    ),
    (
        '[network]\nlisten = ["/ip4/1.2.3/tcp/1"]\n',
        "network.listen[0]",
        "\"/ip4/1.2.3/tcp/1\" is not a multiaddr (base address '1.2.3' is not IPv4)",
    ),
    ('[network]\nlisten = ["ip4/0.0.0.0/tcp/1"]\n', "network.listen[0]", "must start with /"),
    ('[network]\nlisten = [""]\n', "network.listen[0]", "must not be empty"),
    ('[network]\nlisten = "/ip4/0.0.0.0/tcp/1"\n', "network.listen", "expected an array"),
    ("[network]\nlisten = [4001]\n", "network.listen[0]", "expected a string, got integer"),
    (
        f'[network]\nbootstrap = ["/ip4/1.2.3.4/tcp/1/p2p/{PEER_A}", "/ip4/1.2.3.4/tcp/4001"]\n',
        "network.bootstrap[1]",
        "must end in /p2p/<peer id>",
    ),
    (
        f'[network]\nbootstrap = ["/ip4/1.2.3.4/tcp/1/p2p/{PEER_A}/p2p-circuit"]\n',
        "network.bootstrap[0]",
        "must end in /p2p/<peer id>",
    ),
    (
        '[network]\nbootstrap = ["/ip4/1.2.3.4/tcp/1/p2p/abc"]\n',
        "network.bootstrap[0]",
        "multiaddr",
    ),
    ('[network]\nallowlist = ["abc"]\n', "network.allowlist[0]", '"abc" is not a peer id'),
    (
        f'[network]\nallowlist = ["{PEER_A}", "{PEER_A[:-2]}"]\n',
        "network.allowlist[1]",
        "is not a peer id",
    ),
    ('[network]\nmdns = "yes"\n', "network.mdns", 'expected true or false, got string "yes"'),
    ('[api]\nlisten = "127.0.0.1"\n', "api.listen", "is not host:port"),
    ('[api]\nlisten = "127.0.0.1:65536"\n', "api.listen", "port must be 0..65535"),
    ('[api]\nlisten = "::1:80"\n', "api.listen", "needs brackets"),
    ('[api]\nupstream = "localhost:11434"\n', "api.upstream", "is not an http(s) URL"),
    ('[api]\nupstream = "ftp://host/"\n', "api.upstream", "is not an http(s) URL"),
    (
        '[api]\nupstream_registry = "ftp://registry.ollama.ai"\n',
        "api.upstream_registry",
        "is not a registry host",
    ),
    (
        '[api]\nupstream_registry = "https://registry.ollama.ai/v2?x=1"\n',
        "api.upstream_registry",
        "is not a registry host",
    ),
    (
        '[storage]\nmodels_dir = "$DMM_TEST_UNSET/models"\n',
        "storage.models_dir",
        "uses $DMM_TEST_UNSET, which is not set",
    ),
]


@pytest.mark.parametrize(("text", "key", "problem"), ERRORS, ids=[e[1] for e in ERRORS])
def test_each_error_is_one_line_naming_file_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, key: str, problem: str
) -> None:
    monkeypatch.delenv("DMM_TEST_UNSET", raising=False)
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {key}: "), message
    assert problem in message
    assert info.value.key == key
    assert info.value.exit_code == 2
    assert isinstance(info.value, ValueError)


def test_the_documented_example_message_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, '[sync]\nchunk_size = "1XB"\n')
    with pytest.raises(ConfigError) as info:
        load_config(Path("node.toml"))
    assert str(info.value) == (
        'node.toml: sync.chunk_size: "1XB" is not a size (use e.g. 1MiB, 512KiB)'
    )


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[node]\nname = "a"\ndata_dir = \n', "line 3, column 12"),
        ('[node]\nname = "a"\nname = "b"\n', "line 3"),
        ("[node", "line 1"),
        ('[sync]\nfollow = ["a",\n', "line 3"),  # "at end of document": the last line
    ],
)
def test_toml_syntax_error_gives_the_line(tmp_path: Path, text: str, where: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {where}")
    assert "invalid TOML" in message


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.toml")
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b'[node]\nname = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(latin1)


# --- valid settings ------------------------------------------------------------------------------


def test_relative_paths_are_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _clean_env: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory must not matter
    monkeypatch.setenv("DMM_TEST_DIR", str(tmp_path / "env"))
    path = _write(
        tmp_path,
        '[node]\ndata_dir = "state"\n'
        '[storage]\nmodels_dir = "../models"\ncache_dir = "~/cache"\n'
        '[sync]\ndelta_dir = "$DMM_TEST_DIR/deltas"\ncas_dir = "${DMM_TEST_DIR}/cas"\n',
        name="etc/node.toml",
    )
    config = load_config(path)
    assert config.path == path
    assert config.node.data_dir == tmp_path / "etc/state"
    assert config.storage.models_dir == tmp_path / "models"  # ".." normalised away
    assert config.storage.cache_dir == _clean_env / "cache"
    assert config.sync.delta_dir == tmp_path / "env/deltas"
    assert config.sync.cas_dir == tmp_path / "env/cas"


def test_data_dir_sub_paths_default_under_data_dir(tmp_path: Path) -> None:
    path = _write(tmp_path, '[node]\ndata_dir = "/var/lib/dmm"\n')
    config = load_config(path)
    assert config.storage.cache_dir == Path("/var/lib/dmm/cache")
    assert config.sync.delta_dir == Path("/var/lib/dmm/deltas")
    assert config.sync.cas_dir == Path("/var/lib/dmm/cas")


def test_relative_config_path_names_the_file_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, '[node]\ndata_dir = "d"\n', name="conf/node.toml")
    config = load_config(Path("conf/node.toml"))
    assert config.path == tmp_path / "conf/node.toml"
    assert config.node.data_dir == tmp_path / "conf/d"


@pytest.mark.parametrize("written", [None, '""'])
def test_ollama_models_is_honoured_when_the_file_does_not_set_models_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, written: str | None
) -> None:
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "om"))
    text = "[storage]\n" + (f"models_dir = {written}\n" if written else "")
    assert load_config(_write(tmp_path, text)).storage.models_dir == tmp_path / "om"
    assert load_config(None).storage.models_dir == tmp_path / "om"


def test_models_dir_in_the_file_beats_ollama_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "om"))
    path = _write(tmp_path, '[storage]\nmodels_dir = "/srv/models"\n')
    assert load_config(path).storage.models_dir == Path("/srv/models")


def test_empty_ollama_models_means_unset(monkeypatch: pytest.MonkeyPatch, _clean_env: Path) -> None:
    monkeypatch.setenv("OLLAMA_MODELS", "")
    assert load_config(None).storage.models_dir == _clean_env / ".ollama/models"


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ('chunk_size = "4MiB"', (1 * MiB, 4 * MiB, 8 * MiB)),
        # chunk_size/4 would be 16KiB: the derived minimum is raised to the 64KiB floor.
        ('chunk_size = "64KiB"', (64 * KiB, 64 * KiB, 128 * KiB)),
        ('chunk_size = 1048576\nmin_chunk_size = "512KiB"', (512 * KiB, 1 * MiB, 2 * MiB)),
        ('chunk_size = "256KiB"\nmax_chunk_size = "16MiB"', (64 * KiB, 256 * KiB, 16 * MiB)),
        ('min_chunk_size = "1MiB"\nmax_chunk_size = "1MiB"', (1 * MiB, 1 * MiB, 1 * MiB)),
    ],
)
def test_chunk_sizes(tmp_path: Path, settings: str, expected: tuple[int, int, int]) -> None:
    sync = load_config(_write(tmp_path, f"[sync]\n{settings}\n")).sync
    assert (sync.min_chunk_size, sync.chunk_size, sync.max_chunk_size) == expected


def test_a_full_custom_config(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        f"""
[node]
name = "lab-01"
[node.tags]
region = "eu-west"
storage_class = "ssd"
[storage]
compression = "zstd"
upload_rate_limit = "50MiB"
cleanup_age = "36h"
[sync]
follow = ["llama3*", "library/qwen*"]
[replication]
default_min_replicas = 2
default_replication_factor = 3
default_max_replicas = 5
health_check_interval = "1m"
health_check_timeout = "1m"
[network]
listen = ["/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/4001"]
bootstrap = [
    "/ip4/192.168.1.10/tcp/4001/p2p/{PEER_A}",
    "/dns4/seed.example.org/tcp/4001/p2p/{PEER_B}",
    "/ip4/1.2.3.4/tcp/1/p2p/{PEER_B}/p2p-circuit/p2p/{PEER_A}",
]
mdns = false
allowlist = ["{PEER_A}", "{PEER_B}"]
[api]
listen = "[::1]:8080"
upstream = "http://127.0.0.1:11434/"
upstream_registry = "registry.example.org:5000"
[metrics]
enabled = false
interval = 30
""",
    )
    config = load_config(path)
    assert config.node.name == "lab-01"
    assert dict(config.node.tags) == {"region": "eu-west", "storage_class": "ssd"}
    with pytest.raises(TypeError):
        config.node.tags["region"] = "us"  # type: ignore[index]
    assert config.storage.compression == "zstd"
    assert config.storage.upload_rate_limit == 50 * MiB
    assert config.storage.cleanup_age == 36 * 3600
    assert config.sync.follow == ("llama3*", "library/qwen*")
    assert config.replication.default_max_replicas == 5
    assert config.network.mdns is False
    assert len(config.network.bootstrap) == 3
    assert config.network.allowlist == (PEER_A, PEER_B)
    assert (config.api.host, config.api.port, config.api.listen) == ("::1", 8080, "[::1]:8080")
    assert config.api.upstream == "http://127.0.0.1:11434"
    assert config.api.upstream_registry == "registry.example.org:5000"
    assert config.metrics.enabled is False
    assert config.metrics.interval == 30.0


# --- which file ----------------------------------------------------------------------------------


def test_resolve_explicit_path_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = _write(tmp_path, "", name="a.toml")
    monkeypatch.setenv("DMM_CONFIG", str(_write(tmp_path, "", name="b.toml")))
    assert resolve_config_path(str(explicit)) == explicit


def test_resolve_dmm_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, "")  # ./node.toml exists but $DMM_CONFIG comes first
    chosen = _write(tmp_path, "", name="env.toml")
    monkeypatch.setenv("DMM_CONFIG", str(chosen))
    assert resolve_config_path(None) == chosen


@pytest.mark.parametrize(
    ("use_env", "how"), [(False, "named by --config"), (True, "named by $DMM_CONFIG")]
)
def test_resolve_missing_named_file_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use_env: bool, how: str
) -> None:
    missing = str(tmp_path / "nope.toml")
    if use_env:
        monkeypatch.setenv("DMM_CONFIG", missing)
    with pytest.raises(ConfigError) as info:
        resolve_config_path(None if use_env else missing)
    assert str(info.value) == f"{missing}: file not found ({how})"
    assert info.value.exit_code == 2


def test_resolve_a_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a file"):
        resolve_config_path(str(tmp_path))


def test_resolve_falls_back_to_cwd_then_home_then_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _clean_env: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("DMM_CONFIG", "")  # empty counts as unset
    assert resolve_config_path(None) is None
    user = _write(_clean_env, "", name=".config/dmm/node.toml")
    assert resolve_config_path(None) == user
    _write(work, "")
    assert resolve_config_path(None) == Path("node.toml")


@pytest.mark.parametrize(
    ("value", "url"),
    [
        ("registry.ollama.ai", "https://registry.ollama.ai"),
        ("registry.example.org:5000", "https://registry.example.org:5000"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("https://mirror.example.org/", "https://mirror.example.org"),
        ("", None),
    ],
)
def test_upstream_registry_forms(tmp_path: Path, value: str, url: str | None) -> None:
    config = load_config(_write(tmp_path, f'[api]\nupstream_registry = "{value}"\n'))
    assert config.api.upstream_registry_url == url
