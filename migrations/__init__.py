"""Alembic migrations for the job database (`edit-worker migrate` runs `upgrade head`)."""
