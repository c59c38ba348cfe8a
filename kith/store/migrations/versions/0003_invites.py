"""3PID invites: pending invite tokens, ephemeral invite keys, the onbind delivery queue.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _id() -> sa.Column[int]:
    return sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                     primary_key=True, autoincrement=True)


def upgrade() -> None:
    op.create_table(
        "invite_tokens",
        _id(),
        sa.Column("medium", sa.String(16), nullable=False),
        sa.Column("address", sa.Text, nullable=False),
        sa.Column("room_id", sa.Text, nullable=False),
        sa.Column("sender", sa.Text, nullable=False),
        sa.Column("token", sa.String(255), nullable=False),
        sa.Column("received_ts", sa.BigInteger, nullable=False),
        sa.Column("sent_ts", sa.BigInteger, nullable=True),
        sa.UniqueConstraint("token", name="uq_invite_tokens_token"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_invite_tokens_medium_address", "invite_tokens",
                    ["medium", "address"])
    op.create_table(
        "ephemeral_public_keys",
        _id(),
        sa.Column("public_key", sa.String(64), nullable=False),
        sa.Column("verify_count", sa.Integer, nullable=False),
        sa.Column("persistence_ts", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("public_key", name="uq_ephemeral_public_keys_public_key"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "onbind_deliveries",
        _id(),
        sa.Column("destination", sa.Text, nullable=False),
        sa.Column("mxid", sa.Text, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("created_ts", sa.BigInteger, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_ts", sa.BigInteger, nullable=False),
        sa.Column("claimed_until", sa.BigInteger, nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("finished_ts", sa.BigInteger, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_onbind_deliveries_state_next", "onbind_deliveries",
                    ["state", "next_attempt_ts"])


def downgrade() -> None:
    for table in ("onbind_deliveries", "ephemeral_public_keys", "invite_tokens"):
        op.drop_table(table)
