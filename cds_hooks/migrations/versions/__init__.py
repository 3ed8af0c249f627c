"""Migration scripts, oldest first (the file name's number is the order; Alembic follows
``down_revision``)."""
