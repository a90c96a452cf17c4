"""The sections of the serving settings (config.py's `ServeSettings` holds one of each): what one request may ask
for (`Limits`), the classes of caller and their keys (`Tier`, `ApiKey`, `KeySource`: digests from a secret), the
ingress's job queue (`QueueConfig`) and the generator's dynamic batching (`BatchConfig`). Each checks its own values
when built and names the key it refuses (`ConfigError`, one line).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from sora_model.config import ConfigError


@dataclass
class Limits:
    """What one request may ask for. Every rejection names the field here that it broke."""

    max_prompt_chars: int = 2000
    """Long enough for any caption; the text encoder truncates to its max_length tokens anyway."""
    max_frames: int = 128
    max_pixels: int = 512 * 512
    """height x width of one frame; cost grows with its square (full attention over all tokens)."""
    max_side: int = 1024
    max_steps: int = 100
    """More sampling steps stop helping long before this; it bounds the time one request can hold a replica."""
    min_guidance: float = 1.0
    """1 turns classifier-free guidance off; below 1 pushes away from the prompt, which nobody wants."""
    max_guidance: float = 20.0
    samplers: list[str] | None = None
    """Samplers a request may pick; None allows every sampler valid for the export's noise schedule."""
    max_seconds: float = 60.0
    """Upper bound of the OpenAI `seconds` field, before it is turned into frames."""

    def __post_init__(self) -> None:
        for name in ("max_prompt_chars", "max_frames", "max_pixels", "max_side", "max_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"limits.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.min_guidance <= self.max_guidance:
            raise ConfigError(
                f"limits need 0 <= min_guidance <= max_guidance, got {self.min_guidance}, {self.max_guidance}"
            )


@dataclass
class Tier:
    """A class of user, picked by API key: its own limits (tightening the global ones) and priority."""

    priority: int = 0
    """Higher is dispatched to the generator first when jobs wait."""
    max_frames: int | None = None
    max_pixels: int | None = None
    max_steps: int | None = None
    default_steps: int | None = None
    """Steps when the request gives none; a preview tier sets few (cheaper, blurrier)."""
    max_pending_jobs: int | None = None
    """Jobs of this tier waiting or running at once (all replicas together); beyond it answers 429."""
    max_pending_per_key: int | None = None
    """Jobs one API key (its owner) may have waiting or running at once: the in-flight cap that keeps one
    busy client from filling its tier's share; beyond it answers 429."""
    max_jobs_per_hour_per_key: int | None = None
    """Quota: jobs one owner may create in a rolling hour; beyond it answers 429 with when to retry. Counted
    in a usage ledger that deleting a video does not touch."""
    cache_hit_weight: float = 0.25
    """What a result-cache hit costs against max_jobs_per_hour_per_key, in jobs: cheaper than sampling (no
    generator time) but not free (a stored copy, a database row, a download)."""
    job_deadline_s: float | None = None
    """A job not finished this long after it was accepted fails with `deadline_exceeded` (queued or
    sampling), so a backlog never holds a client's job forever. None: no deadline."""

    def __post_init__(self) -> None:
        for name in ("max_pending_jobs", "max_pending_per_key", "max_jobs_per_hour_per_key"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"tiers.*.{name} must be >= 1, got {value}")
        if self.job_deadline_s is not None and self.job_deadline_s <= 0:
            raise ConfigError(f"tiers.*.job_deadline_s must be > 0, got {self.job_deadline_s}")
        if not 0 < self.cache_hit_weight <= 1:
            raise ConfigError(f"tiers.*.cache_hit_weight must be in (0, 1], got {self.cache_hit_weight}")


@dataclass
class ApiKey:
    """One API key's entry: its tier and the owner its videos belong to."""

    tier: str
    owner: str | None = None
    """A stable user id: give a rotated key the same owner and the user keeps their videos. None: the
    first 16 hex digits of the key's digest (videos then belong to that key alone)."""
    role: Literal["user", "admin"] = "user"
    """`admin` sees, lists and deletes every owner's videos (operators); `user` only its owner's."""


@dataclass
class KeySource:
    """Where the API key digests live outside the config: exactly one of an environment variable or a file
    (a Kubernetes Secret as env or mounted file). It holds YAML (or JSON) of the `api_keys` shape,
    {DIGEST: TIER or {tier, owner, role}}, read where each replica starts or is reconfigured."""

    env: str | None = None
    file: str | None = None

    def __post_init__(self) -> None:
        if (self.env is None) == (self.file is None):
            raise ConfigError("api_keys_from needs exactly one of env: NAME or file: PATH")

    def read(self) -> dict[str, Any]:
        import yaml

        where = f"api_keys_from.env {self.env}" if self.env else f"api_keys_from.file {self.file}"
        if self.env is not None:
            if self.env not in os.environ:
                raise ConfigError(
                    f"{where} is not set (it must hold the key digests: `sora serve --hash-key KEY` makes one)"
                )
            text = os.environ[self.env]
        else:
            try:
                with open(os.path.expanduser(self.file)) as f:
                    text = f.read()
            except OSError as err:
                raise ConfigError(f"{where} cannot be read: {err.strerror}") from None
        try:
            data = yaml.safe_load(text) if text.strip() else {}
        except yaml.YAMLError:
            raise ConfigError(f"{where} is not YAML/JSON of the api_keys shape {{DIGEST: TIER}}") from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"{where} must hold a mapping {{DIGEST: TIER or {{tier, owner, role}}}}, got {type(data).__name__}"
            )
        return data


@dataclass
class QueueConfig:
    """The ingress's own bounded job queue in front of the generator (the article's queue of 100)."""

    max_pending_jobs: int = 100
    """Accepted jobs not yet finished, all ingress replicas together (counted in the database); beyond it
    a create answers 503 + Retry-After."""
    max_in_flight: int = 16
    """Jobs one ingress replica has leased and handed to the generator deployment at once; must be >= the
    batch size for batching to fill."""
    lease_ttl_s: float = 30.0
    """How long a claimed job stays with its holder without a renewal. Holders renew every third of it
    (the generator at each sampling step), so a job whose replica died is claimable again after at
    most this long. Must exceed the longest gap between two sampling steps."""
    claim_interval_s: float = 0.5
    """How often an idle dispatcher looks for claimable jobs (jobs accepted by the replica itself, and
    freed slots, wake it at once): the delay before another replica's job or a lapsed lease is picked up."""
    retry_after_s: int = 5
    """What a 429/503 tells the client to wait."""
    max_attempts: int = 3
    """Tries per job when a generator replica dies under it or its sampling stalls (the job is retried, on
    another replica when there is one); the reason of each is recorded on the job."""
    stall_timeout_s: float = 300.0
    """A running job whose generator reports no sampling step (or stored file) for this long loses its lease and
    is retried: longer than the slowest step of the biggest model served (a 14B model's 720p step takes tens of
    seconds on one GPU), short enough that a hung replica does not hold a job for good."""
    poll_after_ms: int = 500
    """Longest `openai-poll-after-ms` on unfinished jobs (the SDK's create_and_poll waits what the header says).
    A job whose sampling time is known gets the time left instead when that is shorter, so a client polls
    about when it finishes rather than up to this long after."""
    min_poll_after_ms: int = 20
    """Shortest poll hint: for a job about to finish, or one just queued or started (its pace not yet known)."""

    def __post_init__(self) -> None:
        for name in ("max_pending_jobs", "max_in_flight", "max_attempts", "poll_after_ms", "min_poll_after_ms"):
            if getattr(self, name) < 1:
                raise ConfigError(f"queue.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.5 <= self.lease_ttl_s <= 3600:
            raise ConfigError(f"queue.lease_ttl_s must be between 0.5 and 3600, got {self.lease_ttl_s}")
        if not 0.1 <= self.stall_timeout_s <= 24 * 3600:
            raise ConfigError(f"queue.stall_timeout_s must be between 0.1 and 86400, got {self.stall_timeout_s}")
        if not 0.01 <= self.claim_interval_s <= self.lease_ttl_s:
            raise ConfigError(
                f"queue.claim_interval_s must be between 0.01 and lease_ttl_s, got {self.claim_interval_s}"
            )
        if self.min_poll_after_ms > self.poll_after_ms:
            raise ConfigError(
                f"queue needs min_poll_after_ms <= poll_after_ms, got {self.min_poll_after_ms} > {self.poll_after_ms}"
            )


@dataclass
class BatchConfig:
    """Dynamic batching on the generator (`@serve.batch`)."""

    max_batch_size: int = 4
    """Requests sampled in one pipeline call (same frames, size, steps and sampler)."""
    batch_wait_timeout_s: float = 0.05
    """How long the first request of a batch waits for company; small next to a generation's seconds."""

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ConfigError(f"batching.max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.batch_wait_timeout_s < 0:
            raise ConfigError(f"batching.batch_wait_timeout_s must be >= 0, got {self.batch_wait_timeout_s}")
