"""Reading trio's exception groups: what a task's failure really was."""

from __future__ import annotations

import trio

__all__ = ["first_leaf", "only", "sole_error"]


def only(exc: BaseException, types: tuple[type[BaseException], ...]) -> bool:
    """Whether ``exc`` is, or is a group of nothing but, ``types`` (beside siblings'
    ``trio.Cancelled``: see ``sole_error``)."""
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(types)
        return matched is not None and (rest is None or rest.split(trio.Cancelled)[1] is None)
    return isinstance(exc, types)


def first_leaf(exc: BaseException) -> BaseException:
    """The first exception that is not a group, looking inside groups."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def sole_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one member of a nursery's ``group`` besides ``trio.Cancelled``; None when there
    is no such member or more than one.

    A task that fails while an enclosing scope is being cancelled leaves the nursery with
    its error *and* its siblings' Cancelled, which the nursery may not absorb (the
    cancellation is its parent's). Dropping those Cancelled loses nothing: trio cancels
    level-triggered, so the caller's next checkpoint raises Cancelled again.
    """
    rest = group.split(trio.Cancelled)[1]
    if rest is None or len(rest.exceptions) != 1:
        return None
    return rest.exceptions[0]
