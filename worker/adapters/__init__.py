"""The outside world: the WaveSpeed client, S3 storage, database engines, the shared Redis limits
(limiter, breaker, submission journal) and their keys, and webhook signing."""
