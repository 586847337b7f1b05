"""Alembic environment: migrations run on a connection secledger hands over."""

from __future__ import annotations

from alembic import context
from pydantic import ValidationError
from sqlalchemy import Connection

from secledger.config import Settings, describe
from secledger.store import db


def _run(connection: Connection) -> None:
    context.configure(connection=connection, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Use the connection from ``secledger db upgrade``, or connect as configured."""
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    try:
        settings = Settings()
    except ValidationError as exc:  # pydantic's own text would quote a URL's password
        raise SystemExit(f"invalid configuration: {describe(exc)}") from None
    engine = db.create(db.resolve(settings).url, pool_size=1)
    with engine.begin() as conn:
        _run(conn)


if context.is_offline_mode():
    raise SystemExit("secledger migrations need a live database (offline SQL is not supported)")
run_migrations_online()
