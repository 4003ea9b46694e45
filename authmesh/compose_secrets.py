"""The secrets directory of ``docker-compose.yml``: ``authmesh compose-env --secrets-dir DIR``.

Compose hands each service its secrets as files (``secrets:``, mounted under ``/run/secrets``), and the
services read them through the ``AUTHMESH_*_FILE`` settings, so no secret is in an environment
variable, on a command line or in ``.env``. This module writes one file per secret, the configuration
pieces that carry passwords (NATS users and routes, Redis ``requirepass``, the Sentinels' ``auth-pass``),
and a fresh CA with one certificate per service. The CA's key is not kept: nothing signs after this.

The directory is mode 0700: it keeps every other user of the host out. Its files are 0644 because
compose bind-mounts a file secret with its host owner and mode, and each service reads its secrets as
an unprivileged user of its own image; they are readable only inside the containers given them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from authmesh._shared.errors import ConfigurationError
from authmesh.certs import CA_FILE, LOCAL_HOSTS, CertificateAuthority
from authmesh.stack_nats_config import nats_authorization, replica_names
from authmesh.stack_secrets import StackSecrets, new_password

COMPOSE_REPLICAS = 3
NATS_NODES = tuple(f"nats-{index}" for index in (1, 2, 3))
SENTINELS = tuple(f"sentinel-{index}" for index in (1, 2, 3))
REDIS_NODES = ("redis", "redis-replica")
SENTINEL_PORT = 26379
SENTINEL_SERVICE = "authmesh"
# Services the host reaches on published loopback ports (and their healthchecks on 127.0.0.1).
_PUBLISHED = ("auth", *replica_names(COMPOSE_REPLICAS), "gateway")
CERTIFIED_SERVICES = (*_PUBLISHED, *NATS_NODES, *REDIS_NODES, *SENTINELS)

KEY_ENCRYPTION_KEY = "key-encryption-key"
BOOTSTRAP_ADMIN = "bootstrap-admin"
SERVICE_ACCOUNT = "service-account"
REDIS_PASSWORD = "redis-password"
NATS_USERS_CONF = "nats-users.conf"
NATS_ROUTES_CONF = "nats-routes.conf"
REDIS_AUTH_CONF = "redis-auth.conf"
SENTINEL_CONF = "sentinel.conf"
DIRECTORY_MODE = 0o700
FILE_MODE = 0o644
# The .env variables the compose file reads (none of them a secret).
SECRETS_DIR_VARIABLE = "AUTHMESH_COMPOSE_SECRETS_DIR"
REDIS_URL_VARIABLE = "AUTHMESH_COMPOSE_REDIS_URL"
MIN_REPLICAS_VARIABLE = "AUTHMESH_COMPOSE_REDIS_MIN_REPLICAS_ACKED"
SENTINEL_PROFILE = "sentinel"


def nats_password_file(user: str) -> str:
    """The file of a NATS user's password (``auth``, ``resource-1`` …)."""
    return f"nats-{user}-password"


def certificate_file(service: str) -> str:
    """A service's certificate file."""
    return f"{service}.pem"


def key_file(service: str) -> str:
    """A service's private key file."""
    return f"{service}-key.pem"


def service_hosts(service: str) -> tuple[str, ...]:
    """The names a service's certificate is valid for: its compose name, and loopback where published."""
    return (service, *LOCAL_HOSTS) if service in _PUBLISHED else (service,)


def sentinel_redis_url() -> str:
    """The auth service's ``AUTHMESH_REDIS_URL`` with the ``sentinel`` profile (no password in it)."""
    hosts = ",".join(f"{name}:{SENTINEL_PORT}" for name in SENTINELS)
    return f"rediss+sentinel://{hosts}/{SENTINEL_SERVICE}/0"


@dataclass(frozen=True, slots=True)
class ComposeSecrets:
    """What ``compose-env`` writes: the stack's secrets and the Redis password."""

    stack: StackSecrets
    redis_password: str

    @classmethod
    def generate(cls) -> ComposeSecrets:
        """Fresh random secrets."""
        return cls(StackSecrets.generate(), new_password())

    def files(self) -> dict[str, str]:
        """Every secret file but the certificates: name → content."""
        stack = self.stack
        replicas = [stack.nats_replica(name) for name in replica_names(COMPOSE_REPLICAS)]
        route = stack.nats_route
        routes = ",\n".join(
            f'  "nats-route://{route.username}:{route.password}@{node}:6222"' for node in NATS_NODES
        )
        return {
            KEY_ENCRYPTION_KEY: stack.key_encryption_key,
            BOOTSTRAP_ADMIN: stack.admin.joined,
            SERVICE_ACCOUNT: stack.service_account.joined,
            REDIS_PASSWORD: self.redis_password,
            nats_password_file(stack.nats_auth.username): stack.nats_auth.password,
            **{nats_password_file(user.username): user.password for user in replicas},
            NATS_USERS_CONF: nats_authorization(
                json.dumps(stack.nats_auth.password),
                [(user.username, json.dumps(user.password)) for user in replicas],
            ),
            # Included inside each node's `cluster` block; a node ignores its route to itself.
            NATS_ROUTES_CONF: (
                f"authorization {{\n  user: {json.dumps(route.username)}\n"
                f"  password: {json.dumps(route.password)}\n}}\nroutes: [\n{routes}\n]\n"
            ),
            # masterauth too: after a failover the old primary follows the new one.
            REDIS_AUTH_CONF: f"requirepass {self.redis_password}\nmasterauth {self.redis_password}\n",
            SENTINEL_CONF: _sentinel_conf(self.redis_password),
        }


def _sentinel_conf(redis_password: str) -> str:
    """Each Sentinel's starting configuration (copied to its data volume, which Sentinel rewrites)."""
    name = SENTINEL_SERVICE
    return "\n".join(
        [
            "port 0",
            f"tls-port {SENTINEL_PORT}",
            "tls-cert-file /run/secrets/tls.pem",
            "tls-key-file /run/secrets/tls-key.pem",
            "tls-ca-cert-file /run/secrets/ca.pem",
            "tls-auth-clients yes",
            "tls-replication yes",
            # Names, not addresses: the certificates name the services, and no subnet is fixed.
            "sentinel resolve-hostnames yes",
            "sentinel announce-hostnames yes",
            f"sentinel monitor {name} redis 6379 2",
            f"sentinel auth-pass {name} {redis_password}",
            f"sentinel down-after-milliseconds {name} 2000",
            f"sentinel failover-timeout {name} 10000",
            f"sentinel parallel-syncs {name} 1",
            "",
        ]
    )


def _prepare_directory(directory: Path, *, force: bool) -> None:
    """Create ``directory`` (0700), or accept an empty one; a populated one only with ``force``.

    Raises:
        ConfigurationError: It is a file, it holds files and ``force`` is off, or it cannot be made.
    """
    if directory.exists() and not directory.is_dir():
        raise ConfigurationError(f"{directory} exists and is not a directory")
    try:
        if directory.is_dir() and any(directory.iterdir()) and not force:
            raise ConfigurationError(
                f"{directory} already holds secrets (a stack may be using them): --force replaces them"
            )
        directory.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
        directory.chmod(DIRECTORY_MODE)
    except OSError as error:
        raise ConfigurationError(f"cannot prepare {directory}: {error.strerror}") from None


def _write(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    # The umask may have narrowed the mode os.open was given.
    path.chmod(FILE_MODE)


def write_compose_secrets(directory: Path, *, force: bool = False) -> ComposeSecrets:
    """Write a fresh secrets directory for ``docker-compose.yml``.

    Args:
        directory: Where (created 0700 if missing).
        force: Replace the secrets of a directory that already holds some.

    Returns:
        The secrets written (for callers that talk to the stack, such as tests).

    Raises:
        ConfigurationError: The directory cannot be used (see ``_prepare_directory``) or written.
    """
    _prepare_directory(directory, force=force)
    chosen = ComposeSecrets.generate()
    authority = CertificateAuthority.create("authmesh compose CA")
    try:
        _write(directory / CA_FILE, authority.certificate_pem)
        for service in CERTIFIED_SERVICES:
            issued = authority.issue(service, service_hosts(service))
            _write(directory / certificate_file(service), issued.certificate_pem)
            _write(directory / key_file(service), issued.key_pem)
        for name, content in chosen.files().items():
            _write(directory / name, content.encode())
    except OSError as error:
        raise ConfigurationError(f"cannot write the secrets into {directory}: {error.strerror}") from None
    return chosen


def dotenv_lines(directory: Path, *, sentinel: bool = False) -> list[str]:
    """The ``.env`` for ``docker-compose.yml``: where the secrets are, and the profile's settings.

    Args:
        directory: The secrets directory (written as an absolute path).
        sentinel: Turn on the ``sentinel`` profile and point the auth service at the Sentinels.
    """
    lines = [
        "# docker-compose.yml settings from `authmesh compose-env`. No secret is here: they are files in",
        "# the directory below, which compose mounts into the services that need them.",
        f"{SECRETS_DIR_VARIABLE}={directory.absolute()}",
    ]
    if sentinel:
        lines += [
            f"COMPOSE_PROFILES={SENTINEL_PROFILE}",
            f"{REDIS_URL_VARIABLE}={sentinel_redis_url()}",
            f"{MIN_REPLICAS_VARIABLE}=1",
        ]
    return lines
