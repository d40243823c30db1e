"""A node's identity: one ed25519 key in ``<data_dir>/identity.key``.

The same 32-byte seed is the libp2p host key (hence the peer id) and the pynacl key that signs
version records, so a signature can be checked against the key inlined in the peer id.

File format: the libp2p ``PrivateKey`` protobuf (key_type=Ed25519, data=key). py-libp2p 0.8.1
writes and reads ``data`` as the 32-byte seed; go-libp2p writes 64 bytes (seed + public key).
Both are read; the 32-byte form is written, because py-libp2p cannot load the other.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Final

from google.protobuf.message import DecodeError
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.pb import crypto_pb2
from libp2p.peer.id import ID
from nacl.exceptions import CryptoError
from nacl.signing import SigningKey, VerifyKey

__all__ = [
    "IDENTITY_FILE",
    "Identity",
    "IdentityError",
    "identity_path",
    "load_identity",
    "load_or_create_identity",
]

IDENTITY_FILE: Final = "identity.key"
_SEED_LEN: Final = 32
# A key file is 36 or 68 bytes; anything much larger is not one, so never read it whole.
_MAX_FILE_LEN: Final = 4096
# Link errors meaning "this filesystem has no hard links", where os.replace is the fallback.
_NO_LINK_ERRNOS: Final = frozenset(
    {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}
)


class IdentityError(Exception):
    """The identity key is missing, unreadable, corrupt or too exposed. ``str()`` is one line
    naming the file and what to do."""

    exit_code: ClassVar[int] = 1

    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True, slots=True)
class Identity:
    """Build with ``from_seed`` or ``generate``; every field derives from one seed."""

    key_pair: KeyPair
    peer_id: ID
    peer_id_str: str
    signing_key: SigningKey
    verify_key: VerifyKey

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if len(seed) != _SEED_LEN:
            raise ValueError(f"an ed25519 seed is {_SEED_LEN} bytes, got {len(seed)}")
        signing_key = SigningKey(seed)
        private_key = Ed25519PrivateKey(signing_key)
        key_pair = KeyPair(private_key, private_key.get_public_key())
        peer_id = ID.from_pubkey(key_pair.public_key)
        return cls(
            key_pair=key_pair,
            peer_id=peer_id,
            peer_id_str=peer_id.to_base58(),
            signing_key=signing_key,
            verify_key=signing_key.verify_key,
        )

    @classmethod
    def generate(cls) -> Identity:
        return cls.from_seed(secrets.token_bytes(_SEED_LEN))

    @property
    def public_key_bytes(self) -> bytes:
        """The raw 32-byte ed25519 public key, as ``verify`` takes it."""
        return bytes(self.verify_key)

    def sign(self, data: bytes) -> bytes:
        """A 64-byte detached ed25519 signature of ``data``."""
        return self.signing_key.sign(data).signature

    @staticmethod
    def verify(public_key_bytes: bytes, data: bytes, signature: bytes) -> bool:
        """True only if ``signature`` is a valid signature of ``data`` by that raw 32-byte key.

        Malformed keys or signatures are just invalid: they come from peers.
        """
        try:
            VerifyKey(public_key_bytes).verify(data, signature)
        except CryptoError:
            return False
        return True

    def serialize_private_key(self) -> bytes:
        """The key file's contents: the libp2p protobuf with the 32-byte seed."""
        return self.key_pair.private_key.serialize()


def identity_path(data_dir: Path) -> Path:
    return data_dir / IDENTITY_FILE


def load_identity(data_dir: Path) -> Identity:
    """The identity stored in ``data_dir``; IdentityError if there is none or it is bad."""
    path = identity_path(data_dir)
    try:
        return _read_identity(path)
    except FileNotFoundError:
        raise IdentityError(
            path, "no identity key (one is created the first time the node starts)"
        ) from None


def load_or_create_identity(data_dir: Path) -> Identity:
    """The identity stored in ``data_dir``, created there first if there is none.

    An existing file is never replaced, even if it is bad: that raises IdentityError.
    """
    path = identity_path(data_dir)
    try:
        return _read_identity(path)
    except FileNotFoundError:
        pass
    identity = Identity.generate()
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        created = _write_new(path, identity.serialize_private_key())
    except OSError as exc:
        raise IdentityError(path, f"cannot create identity key: {exc.strerror or exc}") from None
    if not created:
        # Another process created it between our read and our write: theirs wins.
        return load_identity(data_dir)
    return identity


def _read_identity(path: Path) -> Identity:
    """Raises FileNotFoundError if absent, IdentityError if unusable."""
    try:
        # O_NONBLOCK: a FIFO put in its place must not hang us; the fstat below rejects it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise IdentityError(path, f"cannot read identity key: {exc.strerror or exc}") from None
    try:
        # fstat on the open file, so the mode checked is the mode of the bytes read.
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IdentityError(path, "not a regular file; move it away to create a new identity")
        if st.st_mode & 0o077:
            raise IdentityError(
                path,
                f"permissions {stat.S_IMODE(st.st_mode):04o} let other users read the private"
                f" key; run: chmod 600 {path}",
            )
        data = b""
        while len(data) <= _MAX_FILE_LEN:
            chunk = os.read(fd, _MAX_FILE_LEN + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise IdentityError(path, f"cannot read identity key: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    try:
        return Identity.from_seed(_decode_seed(data))
    except ValueError as exc:
        raise IdentityError(
            path,
            f"not a valid identity key ({exc}); restore it from a backup, or move it away"
            " to create a new identity (a new peer id)",
        ) from None


def _decode_seed(data: bytes) -> bytes:
    """The seed in a libp2p PrivateKey protobuf of the 32- or 64-byte ed25519 form."""
    if len(data) > _MAX_FILE_LEN:
        raise ValueError(f"{len(data)}+ bytes, too long")
    try:
        message = crypto_pb2.PrivateKey.FromString(data)
    except DecodeError:
        raise ValueError("not a libp2p private key protobuf") from None
    if not message.HasField("key_type") or message.key_type != crypto_pb2.Ed25519:
        raise ValueError("not an ed25519 key")
    key = message.data
    # Parsing tolerates extra fields and bytes; a file we did not expect is not trusted.
    canonical = crypto_pb2.PrivateKey(key_type=crypto_pb2.Ed25519, data=key)
    if canonical.SerializeToString() != data:
        raise ValueError("unexpected extra data")
    if len(key) == _SEED_LEN:
        return key
    if len(key) == 2 * _SEED_LEN:
        seed, public = key[:_SEED_LEN], key[_SEED_LEN:]
        if bytes(SigningKey(seed).verify_key) != public:
            raise ValueError("its public half does not match its private half")
        return seed
    raise ValueError(f"ed25519 key of {len(key)} bytes, expected 32 or 64")


def _write_new(path: Path, data: bytes) -> bool:
    """Atomically create ``path`` (mode 0600) holding ``data``; False if it already exists."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # Created 0600 so the key is never readable by others, not even before a chmod.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # the umask could have removed the owner's bits
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            # link, not replace: it fails if a key appeared meanwhile, which must never be lost.
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_LINK_ERRNOS:
                raise
            if path.exists():
                return False
            os.replace(tmp, path)
        # Drop the temp name before the directory fsync, so a crash leaves no stray link.
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        _fsync_dir(path.parent)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
