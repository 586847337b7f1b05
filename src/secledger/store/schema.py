"""Table definitions used by queries; the migrations are the authority on DDL."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

metadata = MetaData()

delivery_log = Table(
    "delivery_log",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("source", Text, nullable=False),
    Column("event", Text, nullable=False),
    Column("instance", Text, nullable=False),
    Column("dedup_key", Text, nullable=False, unique=True),
    Column("headers", Text, nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("prev_hash", LargeBinary, nullable=False),
    Column("hash", LargeBinary, nullable=False),
    Column("body_sha256", LargeBinary),
)

review_events = Table(
    "review_events",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("instance", Text, nullable=False),
    Column("project_id", BigInteger, nullable=False),
    Column("mr_iid", BigInteger, nullable=False),
    Column("event_at", DateTime(timezone=True), nullable=False),
    Column("kind", Text, nullable=False),
    Column("decision", Text),
    Column("actor", Text),
    Column("facts", JSONB, nullable=False),
)

security_review_ledger = Table(
    "security_review_ledger",
    metadata,
    Column("instance", Text, primary_key=True),
    Column("project_id", BigInteger, primary_key=True),
    Column("mr_iid", BigInteger, primary_key=True),
    Column("mr_id", BigInteger),
    Column("project_path", Text),
    Column("title", Text),
    Column("url", Text),
    Column("author_id", BigInteger),
    Column("risk_tier", Text, nullable=False),
    Column("security_labels", ARRAY(Text), nullable=False),
    Column("state", Text),
    Column("decision", Text),
    Column("decided_by", Text),
    Column("decided_at", DateTime(timezone=True)),
    Column("reviewer", Text),
    Column("approvers", ARRAY(Text), nullable=False),
    Column("assigned_reviewers", ARRAY(Text), nullable=False),
    Column("labeled_at", DateTime(timezone=True)),
    Column("labeled_at_source", Text),
    Column("labeled_by", Text),
    Column("time_to_decision_seconds", Float),
    Column("merged_by", Text),
    Column("merged_at", DateTime(timezone=True)),
    Column("closed_by", Text),
    Column("closed_at", DateTime(timezone=True)),
    Column("last_event_at", DateTime(timezone=True), nullable=False),
    Column("last_seq", BigInteger, nullable=False),
    Column("event_count", Integer, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
