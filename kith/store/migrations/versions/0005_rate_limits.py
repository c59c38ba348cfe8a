"""Rate-limit buckets shared by every worker and instance on the database.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rate_limits",
        sa.Column("bucket", sa.String(96), primary_key=True),
        sa.Column("tat_us", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_rate_limits_tat_us", "rate_limits", ["tat_us"])


def downgrade() -> None:
    op.drop_index("ix_rate_limits_tat_us", "rate_limits")
    op.drop_table("rate_limits")
