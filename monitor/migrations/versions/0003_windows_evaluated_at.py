"""Index on windows.evaluated_at: the leader reads the windows of every replica by evaluation time.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_windows_evaluated_at", "windows", ["evaluated_at"])


def downgrade() -> None:
    op.drop_index("ix_windows_evaluated_at", table_name="windows")
