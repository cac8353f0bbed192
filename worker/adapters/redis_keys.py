"""Every Redis key this worker uses, in one place. Keys live under a namespace (default
`edit-worker`) so several deployments can share one Redis; `once` keys (de-duplication marks and
per-node pass locks) are named here too, so no module spells a key by hand.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

DEFAULT_NAMESPACE = "edit-worker"


@dataclass(frozen=True)
class RedisKeys:
    namespace: str = DEFAULT_NAMESPACE

    def _k(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))

    @property
    def rate(self) -> str:  # zset: submissions in the rate window
        return self._k("rate")

    @property
    def active(self) -> str:  # zset: jobs holding a provider concurrency slot
        return self._k("active")

    @property
    def breaker(self) -> str:  # the breaker's open-until and reason
        return self._k("breaker")

    @property
    def breaker_tripped(self) -> str:  # set while the breaker is open (its TTL is the open time)
        return self._k("breaker", "tripped")

    @property
    def breaker_probe(self) -> str:  # the half-open breaker's one probe
        return self._k("breaker", "probe")

    @property
    def failures(self) -> str:  # transient provider failures in the outage window
        return self._k("failures")

    @property
    def typical_inference(self) -> str:  # the model's inference time, averaged fleet-wide
        return self._k("typical-inference")

    def copied(self, second: int) -> str:  # jobs the fleet copied out in one wall-clock second (adaptive pacing)
        return self._k("copied", str(second))

    @property
    def pace(self) -> str:  # the submission pacing token bucket
        return self._k("pace")

    @property
    def sweep_lock(self) -> str:  # one reconciler sweep at a time across the fleet
        return self._k("sweep-lock")

    @property
    def metrics(self) -> str:  # hash: the fleet's metric totals (field: sample name and labels as JSON)
        return self._k("metrics")

    @property
    def workers(self) -> str:  # hash: worker heartbeats (field: worker name, value: JSON pid, host, seen)
        return self._k("workers")

    def journal(self, job_id: str) -> str:  # the prediction id a job's submit created
        return self._k("submitted", job_id)

    def once(self, name: str) -> str:  # a `once` mark (see once_* below for the names)
        return self._k("once", name)


def wakeup_name(step: str, bucket: int) -> str:
    """The `once` name that de-duplicates a loop's wake-ups due in one half-second bucket."""
    return f"{step.replace('_', '-')}:{bucket}"


def webhook_seen_name(webhook_id: str) -> str:
    """The `once` name that remembers a delivered webhook (by a digest: the id is the sender's text)."""
    return f"webhook-seen:{hashlib.sha256(webhook_id.encode('utf-8', 'surrogatepass')).hexdigest()[:40]}"


def pass_lock_name(loop: str, node: str, slot: int) -> str:
    """The `once` name of a batch loop's pass slot on one worker node (`loop`: poller | submitter)."""
    return f"{loop}:{node}:{slot}"
