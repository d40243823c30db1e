"""The node identity key: creation, the file on disk, and signatures."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from libp2p.crypto.pb import crypto_pb2
from libp2p.crypto.serialization import deserialize_private_key
from libp2p.peer.id import ID
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from node.identity import (
    IDENTITY_FILE,
    Identity,
    IdentityError,
    load_identity,
    load_or_create_identity,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_created_on_first_use_and_stable_across_loads(tmp_path: Path) -> None:
    data_dir = tmp_path / "data" / "dmm"
    first = load_or_create_identity(data_dir)
    assert first.peer_id_str.startswith("12D3KooW")
    assert load_or_create_identity(data_dir).peer_id == first.peer_id
    assert load_identity(data_dir).peer_id_str == first.peer_id_str
    # A data dir we create holds a private key: only the owner may enter it.
    assert _mode(data_dir) == 0o700


def test_key_file_is_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        load_or_create_identity(tmp_path)
    finally:
        os.umask(old)
    assert _mode(tmp_path / IDENTITY_FILE) == 0o600


def test_atomic_write_leaves_only_the_key_file(tmp_path: Path) -> None:
    load_or_create_identity(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [IDENTITY_FILE]


def test_file_is_the_libp2p_protobuf_with_a_32_byte_seed(tmp_path: Path) -> None:
    identity = load_or_create_identity(tmp_path)
    raw = (tmp_path / IDENTITY_FILE).read_bytes()
    message = crypto_pb2.PrivateKey.FromString(raw)
    assert message.key_type == crypto_pb2.Ed25519
    assert len(message.data) == 32
    # py-libp2p itself can load what we write, and gets the same key.
    assert deserialize_private_key(raw) == identity.key_pair.private_key


def test_peer_id_matches_libp2p_derivation(tmp_path: Path) -> None:
    identity = load_or_create_identity(tmp_path)
    assert ID.from_pubkey(identity.key_pair.public_key) == identity.peer_id
    assert identity.peer_id.to_base58() == identity.peer_id_str
    # The libp2p key and the pynacl key are one key.
    assert identity.key_pair.public_key.to_bytes() == bytes(identity.verify_key)
    assert bytes(identity.signing_key) == identity.key_pair.private_key.to_bytes()


def test_signature_verifies_with_pynacl_and_fails_on_a_flipped_bit() -> None:
    identity = Identity.generate()
    data = b"version record"
    signature = identity.sign(data)
    assert len(signature) == 64
    VerifyKey(identity.public_key_bytes).verify(data, signature)
    assert Identity.verify(identity.public_key_bytes, data, signature)
    # libp2p's public key checks the same signature.
    assert identity.key_pair.public_key.verify(data, signature)

    flipped = bytes([signature[0] ^ 0x01]) + signature[1:]
    assert not Identity.verify(identity.public_key_bytes, data, flipped)
    with pytest.raises(BadSignatureError):
        VerifyKey(identity.public_key_bytes).verify(data, flipped)
    assert not Identity.verify(identity.public_key_bytes, b"version recorD", signature)
    assert not Identity.verify(Identity.generate().public_key_bytes, data, signature)


@pytest.mark.parametrize(
    ("public_key", "signature"),
    [(b"short", b"\x00" * 64), (None, b"\x00" * 63), (None, b"")],
    ids=["bad-key-length", "short-signature", "empty-signature"],
)
def test_verify_malformed_input_is_false_not_an_error(
    public_key: bytes | None, signature: bytes
) -> None:
    identity = Identity.generate()
    key = identity.public_key_bytes if public_key is None else public_key
    assert Identity.verify(key, b"data", signature) is False


def _write_key(path: Path, data: bytes, mode: int = 0o600) -> None:
    path.write_bytes(data)
    path.chmod(mode)


def test_go_libp2p_64_byte_form_is_accepted(tmp_path: Path) -> None:
    original = Identity.generate()
    key = bytes(original.signing_key) + original.public_key_bytes
    go_form = crypto_pb2.PrivateKey(key_type=crypto_pb2.Ed25519, data=key).SerializeToString()
    _write_key(tmp_path / IDENTITY_FILE, go_form)
    assert load_identity(tmp_path).peer_id == original.peer_id
    # Loading never rewrites the file.
    assert (tmp_path / IDENTITY_FILE).read_bytes() == go_form


def _corrupt_files() -> dict[str, bytes]:
    a, b = Identity.generate(), Identity.generate()
    seed = bytes(a.signing_key)

    def pb(key_type: crypto_pb2.KeyType.ValueType, data: bytes) -> bytes:
        return crypto_pb2.PrivateKey(key_type=key_type, data=data).SerializeToString()

    return {
        "empty": b"",
        "garbage": b"\xff\xfe not a key \x00",
        "truncated": a.serialize_private_key()[:-5],
        "wrong-type": pb(crypto_pb2.Secp256k1, seed),
        "wrong-length": pb(crypto_pb2.Ed25519, seed[:31]),
        "mismatched-64": pb(crypto_pb2.Ed25519, seed + b.public_key_bytes),
        "trailing-bytes": a.serialize_private_key() + b"\x00",
        "huge": b"\x00" * 100_000,
    }


@pytest.mark.parametrize("name", sorted(_corrupt_files()))
@pytest.mark.parametrize("loader", [load_identity, load_or_create_identity])
def test_corrupt_file_is_an_error_and_left_untouched(
    tmp_path: Path, name: str, loader: object
) -> None:
    content = _corrupt_files()[name]
    path = tmp_path / IDENTITY_FILE
    _write_key(path, content)
    with pytest.raises(IdentityError) as info:
        loader(tmp_path)  # type: ignore[operator]
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    assert "move it away" in message
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == [IDENTITY_FILE]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o700 | 0o020])
def test_group_or_world_access_is_refused_with_chmod_advice(tmp_path: Path, mode: int) -> None:
    load_or_create_identity(tmp_path)
    path = tmp_path / IDENTITY_FILE
    content = path.read_bytes()
    path.chmod(mode)
    with pytest.raises(IdentityError) as info:
        load_or_create_identity(tmp_path)
    assert f"chmod 600 {path}" in str(info.value)
    assert "\n" not in str(info.value)
    assert path.read_bytes() == content
    assert _mode(path) == mode


def test_missing_key_is_an_error_for_load_identity(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match=IDENTITY_FILE):
        load_identity(tmp_path)
    assert not (tmp_path / IDENTITY_FILE).exists()


def test_a_directory_in_place_of_the_key_is_an_error(tmp_path: Path) -> None:
    (tmp_path / IDENTITY_FILE).mkdir(mode=0o700)
    with pytest.raises(IdentityError):
        load_or_create_identity(tmp_path)
    assert (tmp_path / IDENTITY_FILE).is_dir()


def test_from_seed_is_deterministic() -> None:
    seed = bytes(range(32))
    assert Identity.from_seed(seed).peer_id == Identity.from_seed(seed).peer_id
    with pytest.raises(ValueError):
        Identity.from_seed(seed[:31])


def test_key_created_by_another_process_meanwhile_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import node.identity as identity_module

    theirs = load_or_create_identity(tmp_path)
    content = (tmp_path / IDENTITY_FILE).read_bytes()
    real_read = identity_module._read_identity
    calls = 0

    def read_misses_once(path: Path) -> Identity:
        # The first read runs "before" the other process wrote its key.
        nonlocal calls
        calls += 1
        if calls == 1:
            raise FileNotFoundError(path)
        return real_read(path)

    monkeypatch.setattr(identity_module, "_read_identity", read_misses_once)
    assert load_or_create_identity(tmp_path).peer_id == theirs.peer_id
    assert (tmp_path / IDENTITY_FILE).read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == [IDENTITY_FILE]


def test_a_fifo_in_place_of_the_key_is_an_error_not_a_hang(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / IDENTITY_FILE, 0o600)
    with pytest.raises(IdentityError, match="not a regular file"):
        load_identity(tmp_path)
