"""node/changes.py: waiters wake on each change, from the loop or a worker thread, and a
condition over several sources wakes on any of them."""

from __future__ import annotations

import trio
import trio.testing

from node.changes import Changes, wait_until_any


async def test_wait_until_returns_at_once_when_true_and_after_the_change_that_makes_it_so() -> None:
    changes = Changes()
    state = {"n": 0}
    with trio.fail_after(5):
        await changes.wait_until(lambda: True)  # no change needed
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def waiter() -> None:
                await changes.wait_until(lambda: state["n"] >= 2)
                done.set()

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            state["n"] = 1
            changes.notify()
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()  # woke, re-checked, waits again
            state["n"] = 2
            # From a worker thread, as store writes notify.
            await trio.to_thread.run_sync(changes.notify)
            await done.wait()
    assert changes.count == 2


async def test_wait_until_any_wakes_on_any_source() -> None:
    sources = [Changes(), Changes(), Changes()]
    flags = [False, False, False]
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def waiter() -> None:
                await wait_until_any(sources, lambda: flags[2])
                done.set()

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            sources[0].notify()  # an unrelated change: re-checked, still waiting
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()
            flags[2] = True
            sources[2].notify()
            await done.wait()


def test_a_notify_after_the_run_ended_is_harmless() -> None:
    holder: list[Changes] = []

    async def main() -> None:
        holder.append(Changes())

    trio.run(main)
    import threading

    thread = threading.Thread(target=holder[0].notify)
    thread.start()
    thread.join()
