"""Signed checkpoints: keygen, checkpoint, and verify --checkpoint against rewritten history."""

from __future__ import annotations

import errno
import json
import stat
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from sqlalchemy import text

from chainkit import cli, record_history, rehash_from, tamper
from secledger import checkpoint as signing
from secledger import integrity
from secledger.store import db
from secledger.web import create_app


@pytest.fixture
def key(database_url, tmp_path) -> Path:
    """A fresh signing key made by ``secledger keygen``."""
    path = tmp_path / "keys" / "checkpoint-key.pem"
    result = cli(database_url, "keygen", "--out", str(path))
    assert result.exit_code == 0, result.output
    return path


def _checkpoint(database_url: str, key: Path, directory: Path) -> Path:
    result = cli(database_url, "checkpoint", "--key", str(key), "--dir", str(directory))
    assert result.exit_code == 0, result.output
    (written,) = directory.glob("checkpoint-*.json")
    return written


def _verify(database_url: str, key: Path, file: Path):
    return cli(database_url, "verify", "--checkpoint", str(file), "--public-key", f"{key}.pub")


def test_keygen_writes_a_private_key_readable_only_by_its_owner(key, database_url) -> None:
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"BEGIN PUBLIC KEY" in Path(f"{key}.pub").read_bytes()
    again = cli(database_url, "keygen", "--out", str(key))
    assert again.exit_code != 0
    assert "refusing to replace" in again.output


def test_keygen_never_replaces_a_public_key_auditors_may_need(database_url, tmp_path) -> None:
    """After a rotation the old private key may be gone; its public key still checks the
    old checkpoints."""
    kept = tmp_path / "k.pem.pub"
    kept.write_bytes(b"the old public key")
    result = cli(database_url, "keygen", "--out", str(tmp_path / "k.pem"))
    assert result.exit_code != 0
    assert "k.pem.pub exists; refusing to replace a public key" in result.output
    assert kept.read_bytes() == b"the old public key"
    assert not (tmp_path / "k.pem").exists()


def test_keygen_says_how_to_sign_with_the_key(database_url, tmp_path) -> None:
    """serve and checkpoint read the key from SECLEDGER_CHECKPOINT_KEY_FILE only: keygen
    followed by checkpoint failed with "no signing key" until it was set."""
    path = tmp_path / "k.pem"
    made = cli(database_url, "keygen", "--out", str(path))
    assert f"to sign with it, set SECLEDGER_CHECKPOINT_KEY_FILE={path}" in made.stderr
    # Set already (here through a path of another spelling): nothing to say.
    other = tmp_path / "k2.pem"
    (tmp_path / "sub").mkdir()
    spelled = str(tmp_path / "sub" / ".." / "k2.pem")  # pathlib keeps the ".."
    quiet = cli(database_url, "keygen", "--out", str(other), checkpoint_key_file=spelled)
    assert quiet.exit_code == 0, quiet.output
    assert "to sign with it" not in quiet.stderr


def test_key_and_checkpoint_file_errors_say_what_is_wrong(key, database_url, tmp_path) -> None:
    """Not an exception's class name (``FileNotFoundError``, ``ValueError``, ``'format'``)."""
    missing = tmp_path / "nowhere.pem"
    result = cli(database_url, "checkpoint", checkpoint_key_file=str(missing))
    assert result.exit_code == 1
    assert f"cannot read the checkpoint key {missing}: No such file or directory" in result.output
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    result = cli(database_url, "checkpoint", "--key", str(garbage))
    assert result.exit_code == 1
    assert "it is not an unencrypted PEM private key" in result.output
    odd = tmp_path / "odd.json"
    odd.write_text('{"seq": 1}')
    result = cli(database_url, "verify", "--checkpoint", str(odd), "--public-key", f"{key}.pub")
    assert result.exit_code == 1
    assert "not a secledger checkpoint: it has no 'format'" in result.output


def test_checkpoint_refuses_an_empty_log(key, database_url, tmp_path) -> None:
    result = cli(database_url, "checkpoint", "--key", str(key), "--dir", str(tmp_path / "cp"))
    assert result.exit_code != 0
    assert not (tmp_path / "cp").exists()


def test_keygen_to_a_place_it_cannot_write_is_one_line(database_url, tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = cli(database_url, "keygen", "--out", str(blocker / "key.pem"))
    assert result.exit_code == 1
    assert f"cannot write {blocker}" in result.output
    assert "Traceback" not in result.output


def test_a_checkpoint_directory_it_cannot_write_is_refused_before_signing(
    client, key, database_url, engine, tmp_path
) -> None:
    """The file was written after the commit and failed with a traceback, leaving a
    stored checkpoint the command said nothing of: the directory is checked first now."""
    record_history(client)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = cli(database_url, "checkpoint", "--key", str(key), "--dir", str(blocker / "cp"))
    assert result.exit_code == 1
    assert "cannot use checkpoint directory" in result.output
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM checkpoints")).scalar_one() == 0


def test_serves_checkpoint_is_stored_though_its_directory_cannot_take_the_file(
    client, key, engine, tmp_path
) -> None:
    """The scheduled checkpoint anchors the head in the database whatever the mount
    does; the file's failure is raised after (and logged by serve as checkpoint_failed)."""
    record_history(client)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(integrity.CheckpointFileFailed, match="is stored in the database"):
        integrity.checkpoint_if_new(engine, signing.load_private(key), blocker / "cp")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM checkpoints")).scalar_one() == 1


def test_checkpoint_file_verifies_and_names_the_head(client, key, database_url, engine, tmp_path):
    record_history(client)
    file = _checkpoint(database_url, key, tmp_path / "cp")
    content = json.loads(file.read_text())
    with engine.connect() as conn:
        head = bytes(conn.execute(text("SELECT hash FROM delivery_log WHERE seq = 6")).scalar_one())
        stored = conn.execute(text("SELECT seq, head_hash FROM checkpoints")).all()
    assert (content["seq"], content["head_hash"]) == (6, head.hex())
    assert [(seq, bytes(h)) for seq, h in stored] == [(6, head)]
    result = _verify(database_url, key, file)
    assert result.exit_code == 0, result.output
    assert f"matches checkpoint file {file.name}" in result.output
    assert "1 stored signatures verified" in result.output


def test_truncated_tail_is_caught_by_the_checkpoint_file(
    client, key, database_url, engine, tmp_path
):
    """A superuser removes the last rows and the stored checkpoints: only the file remembers."""
    record_history(client)
    file = _checkpoint(database_url, key, tmp_path / "cp")
    tamper(
        engine,
        "DELETE FROM review_events WHERE seq >= 5",
        "DELETE FROM delivery_log WHERE seq >= 5",
        "DELETE FROM checkpoints",
    )
    assert cli(database_url, "verify").exit_code == 0  # the shortened chain is self-consistent
    result = _verify(database_url, key, file)
    assert result.exit_code == 1
    assert "chain BROKEN at row seq=5: missing: the chain ends at seq 4" in result.output
    assert "rows 5..6 were removed" in result.output


def test_truncated_tail_is_caught_by_a_stored_checkpoint(
    client, key, database_url, engine, tmp_path
):
    record_history(client)
    _checkpoint(database_url, key, tmp_path / "cp")
    tamper(engine, "DELETE FROM delivery_log WHERE seq = 6")
    result = cli(database_url, "verify")
    assert result.exit_code == 1
    assert "chain BROKEN at row seq=6: missing" in result.output
    assert "stored checkpoint #1" in result.output


def forge(engine, rows: str) -> None:
    """Insert checkpoints ``rows`` (a SELECT of seq, head_hash, signed_at, key_id,
    signature), as the app's login may."""
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO checkpoints (seq, head_hash, signed_at, key_id, signature) " + rows)
        )


def test_a_checkpoint_forged_into_the_table_is_named_as_such(
    client, key, database_url, engine, tmp_path
):
    """A row inserted into checkpoints (the app's login may insert there) claiming a seq
    beyond the tail: with the public key it is a bad signature, not rows removed."""
    record_history(client)
    _checkpoint(database_url, key, tmp_path / "cp")
    forge(engine, "SELECT seq + 100, head_hash, signed_at, key_id, signature FROM checkpoints")
    plain = cli(database_url, "verify")
    assert plain.exit_code == 1
    assert "were removed" in plain.output  # without the key, nothing tells them apart,
    # and verify says so rather than calling it a truncation outright
    assert "or this checkpoint was inserted into the table" in plain.output
    assert "run verify with --public-key to tell which" in plain.output
    keyed = cli(database_url, "verify", "--public-key", f"{key}.pub")
    assert keyed.exit_code == 1
    assert "FORGED stored checkpoint #2" in keyed.output
    assert "signature does not verify" in keyed.output
    assert "were removed" not in keyed.output
    # The forgery is the table's, not the chain's: the walk's verdict stands apart.
    assert "chain OK" in keyed.output
    assert "1 stored signatures verified, 1 FORGED" in keyed.output
    # Under another key id, the forgery cannot be checked: it is not trusted either.
    tamper(engine, "UPDATE checkpoints SET key_id = 'someone-else' WHERE id = 2")
    other = cli(database_url, "verify", "--public-key", f"{key}.pub")
    assert other.exit_code == 0, other.output
    assert "1 signed by another key not used" in other.output


def test_a_forged_checkpoint_at_a_real_seq_does_not_make_the_chain_broken(
    client, key, database_url, engine, tmp_path
):
    """The app's login inserts a checkpoint with the real head and a bad signature, which
    the append-only table then keeps for good: every verify called the chain broken."""
    record_history(client)
    _checkpoint(database_url, key, tmp_path / "cp")
    forge(
        engine,
        "SELECT 1, hash, now(), (SELECT key_id FROM checkpoints LIMIT 1),"
        " decode(repeat('00', 64), 'hex') FROM delivery_log WHERE seq = 1",
    )
    keyed = cli(database_url, "verify", "--public-key", f"{key}.pub")
    assert keyed.exit_code == 1
    assert "BROKEN" not in keyed.output
    assert "chain OK" in keyed.output
    assert "FORGED stored checkpoint #2 (seq 1)" in keyed.output


def test_rewritten_history_with_recomputed_hashes_is_caught(
    client, key, database_url, engine, tmp_path
):
    """Edit a decision, recompute every hash after it, drop the stored checkpoints."""
    record_history(client)
    file = _checkpoint(database_url, key, tmp_path / "cp")
    tamper(
        engine,
        "UPDATE delivery_log SET payload = convert_to(replace(convert_from(payload, 'UTF8'),"
        " '\"bob\"', '\"mallory\"'), 'UTF8') WHERE seq = 2",
        "DELETE FROM checkpoints",
    )
    rehash_from(engine, 2)
    assert cli(database_url, "verify").exit_code == 0  # every link recomputed: chain alone passes
    result = _verify(database_url, key, file)
    assert result.exit_code == 1
    assert "chain BROKEN at row seq=6: differs from checkpoint file" in result.output
    assert "history was rewritten)" in result.output  # the file's signature was checked
    assert "inserted" not in result.output


def test_edited_checkpoint_file_fails_its_signature(client, key, database_url, tmp_path) -> None:
    record_history(client)
    file = _checkpoint(database_url, key, tmp_path / "cp")
    content = json.loads(file.read_text())
    content["seq"] = 5
    file.write_text(json.dumps(content))
    result = _verify(database_url, key, file)
    assert result.exit_code == 1
    assert "signature does not verify" in result.output


def test_checkpoint_file_without_public_key_is_refused(client, key, database_url, tmp_path):
    record_history(client)
    file = _checkpoint(database_url, key, tmp_path / "cp")
    result = cli(database_url, "verify", "--checkpoint", str(file))
    assert result.exit_code != 0
    assert "public key" in result.output


def _signed(seq: int) -> signing.Checkpoint:
    stamp = datetime(2026, 12, 1, 6, 0, tzinfo=UTC)
    return signing.sign(Ed25519PrivateKey.generate(), seq, bytes(32), stamp)


def test_a_checkpoint_file_appears_whole_or_not_at_all(tmp_path, monkeypatch) -> None:
    """The file was created, then written: serve's checkpoint task and a `verify` (or a
    copy to other storage) running at that moment read half a file, and a full disk
    left one behind for good, as files are never rewritten."""
    written = signing.write_file(tmp_path, _signed(1))
    assert json.loads(written.read_bytes())["seq"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [written.name]
    with pytest.raises(FileExistsError):  # evidence: never replaced
        signing.write_file(tmp_path, _signed(1))  # the same seq and time: the same name
    assert json.loads(written.read_bytes())["seq"] == 1

    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(signing.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        signing.write_file(tmp_path / "full", _signed(2))
    assert list((tmp_path / "full").iterdir()) == []


def test_serve_writes_a_checkpoint_when_a_key_is_configured(
    client, key, settings, database_url, engine, tmp_path
) -> None:
    record_history(client)
    configured = settings.model_copy(
        update={"checkpoint_key_file": key, "checkpoint_dir": tmp_path / "served"}
    )
    app = create_app(configured, db.Database(database_url, embedded=False))
    with TestClient(app):
        deadline = time.monotonic() + 20
        while not list((tmp_path / "served").glob("*.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
    (file,) = (tmp_path / "served").glob("checkpoint-000000000006-*.json")
    assert _verify(database_url, key, file).exit_code == 0


def test_verify_after_a_key_rotation_takes_the_old_key_and_the_new_one(
    client, key, database_url, tmp_path
) -> None:
    """One key per run: after a rotation, the checkpoint files signed by the old key could
    not be checked beside the new ones, and the stored ones it signed were left out."""
    record_history(client)
    old_file = _checkpoint(database_url, key, tmp_path / "old")
    new_key = tmp_path / "keys" / "checkpoint-key-2.pem"
    assert cli(database_url, "keygen", "--out", str(new_key)).exit_code == 0
    new_file = _checkpoint(database_url, new_key, tmp_path / "new")
    files = ["--checkpoint", str(old_file), "--checkpoint", str(new_file)]

    both = cli(
        database_url,
        "verify",
        *files,
        "--public-key",
        f"{key}.pub",
        "--public-key",
        f"{new_key}.pub",
    )
    assert both.exit_code == 0, both.output
    assert "2 stored, 2 stored signatures verified)" in both.output
    assert f"matches checkpoint file {old_file.name}" in both.output
    assert f"matches checkpoint file {new_file.name}" in both.output

    only_new = cli(database_url, "verify", *files, "--public-key", f"{new_key}.pub")
    assert only_new.exit_code == 1
    old_id = signing.key_id(signing.load_public(Path(f"{key}.pub")))
    assert f"{old_file.name} was signed by key {old_id}" in only_new.output
    assert "--public-key is repeatable" in only_new.output

    stored_only = cli(database_url, "verify", "--public-key", f"{new_key}.pub")
    assert stored_only.exit_code == 0, stored_only.output
    assert "1 stored signatures verified, 1 signed by another key not used" in stored_only.output


def _rewrite(engine, *, drop_checkpoints: bool = True) -> None:
    """Edit a decision, recompute every hash after it, drop the stored checkpoints."""
    tamper(
        engine,
        "UPDATE delivery_log SET payload = convert_to(replace(convert_from(payload, 'UTF8'),"
        " '\"bob\"', '\"mallory\"'), 'UTF8') WHERE seq = 2",
        *(["DELETE FROM checkpoints"] if drop_checkpoints else []),
    )
    rehash_from(engine, 2)


def test_checkpoint_refuses_to_sign_a_head_that_does_not_extend_its_last_one(
    client, key, database_url, engine, tmp_path
):
    """Signed as asked, the rewritten head got a fresh signature: an auditor handed the
    newest file (and every evidence pack, which carries the newest checkpoint) saw an
    intact, signed chain. The file signed before the rewrite is what refuses it."""
    record_history(client)
    directory = tmp_path / "cp"
    _checkpoint(database_url, key, directory)
    again = cli(database_url, "checkpoint", "--key", str(key), "--dir", str(directory))
    assert again.exit_code == 0, again.output  # the same head extends itself
    _rewrite(engine)
    refused = cli(database_url, "checkpoint", "--key", str(key), "--dir", str(directory))
    assert refused.exit_code == 1
    assert "the log's hash at seq 6 is not the one the checkpoint signed at" in refused.output
    assert "history was rewritten; not signed" in refused.output
    assert "--restored" in refused.output
    assert len(list(directory.glob("checkpoint-*.json"))) == 2
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM checkpoints")).scalar_one() == 0
    restored = cli(
        database_url, "checkpoint", "--key", str(key), "--dir", str(directory), "--restored"
    )
    assert restored.exit_code == 0, restored.output
    # Signed by an operator's word, it is the head later ones must extend.
    assert cli(database_url, "checkpoint", "--key", str(key)).exit_code == 0


def test_serves_signer_refuses_a_cut_or_rewritten_log_it_signed_before(
    client, key, database_url, engine
):
    """Without a directory, what serve signed last is remembered by the process: deleting
    the stored checkpoints does not make it forget."""
    record_history(client)
    private = signing.load_private(key)
    signed = integrity.checkpoint_if_new(engine, private, None)
    assert signed is not None
    assert integrity.checkpoint_if_new(engine, private, None, signed[0]) is None  # nothing new
    tamper(
        engine,
        "DELETE FROM review_events WHERE seq >= 5",
        "DELETE FROM delivery_log WHERE seq >= 5",
        "DELETE FROM checkpoints",
    )
    with pytest.raises(integrity.HeadNotExtended, match=r"rows 5\.\.6 were removed"):
        integrity.checkpoint_if_new(engine, private, None, signed[0])
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM checkpoints")).scalar_one() == 0
    # Forgotten (a restart, and the table emptied): nothing left to compare with.
    assert integrity.checkpoint_if_new(engine, private, None) is not None


def test_without_hard_links_a_checkpoint_file_is_synced_or_not_left_at_all(
    tmp_path, monkeypatch
) -> None:
    """On storage without hard links (object storage mounts) the file was written straight
    and never synced: a crash or a full disk left a truncated file standing as evidence.
    And a partial file the storage refused to remove made a written checkpoint fail."""

    def no_links(_src: object, _dst: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(signing.os, "link", no_links)
    real_unlink = Path.unlink

    def locked(self: Path, missing_ok: bool = False) -> None:
        if self.name.endswith(".partial"):
            raise OSError(errno.EPERM, "object is locked")
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", locked)
    written = signing.write_file(tmp_path / "ok", _signed(1))
    assert json.loads(written.read_bytes())["seq"] == 1
    synced: list[int] = []
    real_fsync = signing.os.fsync

    def full_on_second(fd: int) -> None:
        synced.append(fd)
        if len(synced) == 2:  # the partial file synced; the final one does not
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(signing.os, "fsync", full_on_second)
    with pytest.raises(OSError, match="No space left"):
        signing.write_file(tmp_path / "full", _signed(2))
    assert not list((tmp_path / "full").glob("checkpoint-*.json"))


def test_a_stored_checkpoint_whose_key_id_was_edited_is_still_held_to_the_chain(
    client, key, database_url, engine
):
    """key_id is outside the signed message: set to a key not given, a checkpoint the
    given key signed was left out as "signed by another key", and with the key given,
    verify passed a log rewritten behind it (without the key it was held to the chain)."""
    record_history(client)
    assert cli(database_url, "checkpoint", "--key", str(key)).exit_code == 0
    _rewrite(engine, drop_checkpoints=False)
    tamper(engine, "UPDATE checkpoints SET key_id = 'someone-else'")
    keyed = cli(database_url, "verify", "--public-key", f"{key}.pub")
    assert keyed.exit_code == 1, keyed.output
    assert "differs from stored checkpoint #1 (seq 6)" in keyed.output


def test_the_signer_is_not_fooled_by_an_edited_key_id_or_a_rewrite_at_the_same_seq(
    client, key, database_url, engine
):
    """The head's seq unchanged, a rewrite went unreported until the next delivery; and the
    signer looked for its stored checkpoints by key_id, which is not signed."""
    record_history(client)
    private = signing.load_private(key)
    assert integrity.checkpoint_if_new(engine, private, None) is not None
    tamper(engine, "UPDATE checkpoints SET key_id = 'someone-else'")
    _rewrite(engine, drop_checkpoints=False)
    with pytest.raises(integrity.HeadNotExtended, match="history was rewritten"):
        integrity.checkpoint_if_new(engine, private, None)


def test_restored_is_refused_while_the_last_checkpoint_is_dated_ahead_of_this_clock(
    client, key, database_url, engine, tmp_path
):
    """A replica whose clock ran ahead signed last: a restored head signed now would not be
    the newest by signing time, and every later check would go on refusing."""
    record_history(client)
    private = signing.load_private(key)
    ahead = signing.sign(private, 6, bytes(32), datetime(2999, 1, 1, tzinfo=UTC))
    signing.write_file(tmp_path / "cp", ahead)
    result = cli(
        database_url, "checkpoint", "--key", str(key), "--dir", str(tmp_path / "cp"), "--restored"
    )
    assert result.exit_code == 1
    assert "after this host's clock" in result.output
    assert len(list((tmp_path / "cp").glob("checkpoint-*.json"))) == 1
