"""The settings objects: the only place that reads the environment.

Every name is ``AUTHMESH_<FIELD>`` (and ``--<field>`` on the command line). A service builds its
settings once at start and passes the frozen object down; nothing else reads ``os.environ``.
"""

from __future__ import annotations

import socket
from typing import Annotated, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from authmesh._shared.errors import ConfigurationError


def _split_urls(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _default_instance() -> str:
    return socket.gethostname()


class CommonSettings(BaseSettings):
    """Settings every authmesh service shares."""

    model_config = SettingsConfigDict(
        env_prefix="AUTHMESH_", frozen=True, extra="ignore", populate_by_name=True
    )

    nats_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["nats://127.0.0.1:4222"],
        description="NATS servers, comma-separated (a cluster)",
    )
    nats_user: str | None = Field(
        default=None,
        # One subject token: replies to this user arrive under _INBOX.<user>.
        pattern=r"^[A-Za-z0-9_-]+$",
        description="NATS user name, if the server requires one (letters, digits, - and _)",
    )
    nats_password: SecretStr | None = Field(default=None, description="NATS password")
    issuer: str = Field(default="authmesh", min_length=1, description="iss of every token")
    audience: str = Field(
        default="authmesh-resources",
        min_length=1,
        description="aud the auth service issues / a resource service requires",
    )
    access_token_ttl: int = Field(default=300, ge=1, le=86_400, description="access-token lifetime, s")
    refresh_token_ttl: int = Field(
        default=1_209_600, ge=1, le=31_536_000, description="refresh-token lifetime, s"
    )
    leeway: float = Field(default=5.0, ge=0, le=300, description="clock leeway for exp/nbf, s")
    staleness_bound: float = Field(
        default=3.0, gt=0, le=3600, description="seconds without a heartbeat before degraded"
    )
    instance: str = Field(default_factory=_default_instance, min_length=1, description="replica name")
    stream_replicas: int = Field(default=1, ge=1, le=5, description="AUTH_EVENTS replication factor")
    connect_timeout: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="seconds a starting service keeps retrying NATS (and Redis) before it exits",
    )
    log_level: str = Field(default="info", description="debug, info, warning or error")
    log_format: str = Field(default="console", pattern="^(console|json)$", description="console or json")

    _split_nats_urls = field_validator("nats_urls", mode="before")(_split_urls)

    @field_validator("nats_urls")
    @classmethod
    def _require_nats_urls(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one NATS URL is required")
        return value

    @property
    def stream_max_age(self) -> float:
        """How long AUTH_EVENTS keeps events: an access token's life, the leeway and a margin."""
        return self.access_token_ttl + self.leeway + 60.0


class AuthSettings(CommonSettings):
    """Settings of the auth service."""

    redis_url: SecretStr = Field(
        default=SecretStr("redis://127.0.0.1:6379/0"), description="the auth service's store"
    )
    grpc_listen: str = Field(default="127.0.0.1:50051", description="gRPC listen address")
    http_listen: str = Field(default="127.0.0.1:8081", description="HTTP listen address")
    auth_audience: str = Field(
        default="authmesh-auth",
        min_length=1,
        description="aud of the tokens for the auth service's own API (scopes admin and service)",
    )
    public_url: str | None = Field(
        default=None, description="base URL of the HTTP side as clients see it (for jwks_uri)"
    )
    key_encryption_key: SecretStr | None = Field(
        default=None, description="secret that encrypts signing keys at rest in Redis"
    )
    bootstrap_admin: SecretStr | None = Field(
        default=None, description="username:password of an admin created at start if absent"
    )
    service_account: SecretStr | None = Field(
        default=None, description="username:password of the resource services' account"
    )
    login_max_failures: int = Field(default=10, ge=1, description="failed logins per username per window")
    login_window: int = Field(default=60, ge=1, description="rate-limit window, s")
    argon2_time_cost: int = Field(default=3, ge=1, le=20, description="Argon2id passes")
    argon2_memory_kib: int = Field(default=65_536, ge=1024, le=4_194_304, description="Argon2id memory")
    argon2_parallelism: int = Field(default=4, ge=1, le=64, description="Argon2id lanes")
    heartbeat_interval: float = Field(default=1.0, gt=0, le=60, description="heartbeat period, s")
    shutdown_grace: float = Field(default=5.0, ge=0, le=120, description="drain time on SIGTERM, s")

    @model_validator(mode="after")
    def _check_audiences_and_credentials(self) -> Self:
        if self.auth_audience == self.audience:
            # One audience for both would make every admin token valid at every resource service.
            raise ValueError("AUTHMESH_AUTH_AUDIENCE must differ from AUTHMESH_AUDIENCE")
        for name in ("bootstrap_admin", "service_account"):
            secret = getattr(self, name)
            if secret is not None:
                username, sep, password = secret.get_secret_value().partition(":")
                if not sep or not username or not password:
                    raise ValueError(f"AUTHMESH_{name.upper()} must be username:password")
        return self

    def require_key_encryption_key(self) -> bytes:
        """The key-encryption secret as bytes.

        Raises:
            ConfigurationError: When AUTHMESH_KEY_ENCRYPTION_KEY is unset or too short.
        """
        if self.key_encryption_key is None:
            raise ConfigurationError("AUTHMESH_KEY_ENCRYPTION_KEY is required (at least 16 characters)")
        secret = self.key_encryption_key.get_secret_value().encode()
        if len(secret) < 16:
            raise ConfigurationError("AUTHMESH_KEY_ENCRYPTION_KEY must be at least 16 characters")
        return secret


class ResourceSettings(CommonSettings):
    """Settings of a resource service replica."""

    grpc_listen: str = Field(default="127.0.0.1:50061", description="gRPC listen address")
    http_listen: str = Field(default="127.0.0.1:8091", description="HTTP listen address")
    auth_target: str = Field(default="127.0.0.1:50051", description="where the auth service listens")
    auth_url: str | None = Field(
        default=None,
        description="the auth service's HTTP base URL: issuer, audience, token lifetime and leeway are "
        "read from its metadata (else taken from these settings)",
    )
    service_account: SecretStr | None = Field(
        default=None, description="username:password used for Introspect and SnapshotRevocations"
    )
    shutdown_grace: float = Field(default=5.0, ge=0, le=120, description="drain time on SIGTERM, s")
    ext_authz: bool = Field(
        default=False,
        description="also answer Envoy's ext_authz Check (envoy.service.auth.v3.Authorization) on gRPC",
    )


def credentials(secret: SecretStr) -> tuple[str, str]:
    """Split a validated ``username:password`` secret."""
    username, _, password = secret.get_secret_value().partition(":")
    return username, password
