"""Which accounts may log in by client certificate, and the names a verified peer certificate carries.

An auth service that verifies client certificates (mutual TLS, ``AUTHMESH_TLS_REQUIRE_CLIENT_CERT``)
may let a service log in without a password: ``Login`` with an empty password, on a connection whose
certificate was verified against ``AUTHMESH_TLS_CA_FILE`` and whose names map to the account asked for.
Nothing is accepted by default: ``AUTHMESH_CERTIFICATE_ACCOUNTS`` lists the mapping, one
``certificate-name=username`` entry per certificate name (a bare ``username`` maps the name to the same
account). A certificate's names are its subject common name and every subject alternative name.

gRPC Python requests a client certificate only from a server that requires one (``require_client_auth``
off means the handshake never asks), so certificate logins need ``AUTHMESH_TLS_REQUIRE_CLIENT_CERT``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from authmesh._shared.errors import ConfigurationError

TLS_TRANSPORT = b"ssl"
# The keys of a gRPC auth context that name the peer's verified certificate.
_NAME_KEYS = ("x509_common_name", "x509_subject_alternative_name")
_MAX_NAME = 256


@dataclass(frozen=True, slots=True)
class CertificateAccounts:
    """The accounts certificates may log in as (an empty mapping accepts none).

    Attributes:
        by_name: Certificate name → username.
    """

    by_name: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, entries: Sequence[str]) -> CertificateAccounts:
        """The mapping written as ``name=username`` (or ``username``) entries.

        Raises:
            ConfigurationError: An empty side, or one certificate name mapped twice.
        """
        by_name: dict[str, str] = {}
        for entry in entries:
            name, separator, username = (part.strip() for part in entry.partition("="))
            username = username if separator else name
            if not name or not username:
                raise ConfigurationError(
                    f"AUTHMESH_CERTIFICATE_ACCOUNTS entries are certificate-name=username, not {entry!r}"
                )
            if name in by_name:
                raise ConfigurationError(f"AUTHMESH_CERTIFICATE_ACCOUNTS maps {name!r} twice")
            by_name[name] = username
        return cls(by_name)

    @property
    def accounts(self) -> frozenset[str]:
        """Every account some certificate may log in as."""
        return frozenset(self.by_name.values())

    def allows(self, username: str, names: Iterable[str]) -> bool:
        """Whether a verified certificate with ``names`` may log in as ``username``."""
        return any(self.by_name.get(name) == username for name in names)


def peer_certificate_names(
    auth_context: Mapping[str, Iterable[bytes]], peer_identities: Iterable[bytes] | None
) -> frozenset[str]:
    """The names of a connection's verified client certificate; empty when there is none.

    Args:
        auth_context: ``ServicerContext.auth_context()``.
        peer_identities: ``ServicerContext.peer_identities()``: None unless gRPC authenticated the peer
            (its certificate chains to the server's CA).
    """
    if peer_identities is None or TLS_TRANSPORT not in auth_context.get("transport_security_type", ()):
        return frozenset()
    names: set[str] = set()
    for key in _NAME_KEYS:
        for raw in auth_context.get(key, ()):
            name = raw.decode("utf-8", "replace")
            if 0 < len(name) <= _MAX_NAME:
                names.add(name)
    return frozenset(names)
