"""Alembic migrations of the service database, applied by `cds_hooks.db.migrate` (no alembic.ini:
the configuration is built in code by `cds_hooks.db.alembic_config`).

Add one: write ``versions/rNNNN_what_it_does.py`` with ``revision = "NNNN_what_it_does"`` and
``down_revision`` = the previous revision id, using ``op.create_table``/``op.add_column`` with explicit
constraint names (the naming convention of `cds_hooks.db.metadata`), and change the tables in
`cds_hooks.db` to match; ``tests/integration/test_database.py`` fails if the two disagree. Never edit
a migration that has been released: databases in the field already ran it.
"""
