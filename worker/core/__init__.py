"""The domain: job states and their transitions, the step vocabulary, error codes, the job service
(compare-and-set transitions with event rows, queries, outbox), input validation and backoff."""
