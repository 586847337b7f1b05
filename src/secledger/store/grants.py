"""What a login must be granted to record deliveries, asked of the database before it has to."""

from __future__ import annotations

from sqlalchemy import Connection, text

from secledger.errors import ConfigError

# Every table and privilege the recording path writes with (service.record_batch), and
# the sequences behind its tables' ids: the app role's grants (docs/integrity.md).
RECORDING = (
    ("delivery_log", "INSERT"),
    ("review_events", "INSERT"),
    ("security_review_ledger", "INSERT"),
    ("security_review_ledger", "UPDATE"),
    ("review_sla", "INSERT"),
    ("review_sla", "UPDATE"),
    ("findings", "INSERT"),
    ("findings", "UPDATE"),
    ("outbox", "INSERT"),
)
SEQUENCES = ("findings_id_seq",)


def missing_to_record(conn: Connection) -> list[str]:
    """The privileges this login lacks to record a delivery ("INSERT on review_events"),
    each asked on its own: ``has_table_privilege`` with a list is true when any holds."""
    checks = [
        f"has_table_privilege('{table}', '{privilege}')" for table, privilege in RECORDING
    ] + [f"has_sequence_privilege('{name}', 'USAGE')" for name in SEQUENCES]
    granted = conn.execute(text(f"SELECT {', '.join(checks)}")).one()
    wanted = [f"{privilege} on {table}" for table, privilege in RECORDING]
    wanted += [f"USAGE on sequence {name}" for name in SEQUENCES]
    return [name for name, held in zip(wanted, granted, strict=True) if not held]


def refuse_unless_recording(conn: Connection) -> None:
    """ConfigError when this login lacks a privilege recording needs: ``serve`` and
    ``spool drain`` ask at start. A login that may only read (secledger_readonly) started,
    said it was ready, and set every security delivery aside in failed/, answered 202."""
    missing = missing_to_record(conn)
    if missing:
        raise ConfigError(
            f"this database login may not record deliveries (no {', '.join(missing)}):"
            " serve, replay and spool drain need a login in secledger_app or the owner"
            " (docs/integrity.md, Roles and logins)"
        )
