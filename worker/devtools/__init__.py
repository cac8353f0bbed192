"""Tools for development, tests and demos, not the runtime: a local WaveSpeed-compatible sandbox,
child-process services (Redis, PostgreSQL, S3, the sandbox, Celery) and the demo."""
