"""The query that checks the whole hash chain with PostgreSQL alone.

An auditor runs it with ``psql`` and read access, no secledger needed; it is printed in
``docs/integrity.md`` (a test holds the two equal) and shipped in every evidence pack as
``chain/check-chain.sql``, so the pack's instructions do not point outside it. It
recomputes each row's canonical bytes (``store/chain.py``'s format) and returns the rows
whose hash, link or sequence is wrong: none on a sound chain.
"""

from __future__ import annotations

CHECK_CHAIN = r"""WITH canon AS (
    SELECT d.seq, d.prev_hash, d.hash, c.canonical, d.received_at,
           lag(d.hash) OVER (ORDER BY d.seq) AS before,
           row_number() OVER (ORDER BY d.seq) AS position
    FROM public.delivery_log d
    CROSS JOIN LATERAL (
        SELECT convert_to(E'secledger.log.v1\n', 'UTF8') || string_agg(
                   convert_to(f.name || ' ' || octet_length(f.value) || E'\n', 'UTF8')
                   || f.value || '\x0a'::bytea, ''::bytea ORDER BY f.ord) AS canonical
        FROM (VALUES
            (1, 'seq', convert_to(d.seq::text, 'UTF8')),
            (2, 'received_at', convert_to(to_char(d.received_at AT TIME ZONE 'UTC',
                                                  'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), 'UTF8')),
            (3, 'source', convert_to(d.source, 'UTF8')),
            (4, 'event', convert_to(d.event, 'UTF8')),
            (5, 'instance', convert_to(d.instance, 'UTF8')),
            (6, 'dedup_key', convert_to(d.dedup_key, 'UTF8')),
            (7, 'headers', convert_to(d.headers, 'UTF8')),
            (8, 'payload', d.payload)
        ) AS f(ord, name, value)
    ) c
)
SELECT seq,
       CASE WHEN seq <> position THEN 'sequence gap'
            WHEN received_at < '0001-01-01T00:00:00Z' THEN 'received_at before year 1'
            WHEN prev_hash <> coalesce(before, decode(repeat('00', 32), 'hex'))
                THEN 'broken link'
            ELSE 'hash mismatch' END AS problem
FROM canon
WHERE seq <> position
   OR received_at < '0001-01-01T00:00:00Z'  -- to_char's YYYY drops the era: 4051 BC reads as AD
   OR prev_hash <> coalesce(before, decode(repeat('00', 32), 'hex'))
   OR sha256(prev_hash || canonical) <> hash
ORDER BY seq;
"""

# A login's default search path looks in a schema named after it first, where the
# database's owner could leave a pristine copy of the log; the queries name their table
# with the schema. Their path leaves public out as well: the owner may create functions
# there, and one taking text where the catalog's convert_to takes name was picked for
# the untyped 'UTF8', free to hash an edited column's old bytes (pg_temp is never
# searched for functions). A log cut at its end has no wrong row: the last seq and
# head, printed after, tell it.
AUDIT_SEARCH_PATH = "pg_catalog, pg_temp"
CHECK_CHAIN_FILE = (
    "-- secledger: check every row of the hash chain. The first query lists the rows whose\n"
    "-- hash, link or sequence is wrong (none on a sound chain); the second prints the log's\n"
    "-- last seq and head hash, to compare with a checkpoint (rows removed at the end).\n"
    "-- Run: psql -X -f chain/check-chain.sql 'postgresql://auditor@db.example.com/secledger'\n"
    f"SET search_path = {AUDIT_SEARCH_PATH};\n"
    + CHECK_CHAIN
    + "SELECT seq AS last_seq, encode(hash, 'hex') AS head_hash\n"
    "FROM public.delivery_log ORDER BY seq DESC LIMIT 1;\n"
)
