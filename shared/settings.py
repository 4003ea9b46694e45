"""The settings objects: the only place that reads the environment.

Every name is ``AUTHMESH_<FIELD>`` (and ``--<field>`` on the command line). A service builds its
settings once at start and passes the frozen object down; nothing else reads ``os.environ``.

Every secret is a ``SecretStr`` (it never prints) and may instead be read from a file named by
``AUTHMESH_<FIELD>_FILE`` (the Docker and Kubernetes secrets convention); one trailing newline is
dropped, and setting both forms is an error.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Any, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from authmesh._shared.certificate_identity import CertificateAccounts
from authmesh._shared.errors import ConfigurationError
from authmesh._shared.tls import TlsFiles


def _split_urls(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _default_instance() -> str:
    return socket.gethostname()


FILE_SUFFIX = "_file"


def _secret_file_field(secret: str) -> Any:
    return Field(
        default=None, description=f"a file holding AUTHMESH_{secret.upper()} (instead of the variable)"
    )


def _read_secret_files(model: type[BaseSettings], data: Any) -> Any:
    """``data`` with every ``<secret>_file`` replaced by the file's content as ``<secret>``.

    Raises:
        ValueError: Both forms are set, or the file cannot be read (the message names the file only).
    """
    if not isinstance(data, dict):
        return data
    values = dict(data)
    for name in model.model_fields:
        secret = name.removesuffix(FILE_SUFFIX)
        if not name.endswith(FILE_SUFFIX) or secret not in model.model_fields:
            continue
        path = values.pop(name, None)
        if path is None:
            continue
        variable = f"AUTHMESH_{secret.upper()}"
        if values.get(secret) is not None:
            raise ValueError(f"set {variable} or {variable}_FILE, not both")
        try:
            content = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
            raise ValueError(f"cannot read {variable}_FILE {path}: {reason}") from None
        values[secret] = content.removesuffix("\n").removesuffix("\r")
    return values


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
    nats_password_file: Path | None = _secret_file_field("nats_password")
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
    dpop: str = Field(
        default="accept",
        pattern="^(require|accept|off)$",
        description="DPoP (RFC 9449): require proofs, accept bound and bearer tokens, or bearer only (off)",
    )
    dpop_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="this service's names for DPoP htu, scheme://host:port, comma-separated "
        "(default http://<grpc_listen>)",
    )
    dpop_max_age: float = Field(
        default=60.0, gt=0, le=600, description="how long a DPoP proof is accepted, s"
    )
    dpop_nonce_secret: SecretStr | None = Field(
        default=None, description="shared by a service's replicas: when set, proofs need a server nonce"
    )
    connect_timeout: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="seconds a starting service keeps retrying NATS (and Redis) before it exits",
    )
    log_level: str = Field(default="info", description="debug, info, warning or error")
    log_format: str = Field(default="console", pattern="^(console|json)$", description="console or json")
    tls_ca_file: Path | None = Field(
        default=None, description="CA (PEM) that signs every peer; set, clients verify servers with it"
    )
    tls_cert_file: Path | None = Field(
        default=None, description="this service's certificate (PEM); set, its gRPC and HTTP servers speak TLS"
    )
    tls_key_file: Path | None = Field(default=None, description="the private key of the certificate (PEM)")
    tls_require_client_cert: bool = Field(
        default=False, description="refuse gRPC clients without a certificate signed by the CA (mTLS)"
    )

    _split_nats_urls = field_validator("nats_urls", "dpop_origins", mode="before")(_split_urls)

    @model_validator(mode="before")
    @classmethod
    def _secrets_from_files(cls, data: Any) -> Any:
        return _read_secret_files(cls, data)

    @field_validator("nats_urls")
    @classmethod
    def _require_nats_urls(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one NATS URL is required")
        return value

    def proof_origins(self, grpc_listen: str) -> tuple[str, ...]:
        """The origins a DPoP proof's ``htu`` may name: the configured ones, else ``http(s)://<grpc_listen>``
        (``https`` when this service's gRPC server speaks TLS)."""
        scheme = "https" if self.tls_cert_file is not None else "http"
        return tuple(self.dpop_origins) or (f"{scheme}://{grpc_listen}",)

    @model_validator(mode="after")
    def _check_tls_files(self) -> Self:
        try:
            _ = self.tls
        except ConfigurationError as error:
            raise ValueError(error.message) from None
        return self

    @property
    def tls(self) -> TlsFiles:
        """The TLS material of this service (see :mod:`authmesh._shared.tls`)."""
        return TlsFiles(
            ca_file=self.tls_ca_file,
            cert_file=self.tls_cert_file,
            key_file=self.tls_key_file,
            require_client_cert=self.tls_require_client_cert,
        )

    @property
    def stream_max_age(self) -> float:
        """How long AUTH_EVENTS keeps events: an access token's life, the leeway and a margin."""
        return self.access_token_ttl + self.leeway + 60.0


class AuthSettings(CommonSettings):
    """Settings of the auth service."""

    redis_url: SecretStr = Field(
        default=SecretStr("redis://127.0.0.1:6379/0"), description="the auth service's store"
    )
    redis_url_file: Path | None = _secret_file_field("redis_url")
    redis_password: SecretStr | None = Field(
        default=None, description="password of the Redis account (over any in the URL)"
    )
    redis_password_file: Path | None = _secret_file_field("redis_password")
    redis_min_replicas_acked: int | None = Field(
        default=None,
        ge=0,
        le=16,
        description="replicas that must hold a revocation, key rotation or refresh rotation before it "
        "is acknowledged (WAIT); default 0 for one Redis, 1 with Sentinel",
    )
    redis_replica_ack_timeout: float = Field(
        default=1.0, gt=0, le=2.5, description="how long to wait for those replicas, s (then UNAVAILABLE)"
    )
    grpc_listen: str = Field(default="127.0.0.1:50051", description="gRPC listen address")
    http_listen: str = Field(default="127.0.0.1:8081", description="HTTP listen address")
    auth_audience: str = Field(
        default="authmesh-auth",
        min_length=1,
        description="aud of the tokens for the auth service's own API (scopes admin and service)",
    )
    public_url: str | None = Field(
        default=None,
        description="base URL of the HTTP side as clients see it (for jwks_uri); https:// when it serves TLS",
    )
    key_encryption_key: SecretStr | None = Field(
        default=None, description="secret that encrypts signing keys at rest in Redis"
    )
    key_encryption_key_file: Path | None = _secret_file_field("key_encryption_key")
    bootstrap_admin: SecretStr | None = Field(
        default=None, description="username:password of an admin created at start if absent"
    )
    bootstrap_admin_file: Path | None = _secret_file_field("bootstrap_admin")
    service_account: SecretStr | None = Field(
        default=None,
        description="username:password of the resource services' account (a bare username, for an "
        "account that logs in by certificate only, gets a random password nobody knows)",
    )
    service_account_file: Path | None = _secret_file_field("service_account")
    certificate_accounts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="accounts that may log in by client certificate instead of a password: "
        "certificate-name=username entries (a bare username maps that certificate name), "
        "comma-separated; needs AUTHMESH_TLS_REQUIRE_CLIENT_CERT",
    )
    login_max_failures: int = Field(default=10, ge=1, description="failed logins per username per window")
    login_window: int = Field(default=60, ge=1, description="rate-limit window, s")
    argon2_time_cost: int = Field(default=3, ge=1, le=20, description="Argon2id passes")
    argon2_memory_kib: int = Field(default=65_536, ge=1024, le=4_194_304, description="Argon2id memory")
    argon2_parallelism: int = Field(default=4, ge=1, le=64, description="Argon2id lanes")
    heartbeat_interval: float = Field(default=1.0, gt=0, le=60, description="heartbeat period, s")
    shutdown_grace: float = Field(default=5.0, ge=0, le=120, description="drain time on SIGTERM, s")

    _split_certificate_accounts = field_validator("certificate_accounts", mode="before")(_split_urls)

    @model_validator(mode="after")
    def _check_audiences_and_credentials(self) -> Self:
        if self.auth_audience == self.audience:
            # One audience for both would make every admin token valid at every resource service.
            raise ValueError("AUTHMESH_AUTH_AUDIENCE must differ from AUTHMESH_AUDIENCE")
        try:
            certificate_accounts = self.certificate_logins
        except ConfigurationError as error:
            raise ValueError(error.message) from None
        if certificate_accounts.by_name and not self.tls_require_client_cert:
            # gRPC Python asks for a client certificate only when it requires one.
            raise ValueError("AUTHMESH_CERTIFICATE_ACCOUNTS needs AUTHMESH_TLS_REQUIRE_CLIENT_CERT")
        for name in ("bootstrap_admin", "service_account"):
            secret = getattr(self, name)
            if secret is not None:
                username, sep, password = secret.get_secret_value().partition(":")
                certificate_only = name == "service_account" and username in certificate_accounts.accounts
                if not username or (not password and not (certificate_only and not sep)):
                    raise ValueError(f"AUTHMESH_{name.upper()} must be username:password")
        if self.public_url is not None:
            scheme = self.public_url.partition("://")[0].lower() if "://" in self.public_url else ""
            if scheme not in ("http", "https"):
                raise ValueError("AUTHMESH_PUBLIC_URL must be an http:// or https:// URL")
            if scheme == "http" and self.tls_cert_file is not None:
                # Clients that speak TLS refuse http:// metadata, and jwks_uri would send them there.
                raise ValueError(
                    "AUTHMESH_PUBLIC_URL is http:// but the HTTP side serves HTTPS: use https://"
                )
        return self

    @property
    def certificate_logins(self) -> CertificateAccounts:
        """Which accounts a verified client certificate may log in as."""
        return CertificateAccounts.parse(self.certificate_accounts)

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
    auth_target: str = Field(
        default="127.0.0.1:50051",
        description="where the auth service listens: host:port, or several ip:port, comma-separated",
    )
    auth_url: str | None = Field(
        default=None,
        description="the auth service's HTTP base URL: issuer, audience, token lifetime and leeway are "
        "read from its metadata (else taken from these settings)",
    )
    service_account: SecretStr | None = Field(
        default=None,
        description="username:password used for Introspect and SnapshotRevocations; a bare username "
        "logs in by this service's client certificate (AUTHMESH_TLS_CERT_FILE) instead",
    )
    service_account_file: Path | None = _secret_file_field("service_account")
    login_timeout: float = Field(
        default=10.0,
        gt=0,
        le=60,
        description="deadline of the service account's Login (an Argon2id check), s; doubled after a timeout",
    )
    shutdown_grace: float = Field(default=5.0, ge=0, le=120, description="drain time on SIGTERM, s")
    ext_authz: bool = Field(
        default=False,
        description="also answer Envoy's ext_authz Check (envoy.service.auth.v3.Authorization) on gRPC",
    )

    @model_validator(mode="after")
    def _check_service_account(self) -> Self:
        if self.service_account is None:
            return self
        username, sep, password = self.service_account.get_secret_value().partition(":")
        if not username or (sep and not password):
            raise ValueError("AUTHMESH_SERVICE_ACCOUNT must be username:password, or a bare username")
        if not sep and (self.tls_ca_file is None or self.tls_cert_file is None):
            raise ValueError(
                "AUTHMESH_SERVICE_ACCOUNT without a password logs in by client certificate: "
                "it needs AUTHMESH_TLS_CA_FILE, AUTHMESH_TLS_CERT_FILE and AUTHMESH_TLS_KEY_FILE"
            )
        return self


def credentials(secret: SecretStr) -> tuple[str, str]:
    """Split a validated ``username:password`` secret (a bare username has the empty password: it logs
    in by client certificate)."""
    username, _, password = secret.get_secret_value().partition(":")
    return username, password
