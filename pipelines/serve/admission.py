"""Admission of a create request, all ingress replicas together: the service's queue, the tier's share of it, the
key's in-flight cap and its hourly quota, counted in the job database (along its indexes). A refusal is a 503 or
429 with `Retry-After`, counted in the ingress's Prometheus registry under its reason."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from .config import ServeSettings, Tier
from .db import JobDB
from .errors import ApiError
from .metrics import ServeMetrics

OVERLOADED_CODE = "server_overloaded"
QUOTA_WINDOW_NS = 3600 * 10**9
"""tiers.*.max_jobs_per_hour_per_key counts the usage ledger over this rolling window."""


class Admission:
    def __init__(self, db: JobDB, metrics: ServeMetrics, stats: Counter, settings: Callable[[], ServeSettings]) -> None:
        self.db = db
        self.metrics = metrics
        self.stats = stats
        self.settings = settings  # the live settings (reconfigure replaces them)

    def refuse(self, status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> None:
        self.metrics.rejected.labels(reason=reason).inc()
        self.stats["rejected"] += 1
        code = OVERLOADED_CODE if status == 503 else "rate_limit_exceeded"
        err = ApiError(
            status, message, code=code, headers=headers or {"Retry-After": str(self.settings().queue.retry_after_s)}
        )
        err.reason = reason  # what the error counters label it with
        raise err

    def check_quota(self, tier_name: str, tier: Tier, owner: str, weight: float) -> None:
        """The owner's hourly quota against the usage ledger (deleting videos gives nothing back): 429 when
        `weight` more would pass it."""
        if tier.max_jobs_per_hour_per_key is None:
            return
        used = self.db.usage_since(owner, time.time_ns() - QUOTA_WINDOW_NS)
        if used + weight > tier.max_jobs_per_hour_per_key + 1e-9:
            hour = {"Retry-After": str(max(self.settings().queue.retry_after_s, 60))}
            self.refuse(
                429,
                "key_quota",
                f"This API key used {used:g} of its hourly quota of {tier.max_jobs_per_hour_per_key} jobs "
                f"(tiers.{tier_name}.max_jobs_per_hour_per_key; a cache hit counts {tier.cache_hit_weight:g}).",
                hour,
            )

    def admit(self, tier_name: str, tier: Tier, owner: str) -> None:
        """Admission, all replicas together (counts along the database's indexes): the service's queue,
        the tier's share of it, the key's in-flight cap and its hourly quota. 503/429 + Retry-After."""
        q = self.settings().queue
        refuse = self.refuse

        pending = self.db.count_unfinished()
        if pending >= q.max_pending_jobs:
            refuse(
                503,
                "queue_full",
                f"The server is at capacity ({q.max_pending_jobs} jobs waiting, queue.max_pending_jobs); retry after "
                f"{q.retry_after_s}s.",
            )
        if tier.max_pending_jobs is not None:
            n = self.db.count_unfinished(tier=tier_name)
            if n >= tier.max_pending_jobs:
                refuse(
                    429,
                    "tier_limit",
                    f"Tier '{tier_name}' already has {n} jobs waiting (tiers.{tier_name}.max_pending_jobs); retry "
                    f"after {q.retry_after_s}s.",
                )
        if tier.max_pending_per_key is not None:
            n = self.db.count_unfinished(owner=owner)
            if n >= tier.max_pending_per_key:
                refuse(
                    429,
                    "key_in_flight",
                    f"This API key already has {n} jobs waiting or running; the limit is {tier.max_pending_per_key} "
                    f"(tiers.{tier_name}.max_pending_per_key). Retry after {q.retry_after_s}s.",
                )
        self.check_quota(tier_name, tier, owner, 1.0)
