"""Everything that talks to PostgreSQL.

Store functions never commit: the caller owns the transaction.
"""
