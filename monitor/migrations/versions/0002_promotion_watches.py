"""Post-promotion watch: one row per promoted version with its baseline and latest verdict.

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
        "promotion_watches",
        sa.Column("version", sa.String(128), primary_key=True),
        sa.Column("previous", sa.String(128), nullable=True),
        sa.Column("run_id", sa.String(64), nullable=True),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("baseline", sa.Text(), nullable=False),
        sa.Column("result", sa.Text(), nullable=False),
    )
    op.create_index("ix_promotion_watches_status", "promotion_watches", ["status"])


def downgrade() -> None:
    op.drop_table("promotion_watches")
