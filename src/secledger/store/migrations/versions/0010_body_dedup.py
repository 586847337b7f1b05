"""One GitLab event delivered through several hooks is logged once.

* ``delivery_log.body_sha256`` and the index ``delivery_log_body``: a project hook and a
  group hook send the same event's body byte for byte, each with its own
  ``Idempotency-Key``; the recording path looks the body's SHA-256 up, under the chain
  lock, and answers ``duplicate``. The writer stores the hash it computed anyway for that
  lookup, so PostgreSQL hashes no payload at insert (its ``sha256`` measured ~30 µs per
  6 KB body, more than the rest of the log insert). Rows logged before this revision keep
  a NULL (the log refuses UPDATE, and needs none): the index is on
  ``coalesce(body_sha256, sha256(payload))``, so building it hashes each of their
  payloads once. Not a generated column: adding one rewrites the whole log under an
  exclusive lock and hashes in PostgreSQL at every insert. The column is not part of the
  chain: it is derived from ``payload``, which is.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

UPGRADE = """
ALTER TABLE delivery_log ADD COLUMN body_sha256 bytea;
-- NOT VALID: existing rows are all NULL; every new row is checked.
ALTER TABLE delivery_log ADD CONSTRAINT delivery_log_body_sha256_length
    CHECK (octet_length(body_sha256) = 32) NOT VALID;
COMMENT ON COLUMN delivery_log.body_sha256 IS
  'SHA-256 of payload, written with each row since revision 0010 (NULL before); not chained.';
CREATE INDEX delivery_log_body ON delivery_log ((coalesce(body_sha256, sha256(payload))));
"""

DOWNGRADE = """
DROP INDEX delivery_log_body;
ALTER TABLE delivery_log DROP COLUMN body_sha256;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
