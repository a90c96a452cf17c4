"""Who is calling, and whether the server may listen where it does: API keys, owners, admin keys, exposure.

A request's key (`Authorization: Bearer KEY`) is hashed and looked up among the configured digests
(`api_keys` and `api_keys_from`, config.py); its entry gives the tier and the owner its videos belong to.
A `role: admin` key reads, lists and deletes every owner's videos. With no keys configured every request
is the default tier and owner "", which is only allowed while the server listens on loopback, or where
the config says `auth: none` by name (`check_exposure`, called by `sora serve` before Ray starts and by
every ingress replica, so `serve run` and `serve deploy` refuse too).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from .api import ApiError
from .config import ServeSettings, check_exposure, hash_key

__all__ = ["Caller", "authenticate", "check_exposure", "docs_allowed", "refuse_open_replica", "serve_host"]


@dataclass(frozen=True)
class Caller:
    tier: str
    owner: str
    admin: bool = False

    @property
    def tier_owner(self) -> tuple[str, str]:
        return self.tier, self.owner

    @property
    def scope(self) -> str | None:
        """The owner whose videos this caller may read and delete; None for every owner (admin)."""
        return None if self.admin else self.owner


def authenticate(settings: ServeSettings, authorization: str) -> Caller:
    """The caller of a request with this `Authorization` header; 401 in OpenAI's words when keys are on and
    the key is missing or unknown."""
    keys = settings.keys
    if not keys:
        return Caller(settings.default_tier, "")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(
            401,
            "Missing API key: send 'Authorization: Bearer KEY'.",
            code="invalid_api_key",
            type="invalid_request_error",
        )
    digest = hash_key(key.strip())
    for known in keys:
        if hmac.compare_digest(known.encode(), digest.encode()):
            tier, owner = settings.key_entry(known)
            return Caller(tier, owner, settings.is_admin(known))
    raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key", type="invalid_request_error")


def docs_allowed(settings: ServeSettings) -> None:
    """/docs and /openapi.json exist only while keys are off: a keyed service does not describe itself to strangers."""
    if settings.keys:
        raise ApiError(404, "Unknown route: the API docs are off while API keys are configured.", code="not_found")


def serve_host() -> str:
    """The host Serve's HTTP proxies listen on (http_options.host), asked from the Serve controller."""
    from ray.serve.context import _get_global_client

    return str(_get_global_client().http_config.host)


def refuse_open_replica(base: ServeSettings) -> None:
    """In an ingress replica's constructor: the exposure check on the settings the replica will run with
    (its deployment's user_config applied, which `reconfigure` receives only after the constructor)."""
    from ray import serve

    from .config import RUNTIME_KEYS, apply_user_config

    try:
        user_config = serve.get_replica_context()._deployment_config.user_config
    except (AttributeError, RuntimeError):  # outside a replica (unit use): the base settings
        user_config = None
    settings = apply_user_config(base, user_config, RUNTIME_KEYS) if user_config else base
    check_exposure(settings, serve_host())
