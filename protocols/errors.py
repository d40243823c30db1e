"""The two ways a protocol exchange fails, named by whose fault it is (as in h11).

``LocalProtocolError``: our own code misused a codec or state machine (sent a
response from a client, encoded an oversize frame). It is a bug here, never the peer's.

``RemoteProtocolError``: the peer sent something we refuse (bad framing, bad CBOR, a bad
signature, a field out of range). Its message is one line, safe to log and to count
against the peer; the stream it arrived on should be ended, the node never.
"""

from __future__ import annotations

__all__ = ["LocalProtocolError", "ProtocolError", "RemoteProtocolError"]


class ProtocolError(Exception):
    """Base of both protocol error kinds; catch this to handle either."""


class LocalProtocolError(ProtocolError):
    """We used a codec or state machine wrongly; a bug in the calling code."""


class RemoteProtocolError(ProtocolError):
    """The peer misbehaved; ``str(error)`` is a single line saying how."""

    def __init__(self, message: str) -> None:
        # Peer-supplied text may end up in the reason; keep it on one line so a log
        # line stays one line whatever the peer sent.
        super().__init__(" ".join(message.split()))
