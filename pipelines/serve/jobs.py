"""What crosses between the ingress's dispatcher and a generator replica, typed and frozen.

A video job takes these forms between request and result:

    HTTP body (JSON or multipart form) ──requests.py──► VideoRequest (pydantic: the OpenAI shape, api.py)
      ──resolve.resolve, once──► GenerationParams (frozen: the validated sampling request, params.py)
      ──params_to_doc──► the job row's `doc._params` (JSON; the row is db.py's, its schema unchanged)
      ──db.claim──► a claimed job (the row as a dict: lease token, attempts, retries, deadline)
      ──LeasedJob.claimed (params_from_doc)──► LeasedJob ══Ray handle══► Generator.generate
      ──► JobOutcome ══Ray handle══► Dispatcher._record, while the clip itself goes to the store

The params are parsed from the row once, by the dispatcher, and pass whole: the generator reads fields, never keys.
`params.params_to_doc` and `params.params_from_doc` are the one pair that writes and reads them in the database.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .metrics import JobReport
from .params import GenerationParams, params_from_doc


@dataclass(frozen=True)
class LeasedJob:
    """One claimed job as the dispatcher hands it to `Generator.generate`: every write about it names `token`."""

    id: str
    token: str
    """The lease (fencing) token of this attempt: db.py refuses writes under a token that no longer holds the job."""
    params: GenerationParams
    attempt: int
    deadline_ns: int | None
    """Not finished by then (unix ns): sampling stops and the job fails with `deadline_exceeded`."""
    lease_ttl_s: float
    retention_s: float | None
    alone: bool = False
    """Nothing else was queued at the ingress: the generator does not hold it for a batch."""

    @classmethod
    def claimed(
        cls, job: dict[str, Any], lease_ttl_s: float, retention_s: float | None, alone: bool = False
    ) -> LeasedJob:
        """From a job `db.claim` returned (its params parsed here, once)."""
        return cls(
            id=job["id"],
            token=job["_lease_token"],
            params=params_from_doc(job["_params"]),
            attempt=job["_attempts"],
            deadline_ns=job["_deadline_ns"],
            lease_ttl_s=lease_ttl_s,
            retention_s=retention_s,
            alone=alone,
        )


@dataclass(frozen=True)
class JobOutcome:
    """What `Generator.generate` answers for one job; the clip itself is in the store and the row says `completed`.

    ok and not skipped: sampled, stored, completed. skipped: not this attempt's to finish (deleted, finished
    elsewhere, its lease given up or taken over). not ok: failed, the row says why (`code`, `error`)."""

    ok: bool
    batch_id: str | None = None
    batch_size: int = 0
    skipped: bool = False
    error: str | None = None
    code: str | None = None
    seconds: float | None = None
    """Sampling time of the pipeline call the job rode in."""
    report: JobReport | None = None
    """What the job cost, for the ingress's Prometheus series (metrics.py)."""

    @classmethod
    def failed(cls, message: str, code: str) -> JobOutcome:
        return cls(ok=False, error=message, code=code)
