"""The audit log: JSON lines with every field, written off the event loop, rotated by size,
bounded in memory; and the node writes lines for pulls, deletes and refusals."""

from __future__ import annotations

import threading
from pathlib import Path

import trio

from node.audit import MAX_PENDING, AuditLog
from node.daemon import open_node
from node.testing import node_config
from tests._security import audit_lines
from tests.conftest import MakeModel

FIELDS = {"time", "peer", "action", "model", "version", "outcome", "reason"}


async def test_lines_have_every_field_and_reasons_are_one_short_line(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a" / "audit.log")
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        log.record("pull", peer="12D3KooWx", model="m:1", version="ab", reason=None)
        log.record("connect", peer="p", outcome="refused", reason="a\nmulti  line\treason" * 50)
        with trio.fail_after(10):
            await log.flush()
        nursery.cancel_scope.cancel()
    lines = audit_lines(tmp_path / "a" / "audit.log")
    assert [set(line) for line in lines] == [FIELDS, FIELDS]
    assert lines[0]["action"] == "pull" and lines[0]["outcome"] == "ok"
    assert lines[0]["time"].endswith("Z") and lines[0]["model"] == "m:1"
    reason = lines[1]["reason"]
    assert "\n" not in reason and "\t" not in reason and len(reason) == 300
    assert (tmp_path / "a" / "audit.log").stat().st_mode & 0o777 == 0o600


async def test_rotation_keeps_n_files_of_bounded_size(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path, max_size=4096, keep=3)
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        with trio.fail_after(30):
            for i in range(400):
                log.record("request", peer=f"peer{i}", outcome="refused", reason=f"line {i}")
                if i % 20 == 19:
                    await log.flush()
            await log.flush()
        nursery.cancel_scope.cancel()
    files = log.files()
    assert files == [path, *(tmp_path / f"audit.log.{n}" for n in (1, 2, 3))]
    assert not (tmp_path / "audit.log.4").exists()
    assert all(f.stat().st_size <= 4096 for f in files)
    # Newest first across files, nothing lost within the kept files, every line whole.
    kept = [line for f in reversed(files) for line in audit_lines(f)]
    numbers = [int(line["reason"].split()[1]) for line in kept]
    assert numbers == list(range(numbers[0], 400))
    assert len(numbers) >= 4 * 20  # four files of at least one 20-line batch each


async def test_flush_waits_for_lines_queued_while_a_batch_is_being_written(
    tmp_path: Path,
) -> None:
    # The batch on its way to disk does not hold the line queued after it was taken;
    # flush must wait for the next batch too, not return when the first one lands.
    log = AuditLog(tmp_path / "audit.log")
    writing, release = threading.Event(), threading.Event()
    real_write = log._write

    def slow_write(lines: list[str]) -> None:
        writing.set()
        release.wait(10)
        real_write(lines)

    log._write = slow_write  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        log.record("pull", model="first:1")
        with trio.fail_after(10):
            flushed_first = trio.Event()

            async def flush_first() -> None:
                await log.flush()
                flushed_first.set()

            nursery.start_soon(flush_first)
            await trio.to_thread.run_sync(writing.wait, 10)
            log.record("pull", model="second:1")
            release.set()
            await log.flush()
            # Read before cancelling: the writer's last act writes whatever is queued.
            lines = audit_lines(tmp_path / "audit.log")
            await flushed_first.wait()
        nursery.cancel_scope.cancel()
    assert [line["model"] for line in lines] == ["first:1", "second:1"]


async def test_record_from_threads_never_blocks_and_overflow_is_counted(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    # Nothing writes yet: the buffer fills to its bound, the rest is only counted.
    threads = [
        threading.Thread(
            target=lambda: [log.record("fetch", reason="x") for _ in range(MAX_PENDING // 2 + 10)]
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert log.dropped == 20
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        with trio.fail_after(20):
            await log.flush()
        nursery.cancel_scope.cancel()
    lines = audit_lines(tmp_path / "audit.log")
    assert len(lines) == MAX_PENDING + 1
    assert lines[-1]["action"] == "audit" and "20 audit lines dropped" in lines[-1]["reason"]


async def test_disabled_log_writes_nothing(tmp_path: Path) -> None:
    log = AuditLog(None)
    log.record("pull", model="m")
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        await log.flush()
        nursery.cancel_scope.cancel()
    assert log.files() == [] and list(tmp_path.iterdir()) == []


async def test_node_audits_pull_and_delete(tmp_path: Path, make_model: MakeModel) -> None:
    a_config = node_config(tmp_path, "a")
    with trio.fail_after(90):
        async with open_node(a_config) as a:
            gguf = make_model("audited.gguf", size=3 * 1024 * 1024)
            await trio.to_thread.run_sync(lambda: a.store.add_model("audited:v1", gguf))
            await a.refresh()
            b_config = node_config(tmp_path, "b", [a.host.listen_addrs[0]])
            async with open_node(b_config) as b:

                async def quiet(event: object) -> None:
                    pass

                result = await b.pull("audited:v1", quiet)
                try:
                    await b.pull("missing:v1", quiet)
                except Exception as exc:  # PullError: nobody has it
                    failure = str(exc)
                await trio.to_thread.run_sync(b.store.remove, "audited:v1")
                await b.refresh()
                await b.audit.flush()
                lines = audit_lines(b_config.audit.path)
    pulls = [line for line in lines if line["action"] == "pull"]
    assert pulls[0] == {
        **pulls[0],
        "peer": a.peer_id,
        "model": "audited:v1",
        "version": result["version"],
        "outcome": "ok",
    }
    assert len(result["version"]) == 64
    assert pulls[1]["outcome"] == "failed" and pulls[1]["reason"] == failure
    deletes = [line for line in lines if line["action"] == "delete"]
    assert [d["model"] for d in deletes] == ["registry.ollama.ai/library/audited:v1"]


async def test_node_audits_push_replicate_and_policy_changes(
    tmp_path: Path, make_model: MakeModel
) -> None:
    from node.replication_policy import parse_policy

    with trio.fail_after(120):
        async with open_node(node_config(tmp_path, "a")) as a:
            gguf = make_model("held.gguf", size=2 * 1024 * 1024)
            await trio.to_thread.run_sync(lambda: a.store.add_model("held:v1", gguf))
            b_config = node_config(tmp_path, "b", [a.host.listen_addrs[0]])
            async with open_node(b_config) as b:
                # b dials a in the background; a asks b over that connection.
                await a.host.wait_connected(b.peer_id)
                await a.push("held:v1")
                await a.replication.set_replication_policy(
                    parse_policy({"glob": "held*", "min_replicas": 1}, a.replication.defaults)
                )
                await a.sync.set_policy({"glob": "other*"})
                await a.sync.remove_policy("other*")
                answer = await a.replication.replicate_model("held:v1", b.peer_id)
                await a.audit.flush()
                await b.audit.flush()
                a_lines = audit_lines(a.config.audit.path)
                b_lines = audit_lines(b_config.audit.path)
    by_action = {line["action"]: line for line in a_lines}
    assert by_action["push"]["model"] == "held:v1" and len(by_action["push"]["version"]) == 64
    policies = [line for line in a_lines if line["action"] == "policy"]
    assert [p["model"] for p in policies] == ["held*", "other*", "other*"]
    assert policies[0]["reason"].startswith("replication: min 1")
    assert policies[2]["reason"] == "sync: removed"
    # The request, on both sides: who asked whom, about what, and the answer.
    asked = [line for line in a_lines if line["action"] == "replicate"]
    assert asked and asked[-1]["peer"] == b.peer_id and asked[-1]["model"] == "held:v1"
    answered = [line for line in b_lines if line["action"] == "replicate"]
    assert answered and answered[-1]["peer"] == a.peer_id
    assert answer["code"] in ("accepted", "holding")


async def test_only_peers_with_the_replicator_role_are_asked(
    tmp_path: Path, make_model: MakeModel
) -> None:
    with trio.fail_after(120):
        async with open_node(node_config(tmp_path, "b")) as b:
            rules = f'[[access]]\npeers = ["{b.peer_id}"]\nmodels = "*"\nroles = ["reader"]\n'
            a_config = node_config(tmp_path, "a", [b.host.listen_addrs[0]], extra=rules)
            async with open_node(a_config) as a:
                gguf = make_model("kept.gguf", size=1024 * 1024)
                await trio.to_thread.run_sync(lambda: a.store.add_model("kept:v1", gguf))
                answer = await a.replication.replicate_model("kept:v1", b.peer_id)
                await b.audit.flush()
                b_lines = audit_lines(b.config.audit.path)
    assert answer["code"] == "policy" and "no replicator role" in answer["reason"]
    assert not [line for line in b_lines if line["action"] == "replicate"]  # never asked
