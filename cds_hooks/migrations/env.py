"""Alembic environment: runs the migrations on the connection `cds_hooks.db.migrate` hands over, in
the caller's transaction (which holds the lock that serialises replicas). Offline (SQL script) mode
is not supported."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from cds_hooks.db import metadata

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("run the migrations with cds_hooks.db.migrate(engine), which passes a connection")

context.configure(
    connection=connection,
    target_metadata=metadata,
    compare_type=True,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
