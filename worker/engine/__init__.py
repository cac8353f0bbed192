"""What runs in workers: the per-job steps (submit, poll, copy), the batch poller and submitter,
the reconciler, operator actions, wake-ups, and the Celery app with its thin tasks."""
