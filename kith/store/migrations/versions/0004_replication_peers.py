"""Replication peers taken over from Sydent: their names, ports, URLs and public keys.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "replication_peers",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("port", sa.Integer, nullable=True),
        sa.Column("base_replication_url", sa.Text, nullable=True),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("last_sent_version", sa.BigInteger, nullable=True),
    )
    op.create_table(
        "replication_peer_keys",
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("alg", sa.String(64), nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("name", "alg", name="pk_replication_peer_keys"),
    )


def downgrade() -> None:
    for table in ("replication_peer_keys", "replication_peers"):
        op.drop_table(table)
