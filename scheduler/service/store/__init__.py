"""Persistence: the tables and connections (db), small row reads and writes (rows), and the Alembic migrations."""
