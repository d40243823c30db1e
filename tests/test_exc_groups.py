"""node/exc_groups.py and node/pull.plain_pull_errors: what a nursery's failure really was."""

from __future__ import annotations

import pytest
import trio

from node.exc_groups import first_leaf, only, sole_error
from node.pull import PullError, plain_pull_errors


async def _group_with_cancelled(error: BaseException) -> BaseExceptionGroup[BaseException]:
    """A real nursery's group: ``error`` from one task while the other is cancelled by an
    outer scope that is itself cancelled, so the nursery cannot absorb the Cancelled."""
    caught: list[BaseExceptionGroup[BaseException]] = []
    with trio.CancelScope() as outer:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.sleep_forever)
                await trio.lowlevel.checkpoint()
                outer.cancel()
                raise error
        except BaseExceptionGroup as group:
            caught.append(group)
    return caught[0]


async def test_sole_error_sees_past_the_siblings_cancelled() -> None:
    error = ValueError("the task's own failure")
    group = await _group_with_cancelled(error)
    assert group.split(trio.Cancelled)[0] is not None  # the Cancelled is really there
    assert sole_error(group) is error
    assert only(group, (ValueError,)) and not only(group, (KeyError,))
    assert not only(group.split(trio.Cancelled)[0], (ValueError,))  # Cancelled alone


def test_sole_error_is_none_for_several_errors_or_none() -> None:
    assert sole_error(ExceptionGroup("two", [ValueError(), KeyError()])) is None
    assert sole_error(ExceptionGroup("one", [ValueError("x")])) is not None
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [KeyError("k")])])
    assert isinstance(first_leaf(nested), KeyError)


async def test_a_pull_error_beside_a_cancelled_comes_out_plain() -> None:
    group = await _group_with_cancelled(PullError("no holder answered"))
    with pytest.raises(PullError, match="no holder answered"), plain_pull_errors():
        raise group


def test_other_errors_beside_a_pull_error_keep_the_group() -> None:
    group = ExceptionGroup("mixed", [PullError("a"), OSError("b")])
    with pytest.raises(ExceptionGroup), plain_pull_errors():
        raise group
