"""Initial schema: the tables of driftloop before the post-promotion watch.

Equal to what ``Base.metadata.create_all`` made at commit 03effb7, the last
release without migrations, so such a database is stamped at this revision.

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
        "events",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("timestamp", sa.Float(), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("predicted_label", sa.String(256), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("version", sa.String(128), nullable=True),
        sa.Column("window_id", sa.String(64), nullable=True),
        sa.Column("true_label", sa.String(256), nullable=True),
        sa.Column("labelled_at", sa.Float(), nullable=True),
    )
    for column in ("received_at", "version", "window_id", "labelled_at"):
        op.create_index(f"ix_events_{column}", "events", [column])

    op.create_table(
        "pending_labels",
        sa.Column("event_id", sa.String(128), primary_key=True),
        sa.Column("label", sa.String(256), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_pending_labels_received_at", "pending_labels", ["received_at"])

    op.create_table(
        "windows",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("version", sa.String(128), nullable=True),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("ended_at", sa.Float(), nullable=False),
        sa.Column("evaluated_at", sa.Float(), nullable=False),
        sa.Column("n_events", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("drifted", sa.Boolean(), nullable=False),
        sa.Column("report", sa.Text(), nullable=False),
    )
    op.create_index("ix_windows_ended_at", "windows", ["ended_at"])

    op.create_table(
        "runs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("base_version", sa.String(128), nullable=True),
        sa.Column("candidate_dir", sa.Text(), nullable=True),
        sa.Column("promoted_version", sa.String(128), nullable=True),
        sa.Column("trigger", sa.Text(), nullable=False),
        sa.Column("training", sa.Text(), nullable=False),
        sa.Column("canary", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
    )
    op.create_index("ix_runs_state", "runs", ["state"])

    op.create_table(
        "versions",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("number", sa.Integer(), nullable=False, unique=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("adapter_dir", sa.Text(), nullable=False),
        sa.Column("parent", sa.String(128), nullable=True),
        sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.id"), nullable=True),
        sa.Column("train_data", sa.Text(), nullable=True),
    )

    op.create_table(
        "active_version",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("version", sa.String(128), sa.ForeignKey("versions.name"), nullable=False),
        sa.Column("changed_at", sa.Float(), nullable=False),
    )

    op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("timestamp", sa.Float(), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("run_id", sa.String(64), nullable=True),
        sa.Column("version", sa.String(128), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
    )
    op.create_index("ix_audit_timestamp", "audit", ["timestamp"])


def downgrade() -> None:
    for table in ("audit", "active_version", "versions", "runs", "windows", "pending_labels", "events"):
        op.drop_table(table)
