"""Replication: where an association came from, and each peer's push state.

An association replicated from a peer is stored among the bindings (source 'local'),
one row per address like the server's own, with the peer's name and the id it has
there; the server's own rows have no origin.  The partial index serves the pusher,
which reads the server's own changes after a peer's cursor.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

OWN_ROWS = "source = 'local' AND origin_server IS NULL"


def upgrade() -> None:
    op.add_column("threepid_associations",
                  sa.Column("origin_server", sa.String(255), nullable=True))
    op.add_column("threepid_associations", sa.Column("origin_id", sa.BigInteger, nullable=True))
    op.create_index("ix_threepid_own_changes", "threepid_associations", ["id"],
                    sqlite_where=sa.text(OWN_ROWS), postgresql_where=sa.text(OWN_ROWS))
    op.add_column("replication_peers", sa.Column("last_success_ts", sa.BigInteger,
                                                 nullable=True))
    op.add_column("replication_peers", sa.Column("last_error", sa.Text, nullable=True))
    op.add_column("replication_peers", sa.Column("last_error_ts", sa.BigInteger,
                                                 nullable=True))


def downgrade() -> None:
    for column in ("last_error_ts", "last_error", "last_success_ts"):
        op.drop_column("replication_peers", column)
    op.drop_index("ix_threepid_own_changes", "threepid_associations")
    for column in ("origin_id", "origin_server"):
        op.drop_column("threepid_associations", column)
