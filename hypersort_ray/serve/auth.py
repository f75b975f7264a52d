"""Who may call the endpoint, decided so that it fails closed (no Ray imports).

* The process that deploys (``hypersort serve``, or Serve's config-file builder) reads the token from
  ``auth_token_env`` and hands replicas its SHA-256 through the deployment's runtime environment
  (:data:`TOKEN_DIGEST_ENV`), so a replica on a node whose environment lacks the variable still checks
  it, and the token itself is never stored in the cluster's deployment config.
* A replica whose deployment requires auth but that finds neither the digest nor the token refuses to
  start (:func:`replica_credentials` raises): it never serves open because a node missed a variable.
* :func:`check_bind` refuses a non-loopback bind without a token unless ``insecure_no_auth`` says so.

Example:
    >>> plan = resolve_auth(token_env="API_TOKEN", insecure_no_auth=False, environ={"API_TOKEN": "s3cret"})
    >>> plan.required, len(plan.env_vars[TOKEN_DIGEST_ENV])
    (True, 64)
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from hypersort_ray.errors import ConfigError
from hypersort_ray.serve.validation import token_digest

__all__ = [
    "TOKEN_DIGEST_ENV",
    "AuthPlan",
    "check_bind",
    "is_loopback",
    "replica_credentials",
    "resolve_auth",
]

#: Runtime-env variable carrying the hex SHA-256 of the bearer token to the replicas.
TOKEN_DIGEST_ENV = "HYPERSORT_API_TOKEN_SHA256"


@dataclass(frozen=True)
class AuthPlan:
    """What the deployer decided: whether replicas must check a token, and the env vars that carry it."""

    required: bool
    env_vars: dict[str, str] = field(default_factory=dict)

    @property
    def has_token(self) -> bool:
        return TOKEN_DIGEST_ENV in self.env_vars


def resolve_auth(token_env: str | None, insecure_no_auth: bool, environ: Mapping[str, str] | None = None) -> AuthPlan:
    """The auth plan of a deployment from the deployer's environment.

    A token present: required, its digest travels to the replicas. No token: required anyway (replicas
    must find one in their own environment or fail to start) unless ``insecure_no_auth``.
    """
    env = os.environ if environ is None else environ
    token = (env.get(token_env, "") if token_env else "").strip()
    if token:
        return AuthPlan(required=True, env_vars={TOKEN_DIGEST_ENV: token_digest(token).hex()})
    return AuthPlan(required=not insecure_no_auth)


def replica_credentials(
    token_env: str | None, required: bool, environ: Mapping[str, str] | None = None
) -> tuple[str | None, bytes | None]:
    """(token, digest) a replica checks requests against; raises when auth is required and neither is set.

    The deployment's digest wins over the replica's own variable: it is the token the deployer announced.
    """
    env = os.environ if environ is None else environ
    hex_digest = env.get(TOKEN_DIGEST_ENV, "").strip()
    if hex_digest:
        try:
            digest = bytes.fromhex(hex_digest)
        except ValueError:
            raise ConfigError(f"serve: {TOKEN_DIGEST_ENV} is not a hex SHA-256 digest") from None
        if len(digest) != 32:
            raise ConfigError(f"serve: {TOKEN_DIGEST_ENV} is not a SHA-256 digest")
        return None, digest
    token = (env.get(token_env, "") if token_env else "").strip()
    if token:
        return token, None
    if required:
        where = f"${token_env}" if token_env else "a token variable (auth_token_env)"
        raise ConfigError(
            f"serve: auth is required but this replica has no token: set {where} where you deploy (or on "
            "every node), or set insecure_no_auth to serve without auth"
        )
    return None, None


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and ``localhost``; ``0.0.0.0``/``::`` (every interface) are not."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_bind(host: str, plan: AuthPlan, insecure_no_auth: bool) -> None:
    """Refuse to listen beyond this machine without a token, unless explicitly insecure."""
    if plan.has_token or is_loopback(host) or insecure_no_auth:
        return
    raise ConfigError(
        f"serve: refusing to listen on {host} without a bearer token: set the token variable "
        "(auth_token_env, default HYPERSORT_API_TOKEN), or pass --insecure-no-auth to serve unauthenticated"
    )
