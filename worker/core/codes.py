"""Error codes this worker writes on jobs (the `error.code` of the job JSON). Codes the provider
sends (numbers, `task_failed`, …) are stored as the provider spelled them."""

from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    DEADLINE = "deadline_exceeded"  # the job's deadline passed before it finished
    AMBIGUOUS_SUBMIT = "ambiguous_submit"  # a submit got no answer: the reconciler looks it up
    NEEDS_OPERATOR = "ambiguous_submit_needs_operator"  # the reconciler could not tell; `edit-worker resolve`
    NO_OUTPUTS = "no_outputs"  # the provider completed without outputs
    BAD_OUTPUT = "bad_output"  # an output is neither a URL nor valid base64
    TRANSIENT = "transient"  # a retried provider error without a code of its own
    REJECTED = "rejected"  # the provider refused without a code of its own
    DOWNLOAD_FAILED = "download_failed"  # an output could not be fetched, for good
    OUTPUT_FORBIDDEN = "output_forbidden"
    OUTPUT_TOO_LARGE = "output_too_large"
    INPUT_UNAVAILABLE = "input_unavailable"  # the input image could not be read from S3 at submit: retried
    OUTPUT_NOT_IMAGE = "output_not_image"  # an output's bytes (or declared type) are not an image

    def __str__(self) -> str:
        return self.value


def code_of(exc_code: object, default: ErrorCode) -> str:
    """The code to store for a provider error: its own code when it has one, else `default`."""
    return str(exc_code) if exc_code not in (None, "") else default.value
