"""What every dmm request/response machine shares: roles, per-side states, ``NEED_DATA``,
and the receiving half of a stream machine (``StreamMachine``)."""

from __future__ import annotations

import abc
import enum
from typing import Generic, Literal, Protocol, TypeAlias, TypeVar

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = ["NEED_DATA", "NeedData", "Role", "State", "StreamMachine"]


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


class _Input(Protocol):
    """What buffers a machine's incoming bytes (a frame decoder or message reader)."""

    @property
    def max_read(self) -> int: ...

    def receive_data(self, data: bytes) -> None: ...


_E = TypeVar("_E")


class StreamMachine(abc.ABC, Generic[_E]):
    """One side of a stream: each side's state, bytes in, EOF, and a peer that stays
    broken once it broke the protocol. Subclasses decode in ``_next_event`` (reading
    ``_input``, consulting ``_eof_received``) and say what ends the stream."""

    def __init__(self, role: Role, input_: _Input) -> None:
        self.role = role
        self._peer_role = Role.SERVER if role is Role.CLIENT else Role.CLIENT
        self._input = input_
        self._eof_received = False
        self._states = {Role.CLIENT: State.OPEN, Role.SERVER: State.OPEN}

    @property
    def our_state(self) -> State:
        return self._states[self.role]

    @property
    def their_state(self) -> State:
        return self._states[self._peer_role]

    @property
    def max_read(self) -> int:
        """The most bytes to pass to one ``receive_data`` call."""
        return self._input.max_read

    def receive_data(self, data: bytes) -> None:
        """Bytes read from the stream; drain ``next_event`` before feeding more."""
        if self._eof_received:
            raise LocalProtocolError("receive_data after receive_eof")
        self._input.receive_data(data)

    def receive_eof(self) -> None:
        """The peer closed its side; ``next_event`` reports it after the buffered events."""
        self._eof_received = True

    def next_event(self) -> _E | NeedData:
        """The next event from the peer, ``NEED_DATA``, or the end of stream once it closed.

        Raises ``RemoteProtocolError`` when the peer broke the protocol; the stream then
        stays broken and every later call raises too.
        """
        if self.their_state is State.ERROR:
            raise RemoteProtocolError("the peer already broke the protocol on this stream")
        if self.their_state is State.CLOSED:
            return self._end_of_stream()
        try:
            return self._next_event()
        except RemoteProtocolError:
            self._states[self._peer_role] = State.ERROR
            raise

    @abc.abstractmethod
    def _next_event(self) -> _E | NeedData: ...

    @abc.abstractmethod
    def _end_of_stream(self) -> _E: ...
