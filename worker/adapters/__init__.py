"""The outside world, each behind a small interface: the provider (WaveSpeed), S3, the database,
and what the fleet shares through Redis (limiter, breaker, journal, fleet marks; keys in redis_keys).
"""
