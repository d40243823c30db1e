"""Length-prefixed frames: an unsigned LEB128 varint length, then that many payload bytes.

This is the only length-prefix decoder in dmm; every stream protocol frames its messages
with it, and every decoder is built with a maximum frame size.

Receive-buffer contract: feed at most ``max_read`` (``max_size + 10``) bytes per
``receive_data`` call and call ``next_frame`` until it returns ``None`` before feeding
again. A decoder used that way never holds more than one partial frame plus one read, and
``receive_data`` refuses (``LocalProtocolError``) anything that would make it hold more
than ``2 * max_read`` unconsumed bytes — so a peer can never make us buffer more than
that, whatever the caller's read size.
"""

from __future__ import annotations

from .errors import LocalProtocolError, RemoteProtocolError

__all__ = ["MAX_VARINT_BYTES", "FrameDecoder", "encode_frame", "encode_varint"]

# 10 * 7 bits covers every 64-bit length; a longer prefix is garbage or an attack.
MAX_VARINT_BYTES = 10


def encode_varint(value: int) -> bytes:
    """The minimal unsigned LEB128 encoding of ``0 <= value < 2**64``."""
    if not 0 <= value < 1 << 64:
        raise LocalProtocolError(f"varint out of range: {value}")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_frame(payload: bytes, max_size: int) -> bytes:
    """``payload`` with its length prefix; refuses payloads the peer's decoder would refuse."""
    if len(payload) > max_size:
        raise LocalProtocolError(f"frame of {len(payload)} bytes exceeds the {max_size}-byte limit")
    return encode_varint(len(payload)) + payload


class FrameDecoder:
    """Turns a byte stream into frames; raises ``RemoteProtocolError`` on bad framing."""

    __slots__ = ("_buf", "_eof", "_pending", "_pos", "max_size")

    def __init__(self, max_size: int) -> None:
        if max_size < 0:
            raise LocalProtocolError(f"max_size must be >= 0, not {max_size}")
        self.max_size = max_size
        self._buf = bytearray()
        # Start of the unconsumed data in _buf; consumed bytes are dropped lazily so a
        # stream of small frames does not shift the buffer once per frame.
        self._pos = 0
        # (header length, payload length) of the frame at _pos once its prefix is parsed,
        # so a 2 MiB frame arriving in 64 KiB reads is not re-parsed on every read.
        self._pending: tuple[int, int] | None = None
        self._eof = False

    @property
    def max_read(self) -> int:
        """The most bytes a caller should pass to one ``receive_data`` call."""
        return self.max_size + MAX_VARINT_BYTES

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as part of a frame."""
        return len(self._buf) - self._pos

    def receive_data(self, data: bytes) -> None:
        """Append bytes from the stream; ``b""`` is a no-op (use ``eof()`` for the end)."""
        if self._eof:
            raise LocalProtocolError("receive_data after eof")
        if not data:
            return
        if self.buffered + len(data) > 2 * self.max_read:
            raise LocalProtocolError(
                f"receive buffer would hold {self.buffered + len(data)} bytes "
                f"(limit {2 * self.max_read}): drain next_frame() between reads"
            )
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_frame(self) -> bytes | None:
        """The next complete payload, or ``None`` if more data is needed."""
        if self._pending is None:
            self._pending = self._parse_prefix()
            if self._pending is None:
                return None
        header, length = self._pending
        start = self._pos + header
        end = start + length
        if end > len(self._buf):
            return None
        with memoryview(self._buf) as view:
            payload = view[start:end].tobytes()
        self._pending = None
        if end == len(self._buf):
            self._buf.clear()
            self._pos = 0
        else:
            self._pos = end
        return payload

    def eof(self) -> None:
        """The stream ended; raises ``RemoteProtocolError`` if it ended inside a frame.

        Complete frames still buffered remain available from ``next_frame``.
        """
        self._eof = True
        self._check_complete(self._pos)

    def _check_complete(self, pos: int) -> None:
        # Walk the frames from `pos` without consuming them: truncation is reported at
        # eof even while complete frames before it are still waiting to be read.
        while pos < len(self._buf):
            parsed = self._parse_prefix_at(pos)
            if parsed is None:
                raise RemoteProtocolError(
                    f"stream ended inside a frame length prefix ({len(self._buf) - pos} bytes)"
                )
            header, length = parsed
            if pos + header + length > len(self._buf):
                raise RemoteProtocolError(
                    f"stream ended inside a frame ({len(self._buf) - pos - header} "
                    f"of {length} bytes)"
                )
            pos += header + length

    def _parse_prefix(self) -> tuple[int, int] | None:
        return self._parse_prefix_at(self._pos)

    def _parse_prefix_at(self, pos: int) -> tuple[int, int] | None:
        buf = self._buf
        value = 0
        shift = 0
        limit = min(len(buf), pos + MAX_VARINT_BYTES)
        i = pos
        while i < limit:
            byte = buf[i]
            value |= (byte & 0x7F) << shift
            i += 1
            if not byte & 0x80:
                if byte == 0 and i - pos > 1:
                    raise RemoteProtocolError("non-minimal varint frame length")
                if value >= 1 << 64:
                    raise RemoteProtocolError("varint frame length exceeds 64 bits")
                if value > self.max_size:
                    raise RemoteProtocolError(
                        f"frame of {value} bytes exceeds the {self.max_size}-byte limit"
                    )
                return i - pos, value
            shift += 7
            # Refuse as soon as the prefix alone proves the frame too big, before the
            # rest of the prefix (or any payload) arrives.
            if 1 << shift > self.max_size:
                raise RemoteProtocolError(
                    f"frame of at least {1 << shift} bytes exceeds the {self.max_size}-byte limit"
                )
        if i - pos >= MAX_VARINT_BYTES:
            raise RemoteProtocolError(f"varint frame length longer than {MAX_VARINT_BYTES} bytes")
        return None
