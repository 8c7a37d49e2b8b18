"""Alembic environment of the driftloop store.

``monitor.migrations.upgrade_database`` passes an open connection in
``config.attributes["connection"]``; the ``alembic`` command line, run with a
``sqlalchemy.url`` option, opens its own.
"""

from alembic import context
from sqlalchemy import create_engine

from monitor.store import Base


def run_migrations(connection) -> None:
    # Batch mode rebuilds a SQLite table for the ALTER operations SQLite lacks.
    context.configure(connection=connection, target_metadata=Base.metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database: set sqlalchemy.url in the Alembic config, or run `driftloop db upgrade`")
    engine = create_engine(url)
    with engine.begin() as own:
        run_migrations(own)
    engine.dispose()
