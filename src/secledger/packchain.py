"""The chain part of an evidence pack: the verification at pack time and the newest checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Engine

from secledger import checkpoint as signing
from secledger.chainsql import CHECK_CHAIN_FILE
from secledger.checkpoint import Checkpoint
from secledger.packfiles import PackDir
from secledger.store.verify import ChainBroken, Expected, Summary, signed_by, verify
from secledger.times import isoformat, utcnow

# The walk runs after the pack's snapshot, in a snapshot of its own (it reads the whole
# log): the head the pack's rows were read under must be in the chain it walks.
SNAPSHOT_HEAD = "the head read in the pack's snapshot"


def verify_now(
    engine: Engine,
    files: PackDir,
    snapshot_head: tuple[int, bytes],
    progress: Callable[[int], None],
    public: Ed25519PublicKey | None,
) -> dict[str, Any]:
    """Walk the whole chain as ``secledger verify`` does (with ``public``, a stored
    checkpoint whose signature fails is not trusted, and listed as forged), holding it
    to ``snapshot_head`` (seq, hash: rows removed or rewritten since the pack's
    snapshot break it), and write ``chain/verify.json``; a broken chain is recorded too.
    Beside it goes the query that repeats the walk with ``psql`` alone."""
    result: dict[str, Any] = {"verified_at": isoformat(utcnow())}
    seq, head = snapshot_head
    vouched = [Expected(seq, head, SNAPSHOT_HEAD)] if seq else []
    try:
        summary = verify(engine, vouched, progress=progress, screen=signed_by(public))
    except ChainBroken as exc:
        result |= {"ok": False, "failure": {"seq": exc.seq, "reason": exc.reason}}
    else:
        result |= {"ok": True, "failure": None, **_summary(summary)}
        result["forged_checkpoints"] = summary.forged
    result["snapshot_head_seq"] = seq
    files.write_json("chain/verify.json", result)
    files.write_bytes("chain/check-chain.sql", CHECK_CHAIN_FILE.encode())
    return result


def _summary(summary: Summary) -> dict[str, Any]:
    return {
        "rows": summary.rows,
        "first_seq": summary.first_seq,
        "last_seq": summary.last_seq,
        "head_hash": summary.head_hash.hex(),
        "seconds": round(summary.seconds, 3),
        "checkpoints_stored": len(summary.stored),
        "checkpoints_matched": [label for label in summary.matched if label != SNAPSHOT_HEAD],
    }


def newest(
    stored: list[tuple[int, Checkpoint]], public: Ed25519PublicKey | None
) -> Checkpoint | None:
    """The checkpoint of the highest seq, among those ``public`` signed when it is given:
    the highest id is only the last inserted (the app's login may insert an old one again,
    or one that is not signed)."""
    if public is not None:
        stored = [(i, c) for i, c in stored if _signature(c, public) == "verified"]
    return max(stored, key=lambda pair: (pair[1].seq, pair[0]))[1] if stored else None


def add_checkpoint(
    files: PackDir, latest: Checkpoint | None, public: Ed25519PublicKey | None
) -> dict[str, Any] | None:
    """Write the public key and the newest checkpoint; what the pack says about them."""
    if public is not None:
        files.write_bytes("chain/checkpoint-key.pem.pub", signing.public_pem(public))
    if latest is None:
        return None
    name = f"chain/checkpoint-{latest.seq:012d}.json"
    files.write_json(name, latest.to_json())
    return {
        "file": name,
        "seq": latest.seq,
        "head_hash": latest.head_hash.hex(),
        "key_id": latest.key_id,
        "signature": _signature(latest, public),
    }


def _signature(latest: Checkpoint, public: Ed25519PublicKey | None) -> str:
    if public is None:
        return "not checked: no public key configured"
    try:
        signing.check_signature(latest, public)
    except signing.BadCheckpoint as exc:
        return f"INVALID: {exc}"
    return "verified"
