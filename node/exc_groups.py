"""Reading trio's exception groups: what a task's failure really was."""

from __future__ import annotations

__all__ = ["first_leaf", "only"]


def only(exc: BaseException, types: tuple[type[BaseException], ...]) -> bool:
    """Whether ``exc`` is, or is a group of nothing but, ``types``."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(types)[1] is None
    return isinstance(exc, types)


def first_leaf(exc: BaseException) -> BaseException:
    """The first exception that is not a group, looking inside groups."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
