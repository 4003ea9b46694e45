"""The secrets of a local stack: NATS users, admin and service accounts, and their passwords on disk."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import string
from dataclasses import dataclass, field
from pathlib import Path

from authmesh._shared.errors import ConfigurationError

AUTH_NATS_USER = "auth"
# The secrets file keeps one resource secret; each replica's NATS password is derived from it.
RESOURCE_NATS_USER = "resource"
# A NATS user with a replica's permissions for tools that watch the stream (benchmarks, tests).
READER_NATS_USER = "reader"
ROUTE_NATS_USER = "route"
ADMIN_USERNAME = "admin"
SERVICE_USERNAME = "svc-resource"
_SECRET_LENGTH = 32


@dataclass(frozen=True, slots=True)
class Credentials:
    """A user name and its password (the password never appears in ``repr``)."""

    username: str
    password: str = field(repr=False)

    @property
    def joined(self) -> str:
        """``username:password``, the form ``AUTHMESH_BOOTSTRAP_ADMIN`` and ``--admin`` take."""
        return f"{self.username}:{self.password}"


def new_password() -> str:
    """A random password of letters and digits that starts with a letter.

    NATS parses a ``$VARIABLE`` in its configuration as a configuration value, so a secret that starts
    with a digit or a dash, or spells ``true``, would not reach it as a string; this alphabet always does.
    """
    first = secrets.choice(string.ascii_letters)
    rest = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(_SECRET_LENGTH - 1))
    return first + rest


@dataclass(frozen=True, slots=True)
class StackSecrets:
    """Every secret a stack needs; random, and kept in the data directory between runs."""

    key_encryption_key: str = field(repr=False)
    admin: Credentials
    service_account: Credentials
    nats_auth: Credentials
    nats_resource: Credentials
    # Files written before Redis had an account lack it; such a stack gets a new one at each start
    # (Redis reads its accounts from the configuration, not from its data).
    redis_password: str = field(repr=False, default_factory=new_password)

    def nats_replica(self, name: str) -> Credentials:
        """The NATS user of one replica (or of ``reader``): its own name, its own password.

        The password is derived from ``nats_resource`` (HMAC-SHA256 by the name), so the secrets file
        keeps one secret whatever the number of replicas, and no replica can work out another's.
        """
        return Credentials(name, _derived_password(self.nats_resource.password, name))

    @property
    def nats_route(self) -> Credentials:
        """The user NATS cluster routes authenticate as."""
        return Credentials(ROUTE_NATS_USER, _derived_password(self.nats_resource.password, ROUTE_NATS_USER))

    @classmethod
    def generate(cls) -> StackSecrets:
        """Fresh random secrets."""
        return cls(
            key_encryption_key=new_password(),
            admin=Credentials(ADMIN_USERNAME, new_password()),
            service_account=Credentials(SERVICE_USERNAME, new_password()),
            nats_auth=Credentials(AUTH_NATS_USER, new_password()),
            nats_resource=Credentials(RESOURCE_NATS_USER, new_password()),
        )

    @classmethod
    def load_or_create(cls, path: Path) -> StackSecrets:
        """The secrets stored at ``path``, or new ones written there (readable by the owner only).

        Raises:
            ConfigurationError: The file exists but is not what this function writes.
        """
        if path.exists():
            try:
                document = json.loads(path.read_text())
                return cls(
                    key_encryption_key=str(document["key_encryption_key"]),
                    admin=_credentials(document["admin"]),
                    service_account=_credentials(document["service_account"]),
                    nats_auth=_credentials(document["nats_auth"]),
                    nats_resource=_credentials(document["nats_resource"]),
                    redis_password=str(document.get("redis_password") or new_password()),
                )
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise ConfigurationError(f"{path} is not a stack secrets file: {error}") from None
        created = cls.generate()
        document = {
            "key_encryption_key": created.key_encryption_key,
            "admin": created.admin.joined,
            "service_account": created.service_account.joined,
            "nats_auth": created.nats_auth.joined,
            "nats_resource": created.nats_resource.joined,
            "redis_password": created.redis_password,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump(document, file, indent=2)
        return created


def _derived_password(secret: str, label: str) -> str:
    """A password for ``label`` derived from ``secret``, in the alphabet of :func:`new_password`."""
    digest = hmac.new(secret.encode(), f"authmesh nats {label}".encode(), hashlib.sha256).hexdigest()
    return "k" + digest[: _SECRET_LENGTH - 1]


def _credentials(joined: object) -> Credentials:
    username, sep, password = str(joined).partition(":")
    if not sep or not username or not password:
        raise ValueError("credentials are not username:password")
    return Credentials(username, password)
