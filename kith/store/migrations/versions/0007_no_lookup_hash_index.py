"""No index on the associations' lookup hashes.

Lookups are answered from each process's in-memory index, never by a query on the hash,
so the index only cost writes: every bind moved an entry in it, and a change of the
lookup pepper, which rewrites every stored hash, spent most of its time there (about
three quarters on SQLite; docs/performance.md).  It was also about a quarter of a
SQLite store (29 of 121 MB at 500k bindings); SQLite keeps the freed pages for later
rows (VACUUM gives them back).

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # (An operator may have dropped it by hand already.)
    op.drop_index("ix_threepid_lookup_hash", "threepid_associations", if_exists=True)


def downgrade() -> None:
    op.create_index("ix_threepid_lookup_hash", "threepid_associations", ["lookup_hash"],
                    if_not_exists=True)
