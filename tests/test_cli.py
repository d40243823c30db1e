"""The dmm command as a person runs it: real processes, a real config file, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MakeModel, dmm

MiB = 1024 * 1024


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(
        '[node]\ndata_dir = "data"\n[storage]\nmodels_dir = "models"\ncleanup_age = "1h"\n'
    )
    return path


def test_id_is_stable_and_private(config: Path) -> None:
    first = dmm(config, "id").stdout.strip()
    assert first.startswith("12D3KooW")
    assert dmm(config, "id").stdout.strip() == first
    key = config.parent / "data" / "identity.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert json.loads(dmm(config, "id", "--json").stdout)["peer_id"] == first


def test_add_ls_show_rm_gc(config: Path, make_model: MakeModel, tmp_path: Path) -> None:
    gguf = make_model(size=3 * MiB, chat_template="{{ .Prompt }}")
    template = tmp_path / "template.txt"
    template.write_text("{{ .System }} {{ .Prompt }}")
    params = tmp_path / "params.json"
    params.write_text('{"temperature": 0.2, "stop": ["</s>"]}')
    out = dmm(
        config, "add", "demo:v1", str(gguf), "--template", str(template), "--params", str(params)
    )
    assert "added demo:v1" in out.stdout
    listing = dmm(config, "ls").stdout
    assert listing.splitlines()[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    assert "demo:v1" in listing
    models = json.loads(dmm(config, "ls", "--json").stdout)["models"]
    assert [m["name"] for m in models] == ["demo:v1"]
    shown = json.loads(dmm(config, "show", "demo:v1", "--json").stdout)
    assert shown["details"]["format"] == "gguf"
    assert shown["model_info"]["general.architecture"] == "llama"
    assert shown["template"] == "{{ .System }} {{ .Prompt }}"
    assert json.loads(shown["parameters"])["temperature"] == 0.2
    text = dmm(config, "show", "demo:v1").stdout
    assert "architecture" in text and "llama" in text and "Layers" in text
    assert "deleted 'demo:v1'" in dmm(config, "rm", "demo:v1").stdout
    assert dmm(config, "show", "demo:v1", check=1).stderr.startswith("dmm: model demo:v1")
    dry = json.loads(dmm(config, "gc", "--dry-run", "--older-than", "0s", "--json").stdout)
    assert len(dry["removed"]) == 4  # model, template, params and config blobs
    gc = json.loads(dmm(config, "gc", "--older-than", "0s", "--json").stdout)
    assert gc["removed"] == dry["removed"]
    assert list((config.parent / "models" / "blobs").glob("sha256-*")) == []


def test_verify_exit_code_and_report(config: Path, make_model: MakeModel) -> None:
    gguf = make_model(size=2 * MiB)
    added = json.loads(dmm(config, "add", "demo", str(gguf), "--json").stdout)
    assert json.loads(dmm(config, "verify", "--json").stdout)["ok"] is True
    blob = config.parent / "models" / "blobs" / ("sha256-" + added["model_blob"][7:])
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    proc = dmm(config, "verify", check=1)
    assert "corrupt: " + added["model_blob"] in proc.stdout
    assert "breaks demo:latest" in proc.stdout


def test_import_from_another_store(config: Path, make_model: MakeModel, tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text('[node]\ndata_dir = "other-data"\n[storage]\nmodels_dir = "other-models"\n')
    dmm(other, "add", "shared:1", str(make_model(size=2 * MiB)))
    first = json.loads(
        dmm(config, "import", "--from", str(tmp_path / "other-models"), "--json").stdout
    )
    assert first["new"] == ["shared:1"] and first["blobs_linked"] >= 2
    second = json.loads(
        dmm(config, "import", "--from", str(tmp_path / "other-models"), "--json").stdout
    )
    assert (
        second["new"] == [] and second["unchanged"] == ["shared:1"] and second["blobs_indexed"] == 0
    )


@pytest.mark.parametrize(
    "args,code,needle",
    [
        (["add", "../../etc", "x.gguf"], 2, "'..'"),
        (["add", "ok", "/nonexistent.gguf"], 1, "no such file"),
        (["show", "a\x01b"], 2, "invalid model"),
        (["gc", "--older-than", "soon"], 2, "--older-than"),
        (["import", "--from", "/nonexistent"], 2, "not an Ollama models directory"),
        (["frobnicate"], 2, "invalid choice"),
    ],
)
def test_bad_usage_gives_one_line_and_exit_code(
    config: Path, args: list[str], code: int, needle: str
) -> None:
    proc = dmm(config, *args, check=code)
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_config_exits_2_naming_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "node.toml"
    bad.write_text('[sync]\nchunk_size = "1XB"\n')
    proc = dmm(bad, "ls", check=2)
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "node.toml" in line and "sync.chunk_size" in line


def test_help_lists_every_command(config: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "node.cli", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    for command in ("id", "add", "import", "ls", "show", "rm", "verify", "gc"):
        assert command in out
