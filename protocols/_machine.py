"""What every dmm request/response machine shares: roles, per-side states, ``NEED_DATA``."""

from __future__ import annotations

import enum
from typing import Literal, TypeAlias

__all__ = ["NEED_DATA", "NeedData", "Role", "State"]


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    OPEN = "open"  # may send messages
    DONE = "done"  # sent its final message (server's ErrorReply(None)); may only close
    CLOSED = "closed"  # its side of the stream has ended
    ERROR = "error"  # broke the protocol; nothing more is accepted from it


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"


# ``next_event`` returns this when the buffered bytes hold no complete event yet.
NEED_DATA = _Sentinel.NEED_DATA
NeedData: TypeAlias = Literal[_Sentinel.NEED_DATA]
