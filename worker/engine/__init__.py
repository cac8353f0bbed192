"""What runs in the workers: one job's submit, the batch submitter and poller, the copier, the
reconciler, operator actions, wake-ups and the thin Celery tasks over them (all given a `Deps`).
"""
