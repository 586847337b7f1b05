"""Signed checkpoints: an Ed25519 signature over the chain head (sequence, hash, time).

No I/O except reading and writing key and checkpoint files. The signed message is a
short text, so an auditor can rebuild it with ``printf`` and check it with
``openssl pkeyutl -verify`` (docs/integrity.md).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from secledger.errors import ConfigError, SecledgerError
from secledger.store.chain import time_text
from secledger.times import parse_time

FORMAT = "secledger.checkpoint.v1"


class BadCheckpoint(SecledgerError):
    """A checkpoint file is malformed, or its signature does not verify."""


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement: the chain had ``head_hash`` at ``seq`` when signed at ``signed_at``."""

    seq: int
    head_hash: bytes
    signed_at: datetime
    key_id: str
    signature: bytes

    def message(self) -> bytes:
        """The exact bytes that are signed."""
        return message(self.seq, self.head_hash, self.signed_at)

    def to_json(self) -> dict[str, Any]:
        """The checkpoint file's content."""
        return {
            "format": FORMAT,
            "seq": self.seq,
            "head_hash": self.head_hash.hex(),
            "signed_at": time_text(self.signed_at),
            "key_id": self.key_id,
            "signature": base64.b64encode(self.signature).decode(),
            "message": self.message().decode(),
        }

    @classmethod
    def from_json(cls, data: Any) -> Checkpoint:
        """Parse a checkpoint file's content; BadCheckpoint when it is not one."""
        try:
            if data["format"] != FORMAT:
                raise BadCheckpoint(f"unknown checkpoint format {str(data['format'])[:40]!r}")
            return cls(
                seq=int(data["seq"]),
                head_hash=bytes.fromhex(data["head_hash"]),
                signed_at=parse_time(data["signed_at"]),
                key_id=str(data["key_id"]),
                signature=base64.b64decode(data["signature"], validate=True),
            )
        except KeyError as exc:
            raise BadCheckpoint(f"not a secledger checkpoint: it has no {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise BadCheckpoint(f"not a secledger checkpoint: {exc}") from None


def message(seq: int, head_hash: bytes, signed_at: datetime) -> bytes:
    """``secledger.checkpoint.v1`` then one ``name value`` line each for seq, head and time."""
    return f"{FORMAT}\nseq {seq}\nhead {head_hash.hex()}\nat {time_text(signed_at)}\n".encode()


def key_id(public: Ed25519PublicKey) -> str:
    """First 16 hex digits of SHA-256 over the raw 32-byte public key."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(key: Ed25519PrivateKey, seq: int, head_hash: bytes, signed_at: datetime) -> Checkpoint:
    """Sign a chain head."""
    signature = key.sign(message(seq, head_hash, signed_at))
    return Checkpoint(seq, head_hash, signed_at, key_id(key.public_key()), signature)


def signed_by(checkpoint: Checkpoint, public: Ed25519PublicKey) -> bool:
    """Whether ``public``'s key signed ``checkpoint``'s message, whatever key it names
    (``key_id`` is outside the signed message)."""
    try:
        public.verify(checkpoint.signature, checkpoint.message())
    except InvalidSignature:
        return False
    return True


def check_signature(checkpoint: Checkpoint, public: Ed25519PublicKey) -> None:
    """Raise BadCheckpoint unless ``public`` signed ``checkpoint``."""
    if checkpoint.key_id != key_id(public):
        raise BadCheckpoint(
            f"checkpoint was signed by key {checkpoint.key_id}, not by {key_id(public)}"
        )
    try:
        public.verify(checkpoint.signature, checkpoint.message())
    except InvalidSignature:
        raise BadCheckpoint("checkpoint signature does not verify: it was altered") from None


def public_pem(public: Ed25519PublicKey) -> bytes:
    """The public key as PEM (SubjectPublicKeyInfo), which openssl reads."""
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def generate(path: Path) -> Ed25519PublicKey:
    """Write a new private key to ``path`` (mode 0600, never overwritten); its public key."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL: never clobber a key that earlier checkpoints depend on; 0600 from the start.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    return key.public_key()


def load_private(path: Path) -> Ed25519PrivateKey:
    """Read a private key written by :func:`generate`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the checkpoint key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        # Never the library's text: it could quote the file.
        raise ConfigError(
            f"cannot read the checkpoint key {path}: it is not an unencrypted PEM private key"
            " (secledger keygen writes one)"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 private key")
    return key


def load_public(path: Path) -> Ed25519PublicKey:
    """Read a PEM public key (or derive it from a private key file)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if b"PRIVATE KEY" in data:
        return load_private(path).public_key()
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise ConfigError(f"{path} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is not an Ed25519 public key")
    return key


def read_file(path: Path) -> Checkpoint:
    """Read a checkpoint file."""
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise BadCheckpoint(f"cannot read checkpoint {path}: {exc}") from None
    return Checkpoint.from_json(data)


def write_file(directory: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` to a new file in ``directory``; its path."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = checkpoint.signed_at.strftime("%Y%m%dT%H%M%S%fZ")
    path = directory / f"checkpoint-{checkpoint.seq:012d}-{stamp}.json"
    data = orjson.dumps(checkpoint.to_json(), option=orjson.OPT_INDENT_2) + b"\n"
    # Written whole under another name, then linked to its own: a reader (``verify``, a
    # copy to other storage) never sees half a file, and a full disk leaves none. The
    # link fails on an existing name: a checkpoint file is evidence, never rewritten.
    partial = directory / f".{path.name}.{os.urandom(6).hex()}.partial"
    try:
        with partial.open("xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(partial, path)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links (object storage mounts)
            _write_new(path, data)
    finally:
        # Object-locked storage may refuse the removal: the checkpoint is written all
        # the same, and a leftover partial file is never read as one.
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
    return path


def _write_new(path: Path, data: bytes) -> None:
    """Write ``data`` to the new file ``path``, synced; removed again if that fails, so
    that no truncated file stands as evidence."""
    try:
        with path.open("xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except FileExistsError:
        raise
    except OSError:
        with contextlib.suppress(OSError):
            path.unlink()
        raise
