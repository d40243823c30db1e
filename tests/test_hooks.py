"""Model hooks: Python and shell hooks, pre-hooks that abort with their message (API, Ollama
client, CLI), post hooks that get the event in their environment, and the default hooks'
counts in /api/status."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import ollama
import pytest
import trio

from node.config import ConfigError, load_config
from node.daemon import open_node
from node.hooks import EVENTS, HookError, HookEvent, Hooks
from node.testing import node_config
from storage.names import parse_model_name
from tests.conftest import MakeModel, dmm
from tests.test_ollama_api import _add, _connected, cli_config

MiB = 1024 * 1024


async def test_python_hooks_sync_and_async_in_order() -> None:
    hooks = Hooks()
    seen: list[tuple[str, str, str]] = []

    def sync_hook(event: HookEvent) -> None:
        seen.append(("sync", event.event, event.model))

    async def async_hook(event: HookEvent) -> None:
        seen.append(("async", event.event, str(event.details["digest"])))

    hooks.add("post-pull", sync_hook)
    hooks.add("post-pull", async_hook)
    with trio.fail_after(10):
        await hooks.fire("post-pull", "m:v1", digest="sha256:ab")
    assert seen == [("sync", "post-pull", "m:v1"), ("async", "post-pull", "sha256:ab")]
    with pytest.raises(ValueError, match="unknown hook event"):
        hooks.add("pre-dance", sync_hook)


async def test_failing_pre_hook_aborts_and_post_hook_failure_is_only_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hooks = Hooks()
    hooks.setup_default_hooks()
    later: list[str] = []

    def refuse(event: HookEvent) -> None:
        raise RuntimeError("model is embargoed until monday")

    async def never(event: HookEvent) -> None:
        later.append(event.event)

    hooks.add("pre-delete", refuse)
    hooks.add("pre-delete", never)
    hooks.add("post-delete", refuse)
    hooks.add("post-delete", never)
    with trio.fail_after(10):
        with pytest.raises(HookError) as refused:
            await hooks.fire("pre-delete", "m:v1")
        assert refused.value.message == "model is embargoed until monday"
        assert "pre-delete" in str(refused.value) and "m:v1" in str(refused.value)
        with caplog.at_level(logging.WARNING, logger="dmm.hooks"):
            await hooks.fire("post-delete", "m:v1")  # does not raise
    assert later == ["post-delete"]  # a pre-hook failure stops the rest; a post one does not
    assert "embargoed" in caplog.text
    assert hooks.counts == {"pre-delete": 1, "post-delete": 1}
    assert hooks.failures == {"pre-delete": 1, "post-delete": 1}
    assert set(hooks.listing()) == set(EVENTS)


async def test_shell_hook_timeout_aborts_a_pre_event() -> None:
    hooks = Hooks({"pre-push": ("sleep 10",)}, timeout=0.3)
    with trio.fail_after(10), pytest.raises(HookError, match=r"did not finish within 0\.3s"):
        await hooks.fire("pre-push", "m:v1")


def _hooks_toml(**events: str) -> str:
    lines = ["[hooks]", 'timeout = "20s"']
    lines += [f"{event} = ['{command}']" for event, command in events.items()]
    return "\n".join(lines) + "\n"


@pytest.mark.slow
async def test_pre_pull_shell_hook_refuses_with_its_message(
    tmp_path: Path, make_model: MakeModel
) -> None:
    refuse = "echo checking >&2; echo pulls of $DMM_MODEL are not allowed here >&2; exit 1"
    async with open_node(node_config(tmp_path, "a")) as a:
        await _add(a, make_model, "held:v1")
        extra = _hooks_toml(**{"pre-pull": refuse})
        config = node_config(tmp_path, "b", [a.host.listen_addrs[0]], extra=extra)
        async with open_node(config) as b:
            message = "pulls of held:v1 are not allowed here"
            async with httpx.AsyncClient(base_url=b.api_urls[0], timeout=30) as http:
                with trio.fail_after(30):
                    r = await http.post("/api/pull", json={"model": "held:v1", "stream": False})
            assert r.status_code == 403 and message in r.json()["error"]
            with trio.fail_after(30), pytest.raises(ollama.ResponseError) as streamed:
                async for _ in await ollama.AsyncClient(host=b.api_urls[0]).pull(
                    "held:v1", stream=True
                ):
                    pass
            assert message in streamed.value.error
            cli = cli_config(tmp_path, b)
            proc = await trio.to_thread.run_sync(lambda: dmm(cli, "pull", "held:v1", check=1))
            assert message in proc.stderr
            # Nothing moved.
            assert b.store.layout.read(parse_model_name("held:v1")) is None
            assert b.store.cas.list_digests() == []
            status = (await b.status())["hooks"]
            assert status["counts"]["pre-pull"] == 3 and status["failures"]["pre-pull"] == 3
            assert "post-pull" not in status["counts"]


@pytest.mark.slow
async def test_post_hooks_get_the_event_in_their_environment(
    tmp_path: Path, make_model: MakeModel
) -> None:
    out = tmp_path / "hook-env"
    out.mkdir()
    record = f"env | grep ^DMM_ | sort > {out}/$DMM_EVENT"
    async with open_node(node_config(tmp_path, "a")) as a:
        await _add(a, make_model, "watched:v1")
        extra = _hooks_toml(
            **{
                "post-pull": record,
                "post-delete": record,
                "pre-delete": 'test "$DMM_MODEL" != "kept:v1" || { echo kept >&2; exit 3; }',
            }
        )
        config = node_config(tmp_path, "b", [a.host.listen_addrs[0]], extra=extra)
        async with open_node(config) as b:
            client = ollama.AsyncClient(host=b.api_urls[0])
            await _connected(b, a)
            with trio.fail_after(60):
                assert (await client.pull("watched:v1")).status == "success"
            env = _read_env(out / "post-pull")
            assert env["DMM_EVENT"] == "post-pull" and env["DMM_MODEL"] == "watched:v1"
            assert env["DMM_DIGEST"] == b.store.get("watched:v1").digest
            assert env["DMM_STATUS"] == "success"
            assert int(env["DMM_BYTES_FETCHED"]) > MiB
            with trio.fail_after(30):
                await client.copy("watched:v1", "kept:v1")
                await client.delete("watched:v1")
                env = _read_env(out / "post-delete")
                assert env["DMM_EVENT"] == "post-delete" and env["DMM_MODEL"] == "watched:v1"
                with pytest.raises(ollama.ResponseError) as refused:
                    await client.delete("kept:v1")
            assert refused.value.status_code == 403 and "kept" in refused.value.error
            assert b.store.layout.read(parse_model_name("kept:v1")) is not None
            # The default hooks counted every event, visible to `dmm node status`.
            counts = (await b.status())["hooks"]["counts"]
            assert counts == {"pre-pull": 1, "post-pull": 1, "pre-delete": 2, "post-delete": 1}
            cli = cli_config(tmp_path, b)
            proc = await trio.to_thread.run_sync(lambda: dmm(cli, "node", "status"))
            assert "pre-delete: `test" in proc.stdout and "post-pull 1" in proc.stdout
            # `dmm rm` goes through the running node, so its hooks apply there too.
            proc = await trio.to_thread.run_sync(lambda: dmm(cli, "rm", "kept:v1", check=1))
            assert "kept" in proc.stderr.splitlines()[-1]
            assert b.store.layout.read(parse_model_name("kept:v1")) is not None
            assert b.hooks.counts["pre-delete"] == 3


def _read_env(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines)


async def test_node_add_model_hook_sees_pulls(tmp_path: Path, make_model: MakeModel) -> None:
    async with open_node(node_config(tmp_path, "a")) as a:
        await _add(a, make_model, "seen:v1")
        async with open_node(node_config(tmp_path, "b", [a.host.listen_addrs[0]])) as b:
            events: list[HookEvent] = []
            pulled = trio.Event()

            async def watch(event: HookEvent) -> None:
                events.append(event)
                if event.event == "post-pull":
                    pulled.set()

            b.add_model_hook("pre-pull", watch)
            b.add_model_hook("post-pull", watch)

            async def quiet(event: dict[str, object]) -> None:
                pass

            await _connected(b, a)
            with trio.fail_after(60):
                await b.pull("seen:v1", quiet)
                await pulled.wait()
            assert [(e.event, e.model) for e in events] == [
                ("pre-pull", "seen:v1"),
                ("post-pull", "seen:v1"),
            ]
            # Other managers fire their own events through the same object.
            await b.hooks.fire("on-replica-change", "seen:v1", replicas=2)
            assert b.hooks.counts["on-replica-change"] == 1


def test_hooks_config_section(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text("[hooks]\ntimeout = \"5s\"\npre-pull = ['exit 0', 'true']\n")
    config = load_config(path)
    assert config.hooks.timeout == 5
    assert dict(config.hooks.commands) == {"pre-pull": ("exit 0", "true")}
    assert dict(load_config(None).hooks.commands) == {}
    for text, problem in (
        ("[hooks]\npre-pul = []\n", "hooks.pre-pul: unknown key (did you mean pre-pull?)"),
        ("[hooks]\npost-push = 'echo'\n", "hooks.post-push: expected an array of strings"),
        ("[hooks]\npost-push = ['']\n", "hooks.post-push[0]: must not be empty"),
        ('[hooks]\ntimeout = "0s"\n', "hooks.timeout"),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError) as bad:
            load_config(path)
        assert problem in str(bad.value) and "\n" not in str(bad.value)


async def test_a_refused_followed_pull_leaves_the_node_up(
    tmp_path: Path, make_model: MakeModel
) -> None:
    async with open_node(node_config(tmp_path, "a")) as a:
        extra = '[sync]\nfollow = ["auto*"]\n'
        config = node_config(tmp_path, "follower", [a.host.listen_addrs[0]], extra=extra)
        async with open_node(config) as follower:
            refused = trio.Event()

            async def refuse_async(event: HookEvent) -> None:
                refused.set()
                raise RuntimeError("not on this machine")

            follower.add_model_hook("pre-pull", refuse_async)
            with trio.fail_after(20):
                await follower.host.wait_connected(a.peer_id)
                await follower.announcer.wait_for_peer(a.peer_id)
            await _add(a, make_model, "auto-model:v1")
            with trio.fail_after(60):
                await refused.wait()
            async with httpx.AsyncClient(base_url=follower.api_urls[0], timeout=10) as http:
                assert (await http.get("/api/health")).json()["status"] == "ok"
            assert follower.store.list_models() == []
            assert follower.hooks.failures["pre-pull"] == 1


async def test_pre_push_hook_refuses_and_post_push_gets_the_version(
    tmp_path: Path, make_model: MakeModel
) -> None:
    out = tmp_path / "pushed.env"
    extra = _hooks_toml(
        **{
            "pre-push": 'test "$DMM_MODEL" != "secret:v1" || { echo secret stays >&2; exit 1; }',
            "post-push": f"env | grep ^DMM_ > {out}",
        }
    )
    async with open_node(node_config(tmp_path, "p", extra=extra)) as node:
        await _add(node, make_model, "secret:v1")
        await _add(node, make_model, "public:v1")
        client = ollama.AsyncClient(host=node.api_urls[0])
        with trio.fail_after(30):
            with pytest.raises(ollama.ResponseError) as refused:
                await client.push("secret:v1")
            assert refused.value.status_code == 403
            assert "secret stays" in refused.value.error
            assert "post-push" not in node.hooks.counts  # refused before anything was published
            assert not out.exists()
            assert (await client.push("public:v1")).status == "success"
        env = _read_env(out)
        assert env["DMM_MODEL"] == "public:v1" and env["DMM_EVENT"] == "post-push"
        assert env["DMM_DIGEST"] == node.store.get("public:v1").digest
        assert len(env["DMM_VERSION"]) == 64
