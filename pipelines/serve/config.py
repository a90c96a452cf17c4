"""Settings of the serving application: the `args` of a Serve config and the `user_config` of its deployments.

One typed tree, loaded with `sora_model.config.from_dict` (unknown keys and wrong types fail with a
one-line message naming the key). `ServeSettings` is what `app_builder(args)` takes; the runtime part
(`limits`, `tiers`, `api_keys`, `queue`, ...) can be changed on a live application through the ingress
deployment's `user_config`, and `batching` through the generator's, without restarting replicas. The sections
(limits, tiers and keys, queue, batching) are policy.py's; this module holds the tree, its loading and its checks
of where the server may listen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pipelines.parallel.config import ParallelConfig
from sora_model.config import ConfigError, from_dict

from .policy import ApiKey, BatchConfig, KeySource, Limits, QueueConfig, Tier

INGRESS_NAME = "VideoAPI"
GENERATOR_NAME = "Generator"
APP_NAME = "sora"
DEFAULT_STORE = os.path.join("~", ".cache", "sora-ray", "videos")
"""Where jobs and results go when `store` is unset: a folder that outlives replicas and restarts."""
DB_SCHEMES = ("sqlite:///", "postgresql://", "postgresql+psycopg://", "postgres://")
"""Databases job state is tested against: SQLite (embedded) and PostgreSQL (psycopg 3)."""
DB_FILE = "jobs.db"
"""The default SQLite database's file name, in the store folder."""
MODEL_ENV = "SORA_MODEL"
STORE_ENV = "SORA_SERVE_STORE"
DB_ENV = "SORA_SERVE_DB"
"""Environment variables the module-level `app` reads (for `serve run pipelines.serve.app:app`)."""
LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""What an adapter's name in `loras:` may be: what a request sends in its `lora` field."""


@dataclass
class ServeSettings:
    """The application: which export, where results go, and the runtime policy."""

    model: str
    """Export folder (`model.safetensors` + `config.json`), local or shared by all nodes."""
    model_name: str = "sora-ray"
    """The id `/v1/models` lists and video objects carry; `<model_name>-preview` is the few-step variant."""
    model_aliases: list[str] = field(default_factory=lambda: ["sora-2", "sora-2-pro"])
    """OpenAI model names accepted as this model, so code written for OpenAI runs unchanged."""
    store: str | None = None
    """Where videos live: a folder or any fsspec URI (s3://, gs://) shared by replicas; None is a local cache folder."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options of the store (e.g. {endpoint_url: ...} for an S3-compatible service); credentials
    come from the environment (AWS_ACCESS_KEY_ID, ...), never from this config."""
    db: str | None = None
    """Where job state lives: an SQLAlchemy URL. None: an SQLite file beside a local store (one machine);
    `postgresql://user:pass@host/db` for several nodes (SQLite needs every replica on one machine)."""
    download_redirect_s: float | None = 900.0
    """On stores that presign (s3://, gs://) a content request answers 307 to a signed URL valid this long:
    the client fetches the bytes (with Range) from the object store itself. Ray 2.60's HTTP proxy has no
    backpressure on streamed bodies (a fast replica's chunks queue in the proxy and the replica while a
    slower client reads), so big files are best kept out of it. None: always stream through the ingress."""
    download_port: int | None = 0
    """A folder store (which cannot presign) serves downloads from a file server in each ingress replica on this
    port (0: any free port), through the same signed 307, so the bytes do not pass through Serve's proxy
    (files.py); None streams them through the ingress. Followed only where the client reached this machine over
    plain HTTP; a fixed port must be open to clients."""
    retention_s: float | None = 7 * 24 * 3600
    """Finished jobs and their files are deleted this long after they finish (`expires_at` says when);
    a week, like a download link. None keeps them forever."""
    sweep_interval_s: float = 60.0
    """How often each ingress replica purges expired jobs and fails jobs past their deadline."""
    max_streaming_downloads: int = 4
    """Downloads each ingress replica pushes through Serve at once when no redirect can be used (streaming.py);
    more answer 503 with Retry-After. Serve 2.60 gives such a stream no backpressure, so each may push up to a
    whole clip into the replica's and the proxy's memory: this bounds how many are pushed at once, not clients."""
    orphan_sweep_interval_s: float = 900.0
    """How often each ingress replica lists the store for objects no job row holds (sweep.py): one listing of
    the content prefix each time (on S3 one LIST request per 1,000 objects), so less often than `sweep_interval_s`."""
    orphan_grace_s: float = 3600.0
    """An orphaned object is deleted only once it is this old (last modified): far longer than any upload or
    cache copy takes, so nothing being written is swept."""
    lora: str | None = None
    """A peft LoRA adapter folder merged into the model's weights when each replica loads it (a fine-tune
    served on its base export); local or shared by all nodes like `model`."""
    loras: dict[str, str] = field(default_factory=dict)
    """LoRA adapters a request may pick by name (`"lora": NAME`, our extension): {name: a peft adapter folder or a
    .safetensors file (diffusers or community Wan layouts)}. Applied per request without touching the base weights;
    local paths must exist at startup, and each is checked against the model when a generator replica starts."""
    lora_cache_bytes: int = 1 << 30
    """Bytes of adapters each generator replica keeps loaded (least recently used evicted first). A rank-32 adapter
    on every projection of Wan2.1-1.3B holds ~60 MB in fp32, so 1 GiB keeps about 16 resident; an adapter larger
    than this cannot be used (its requests answer 400)."""
    precision: Literal["fp32", "bf16", "int8"] = "fp32"
    """`int8` dynamic quantisation (CPU) or `bf16` autocast (GPU): cheaper sampling, slightly different pixels."""
    device: str = "auto"
    """`auto` takes the replica's GPU when it has one."""
    preview_steps: int = 8
    """Sampling steps of the preview model variant (and of `preview` tiers that leave default_steps unset)."""
    result_cache: bool = True
    """Answer a repeated (prompt, parameters, seed) request of the same owner with its stored result, without
    sampling; keyed on the export's weights, the LoRA, the precision and every sampling parameter."""
    text_cache_bytes: int | None = None
    """Bytes each generator replica's text-embedding cache may hold; None: text_cache_memory_fraction of the
    replica's memory (its Ray `memory` request, else its cgroup limit, else the machine's)."""
    text_cache_memory_fraction: float = 0.05
    """A Wan caption embedding is 8 MiB (512 x 4096 fp32): 5% of a 64 GiB replica keeps ~400 of them."""
    limits: Limits = field(default_factory=Limits)
    tiers: dict[str, Tier] = field(default_factory=lambda: {"default": Tier()})
    default_tier: str = "default"
    """The tier of every request when API keys are off."""
    api_keys: dict[str, str | ApiKey] = field(default_factory=dict)
    """sha256 hex digest of a key -> tier name, or -> {tier, owner, role} (owner: a user id that outlives key
    rotation). Empty (and no api_keys_from) turns keys off: then the server binds loopback only unless
    `auth: none`. `sora serve --hash-key KEY` prints a digest."""
    api_keys_from: KeySource | None = None
    """More digests, from a secret: {env: SORA_API_KEYS} or {file: /etc/sora/keys} (production configs)."""
    auth: Literal["keys", "none"] = "keys"
    """`keys`: listening beyond loopback needs API keys (with none the server refuses to start). `none`: serve
    without keys wherever it listens, an opt-out that must be written by name (a trusted network, a gateway
    in front that authenticates)."""
    download_host: str = "127.0.0.1"
    """Interface of the folder-store file server (download_port): where clients following its 307 reach it.
    `sora serve --host H` sets it to H unless the config sets it."""
    queue: QueueConfig = field(default_factory=QueueConfig)
    batching: BatchConfig = field(default_factory=BatchConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """One request over several devices per generator replica: `{sequence: N, cfg: bool}` (pipelines/parallel).
    The replica starts N (x2 with cfg) rank actors in its placement group, which the Generator deployment reserves
    with `placement_group_bundles` (1 + N (x2) bundles: the replica's, then one GPU per rank); cluster/serve/
    production-14b.yaml is an example. Off (sequence 1, no cfg) by default: one device per replica."""

    def __post_init__(self) -> None:
        if self.default_tier not in self.tiers:
            raise ConfigError(f"default_tier '{self.default_tier}' is not one of tiers: {', '.join(self.tiers)}")
        self.secret_keys: dict[str, str | ApiKey] = {}
        if self.api_keys_from is not None:
            self.secret_keys = {
                str(k): v if isinstance(v, str) else from_dict(ApiKey, v) for k, v in self.api_keys_from.read().items()
            }
        self._check_access()
        self._check_limits()
        self._check_model_options()

    def _check_access(self) -> None:
        """Who may call: `auth` against the keys, the key digests and their tiers, the download interface."""
        if self.auth == "none" and self.keys:
            raise ConfigError("auth: none contradicts the configured api_keys; remove one of them")
        try:
            ipaddress.ip_address(self.download_host)
        except ValueError:
            raise ConfigError(
                f"download_host must be an IP address (the interface to listen on), got '{self.download_host}'"
            ) from None
        for digest, entry in self.keys.items():
            tier = entry.tier if isinstance(entry, ApiKey) else entry
            if tier not in self.tiers:
                raise ConfigError(f"api_keys maps a key to tier '{tier}', which is not one of: {', '.join(self.tiers)}")
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ConfigError(
                    "api_keys must map sha256 hex digests (64 lowercase hex chars) to tiers; hash a key with `sora "
                    "serve --hash-key KEY`"
                )

    def _check_limits(self) -> None:
        """The numeric settings: preview steps, retention, downloads, sweeps, the text cache."""
        if self.preview_steps < 1:
            raise ConfigError(f"preview_steps must be >= 1, got {self.preview_steps}")
        if self.retention_s is not None and self.retention_s <= 0:
            raise ConfigError(f"retention_s must be > 0 (or null to keep jobs), got {self.retention_s}")
        if self.download_redirect_s is not None and not 1 <= self.download_redirect_s <= 7 * 24 * 3600:
            raise ConfigError(
                f"download_redirect_s must be between 1 and 604800 (S3's longest), got {self.download_redirect_s}"
            )
        if self.download_port is not None and not 0 <= self.download_port <= 65535:
            raise ConfigError(f"download_port must be between 0 and 65535 (or null), got {self.download_port}")
        if self.sweep_interval_s <= 0:
            raise ConfigError(f"sweep_interval_s must be > 0, got {self.sweep_interval_s}")
        if self.max_streaming_downloads < 1:
            raise ConfigError(f"max_streaming_downloads must be >= 1, got {self.max_streaming_downloads}")
        if self.orphan_sweep_interval_s <= 0:
            raise ConfigError(f"orphan_sweep_interval_s must be > 0, got {self.orphan_sweep_interval_s}")
        if self.orphan_grace_s < 60:
            raise ConfigError(
                f"orphan_grace_s must be >= 60 (uploads in progress must outlive it), got {self.orphan_grace_s}"
            )
        if self.text_cache_bytes is not None and self.text_cache_bytes < 0:
            raise ConfigError(f"text_cache_bytes must be >= 0 (or null), got {self.text_cache_bytes}")
        if not 0 <= self.text_cache_memory_fraction <= 0.5:
            raise ConfigError(
                f"text_cache_memory_fraction must be between 0 and 0.5, got {self.text_cache_memory_fraction}"
            )

    def _check_model_options(self) -> None:
        """What is served: per-request adapters, parallel ranks and their device, the database URL."""
        for name, path in self.loras.items():
            if not LORA_NAME.fullmatch(str(name)):
                raise ConfigError(
                    f"loras: name '{name}' must be 1-64 letters, digits, '.', '_' or '-' (it is what requests send "
                    "as 'lora')"
                )
            if not isinstance(path, str) or not path:
                raise ConfigError(f"loras.{name} must be a path to a LoRA adapter folder or .safetensors file")
        if self.lora_cache_bytes < 1:
            raise ConfigError(f"lora_cache_bytes must be >= 1, got {self.lora_cache_bytes}")
        self.parallel.check(field="parallel.sequence")
        if self.parallel.enabled and self.loras:
            raise ConfigError("loras (per-request adapters) are not available with parallel yet; serve them without it")
        if self.parallel.enabled and self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda with parallel (one GPU per rank), got '{self.device}'")
        if self.db is not None and not self.db.startswith(DB_SCHEMES):
            raise ConfigError(f"db must be an SQLAlchemy URL starting with {' or '.join(DB_SCHEMES)}, got '{self.db}'")

    @property
    def store_uri(self) -> str:
        return self.store or os.path.expanduser(DEFAULT_STORE)

    @property
    def db_url(self) -> str:
        """`db`, else $SORA_SERVE_DB (read where the replica runs: a Kubernetes Secret keeps the password out
        of the config), else an SQLite file beside a local store (or in the local default folder for a remote one)."""
        if self.db or os.environ.get(DB_ENV):
            return self.db or os.environ[DB_ENV]
        folder = self.store_uri if "://" not in self.store_uri else os.path.expanduser(DEFAULT_STORE)
        return f"sqlite:///{os.path.join(folder, DB_FILE)}"

    @property
    def keys(self) -> dict[str, str | ApiKey]:
        """Every known key digest: the config's `api_keys` and those of `api_keys_from` (kept apart, so a key
        removed from the secret is gone at the next replica start or reconfigure)."""
        return {**self.api_keys, **self.secret_keys}

    def key_entry(self, digest: str) -> tuple[str, str] | None:
        """(tier, owner) of a known key digest."""
        entry = self.keys.get(digest)
        if entry is None:
            return None
        if isinstance(entry, ApiKey):
            return entry.tier, entry.owner or digest[:16]
        return entry, digest[:16]

    def is_admin(self, digest: str) -> bool:
        entry = self.keys.get(digest)
        return isinstance(entry, ApiKey) and entry.role == "admin"


RUNTIME_KEYS = (
    "limits",
    "tiers",
    "default_tier",
    "api_keys",
    "api_keys_from",
    "queue",
    "result_cache",
    "preview_steps",
    "model_aliases",
    "retention_s",
    "sweep_interval_s",
    "download_redirect_s",
    "orphan_sweep_interval_s",
    "orphan_grace_s",
    "max_streaming_downloads",
)
"""Settings the ingress's `user_config` may change on a live replica."""


def load_settings(args: dict[str, Any]) -> ServeSettings:
    """ServeSettings from an app's `args` (YAML or `sora serve`); relative local paths become absolute
    so replicas, whose working folder differs, find them."""
    settings = from_dict(ServeSettings, dict(args))
    if "://" not in settings.model:
        settings.model = os.path.abspath(os.path.expanduser(settings.model))
    for name, path in settings.loras.items():
        if "://" in path:
            raise ConfigError(
                f"loras.{name}: '{path}' is a URI; adapters are read from a local or shared-filesystem path"
            )
        settings.loras[name] = path = os.path.abspath(os.path.expanduser(path))
        if not os.path.exists(path):
            raise ConfigError(f"loras.{name}: '{path}' does not exist (a LoRA adapter folder or .safetensors file)")
    if settings.parallel.enabled and "://" not in settings.model:
        _check_parallel_heads(settings)
    if settings.store and "://" not in settings.store:
        settings.store = os.path.abspath(os.path.expanduser(settings.store))
    if settings.db and settings.db.startswith("sqlite:///") and not settings.db.startswith("sqlite:////"):
        settings.db = "sqlite:///" + os.path.abspath(os.path.expanduser(settings.db[len("sqlite:///") :]))
    return settings


def _check_parallel_heads(settings: ServeSettings) -> None:
    """`parallel.sequence` must divide the export's attention heads: said when the app is built, before any
    replica reserves its devices (a folder that is not an export yet is left to the replicas to report)."""
    from sora_model.pipeline import load_export_config

    try:
        model = load_export_config(settings.model).model
    except FileNotFoundError:
        return
    settings.parallel.check(model, field="parallel.sequence")


def apply_user_config(
    settings: ServeSettings, user_config: dict[str, Any] | None, allowed: tuple[str, ...]
) -> ServeSettings:
    """A copy of `settings` with `user_config` applied; keys outside `allowed` need a redeploy, not a reconfigure."""
    user_config = dict(user_config or {})
    unknown = sorted(set(user_config) - set(allowed))
    if unknown:
        raise ConfigError(
            f"user_config key '{unknown[0]}' cannot change on a live replica (allowed: {', '.join(allowed)})"
        )
    base = settings_to_dict(settings)
    base.update(user_config)
    return from_dict(ServeSettings, base)


def settings_to_dict(settings: ServeSettings) -> dict[str, Any]:
    return dataclasses.asdict(settings)


def is_loopback(host: str) -> bool:
    """Whether listening on `host` keeps the server to this machine."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def check_exposure(settings: ServeSettings, host: str) -> None:
    """Refuse to serve beyond loopback with no API keys unless the config says `auth: none` (ConfigError,
    one line). Called by `sora serve` before Ray starts and by each ingress replica (serve run/deploy)."""
    if settings.auth == "keys" and not settings.keys and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve on {host} without API keys: set api_keys_from (a secret) or api_keys with digests from "
            "`sora serve --hash-key KEY`, or write `auth: none` in the config to serve without keys"
        )


def hash_key(key: str) -> str:
    """How API keys are stored: sha256 hex of the key, so the config never holds a usable secret."""
    return hashlib.sha256(key.encode()).hexdigest()
