"""Validation sessions (requestToken / submitToken).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "threepid_validation_sessions",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("medium", sa.String(16), nullable=False),
        sa.Column("address", sa.Text, nullable=False),
        sa.Column("client_secret", sa.Text, nullable=False),
        sa.Column("validated_at", sa.BigInteger, nullable=True),
        sa.Column("mtime", sa.BigInteger, nullable=False),
        sa.Column("next_link", sa.Text, nullable=True),
        sa.Column("send_attempt", sa.Integer, nullable=False),
        sa.Column("token", sa.Text, nullable=False),
        sa.Column("failed_attempts", sa.Integer, nullable=False),
        sa.UniqueConstraint("medium", "address", "client_secret",
                            name="uq_validation_session_medium_address_secret"),
    )


def downgrade() -> None:
    op.drop_table("threepid_validation_sessions")
