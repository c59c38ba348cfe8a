"""Initial schema: associations, accounts and tokens, terms acceptances, server state.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "threepid_associations",
        # BIGSERIAL on PostgreSQL; INTEGER on SQLite, whose rowid is 64-bit already
        # and which allows AUTOINCREMENT only on INTEGER PRIMARY KEY.
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  primary_key=True, autoincrement=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("medium", sa.String(16), nullable=False),
        sa.Column("address", sa.Text, nullable=False),
        sa.Column("mxid", sa.Text, nullable=True),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.Column("not_before", sa.BigInteger, nullable=False),
        sa.Column("not_after", sa.BigInteger, nullable=False),
        sa.Column("lookup_hash", sa.String(64), nullable=False),
        sa.UniqueConstraint(
            "source", "medium", "address", name="uq_threepid_source_medium_address"
        ),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_threepid_lookup_hash", "threepid_associations", ["lookup_hash"])
    op.create_table(
        "accounts",
        sa.Column("user_id", sa.Text, primary_key=True),
        sa.Column("created_ts", sa.BigInteger, nullable=False),
        sa.Column("consent_version", sa.Text, nullable=True),
    )
    op.create_table(
        "account_tokens",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("created_ts", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_account_tokens_user_id", "account_tokens", ["user_id"])
    op.create_table(
        "accepted_terms_urls",
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.UniqueConstraint("user_id", "url", name="uq_accepted_terms_user_url"),
    )
    op.create_table(
        "server_state",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "server_state",
        "accepted_terms_urls",
        "account_tokens",
        "accounts",
        "threepid_associations",
    ):
        op.drop_table(table)
