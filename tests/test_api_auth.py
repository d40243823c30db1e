"""HTTP API auth: loopback needs no token; any other address needs one, checked on every
request but GET / and /api/version; a node off loopback without a token does not start."""

from __future__ import annotations

from pathlib import Path

import httpx
import ollama
import pytest
import trio

from node.config import ConfigError, load_config
from node.daemon import open_node
from node.testing import free_port
from tests._security import audit_lines, config, write_config
from tests.conftest import dmm

TOKEN = "s3cret-token-0123456789abcdef"


def test_config_refuses_a_public_api_without_a_token(tmp_path: Path) -> None:
    path = write_config(tmp_path, "open", api='listen = "0.0.0.0:11435"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: api.listen: 0.0.0.0 is not a loopback address")
    assert "api.token" in message


def test_node_start_without_a_token_exits_2_with_one_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, "open", api=f'listen = "0.0.0.0:{free_port()}"\n')
    proc = dmm(path, "node", "start", check=2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "api.listen" in lines[0] and "token" in lines[0], proc.stderr


@pytest.mark.parametrize(
    ("api", "key", "problem"),
    [
        ('listen = "0.0.0.0:0"\ntoken = "short"\n', "api.token", "at least 16"),
        ('listen = "0.0.0.0:0"\ntoken_file = "missing.txt"\n', "api.token_file", "cannot read"),
        (
            f'listen = "0.0.0.0:0"\ntoken = "{TOKEN}"\ntoken_file = "t.txt"\n',
            "api.token_file",
            "not both",
        ),
    ],
)
def test_bad_tokens_are_config_errors(tmp_path: Path, api: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, "n", api=api))
    assert err.value.key == key and problem in str(err.value)
    assert TOKEN not in str(err.value)  # a token never appears in an error


def test_token_file_is_read_and_kept_out_of_repr(tmp_path: Path) -> None:
    (tmp_path / "n").mkdir()
    (tmp_path / "n" / "token.txt").write_text(TOKEN + "\n")
    loaded = config(tmp_path, "n", api='listen = "0.0.0.0:0"\ntoken_file = "token.txt"\n')
    assert loaded.api.token == TOKEN
    assert TOKEN not in repr(loaded)


def test_loopback_needs_no_token(tmp_path: Path) -> None:
    assert config(tmp_path, "n").api.token is None


async def test_public_api_requires_the_bearer_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(tmp_path, "pub", api=f'listen = "0.0.0.0:0"\ntoken = "{TOKEN}"\n')
    with trio.fail_after(60):
        async with open_node(cfg) as node:
            port = node.api_urls[0].rsplit(":", 1)[1]
            base = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=base, timeout=20) as client:
                # Probes stay open so Ollama clients can see a server is up.
                assert (await client.get("/")).status_code == 200
                assert (await client.get("/api/version")).status_code == 200
                for path in ("/api/tags", "/api/peers", "/api/status"):
                    refused = await client.get(path)
                    assert refused.status_code == 401, path
                    assert refused.headers["www-authenticate"].startswith("Bearer")
                    assert "error" in refused.json()
                wrong = await client.get("/api/tags", headers={"authorization": "Bearer nope"})
                assert wrong.status_code == 401
                basic = await client.get("/api/tags", headers={"authorization": f"Basic {TOKEN}"})
                assert basic.status_code == 401
                posted = await client.post("/api/pull", json={"model": "x:y"})
                assert posted.status_code == 401
                ok = await client.get("/api/tags", headers={"authorization": f"Bearer {TOKEN}"})
                assert ok.status_code == 200 and ok.json() == {"models": []}

            # The official Ollama client passes the token as a header.
            def listed() -> object:
                headers = {"authorization": f"Bearer {TOKEN}"}
                return ollama.Client(host=base, headers=headers).list()

            assert list(await trio.to_thread.run_sync(listed)) == [("models", [])]
            # ...and reads it from OLLAMA_API_KEY, as the README says.
            monkeypatch.setenv("OLLAMA_API_KEY", TOKEN)
            from_env = await trio.to_thread.run_sync(lambda: ollama.Client(host=base).list())
            assert list(from_env) == [("models", [])]
            await node.audit.flush()
            refusals = [e for e in audit_lines(cfg.audit.path) if e["action"] == "api"]
            assert len(refusals) == 6 and all(e["outcome"] == "refused" for e in refusals)
            assert all(TOKEN not in str(e) for e in audit_lines(cfg.audit.path))


async def test_cli_sends_the_configured_token(tmp_path: Path) -> None:
    port = free_port()
    path = write_config(tmp_path, "pub", api=f'listen = "0.0.0.0:{port}"\ntoken = "{TOKEN}"\n')
    with trio.fail_after(90):
        async with open_node(load_config(path)) as node:
            proc = await trio.to_thread.run_sync(lambda: dmm(path, "peers", "--json"))
            assert '"peers": []' in proc.stdout
            # The same node, asked by a CLI without the token, refuses it.
            other = write_config(tmp_path, "cli", api=f'listen = "127.0.0.1:{port}"\n')
            refused = await trio.to_thread.run_sync(lambda: dmm(other, "peers", check=1))
            assert "401" in refused.stderr and "unauthorized" in refused.stderr
            assert node.peer_id
