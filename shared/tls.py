"""TLS for every hop: gRPC server and channel credentials, and ``ssl`` contexts for NATS and Redis.

One :class:`TlsFiles` value says where a process keeps its PEM files. The rules are the same on every
hop:

- a server speaks TLS when it has a certificate and key (``AUTHMESH_TLS_CERT_FILE``,
  ``AUTHMESH_TLS_KEY_FILE``), and demands a client certificate signed by ``AUTHMESH_TLS_CA_FILE`` when
  ``AUTHMESH_TLS_REQUIRE_CLIENT_CERT`` is set;
- a client verifies the server against ``AUTHMESH_TLS_CA_FILE`` (never the system's roots: the fleet
  has its own CA), and presents its own certificate and key when it has them (mutual TLS).

The HTTP side (JWKS, metadata, health, metrics) serves HTTPS with the same certificate but never asks
for a client certificate: what it serves is public (a JWK Set, RFC 8414 metadata) or read by probes
and scrapers that hold none. Its clients verify ``https://`` against the same CA and refuse
``http://`` once they have a CA (see :func:`check_https_url`).

A file that cannot be read is a :class:`~authmesh._shared.errors.ConfigurationError` naming the file,
never its content.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import grpc

from authmesh._shared.errors import ConfigurationError


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Where one process keeps its TLS material (PEM files).

    Attributes:
        ca_file: The CA that signs every peer's certificate; a client verifies servers against it, a
            server that requires client certificates verifies clients against it.
        cert_file: This process's own certificate (chain), served as a server and presented as a client.
        key_file: The private key of ``cert_file``.
        require_client_cert: A server refuses clients without a certificate signed by ``ca_file``.
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    require_client_cert: bool = False

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigurationError("AUTHMESH_TLS_CERT_FILE and AUTHMESH_TLS_KEY_FILE go together")
        if self.require_client_cert and (self.ca_file is None or self.cert_file is None):
            raise ConfigurationError(
                "AUTHMESH_TLS_REQUIRE_CLIENT_CERT needs AUTHMESH_TLS_CA_FILE and a server certificate"
            )

    @classmethod
    def none(cls) -> Self:
        """No TLS at all (plaintext)."""
        return cls()

    @property
    def serves_tls(self) -> bool:
        """Whether a server with these files speaks TLS."""
        return self.cert_file is not None

    @property
    def verifies_servers(self) -> bool:
        """Whether a client with these files connects with TLS (it has a CA to check servers against)."""
        return self.ca_file is not None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ConfigurationError(f"cannot read the TLS {what} {path}: {error.strerror or error}") from None


def _own_pair(files: TlsFiles) -> tuple[bytes, bytes] | None:
    if files.cert_file is None or files.key_file is None:
        return None
    return _read(files.key_file, "key"), _read(files.cert_file, "certificate")


def grpc_server_credentials(files: TlsFiles) -> grpc.ServerCredentials | None:
    """Server credentials for ``files``, or None for a plaintext server.

    Raises:
        ConfigurationError: A file cannot be read.
    """
    pair = _own_pair(files)
    if pair is None:
        return None
    roots = _read(files.ca_file, "CA") if files.ca_file is not None else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=roots, require_client_auth=files.require_client_cert
    )


def grpc_channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials | None:
    """Channel credentials that verify the server against ``files.ca_file`` (and present this
    process's certificate when it has one), or None for a plaintext channel.

    Raises:
        ConfigurationError: A file cannot be read.
    """
    if files.ca_file is None:
        return None
    pair = _own_pair(files)
    return grpc.ssl_channel_credentials(
        root_certificates=_read(files.ca_file, "CA"),
        private_key=pair[0] if pair else None,
        certificate_chain=pair[1] if pair else None,
    )


def open_channel(
    target: str, files: TlsFiles, options: Sequence[tuple[str, Any]] | None = None
) -> grpc.aio.Channel:
    """An async channel to ``target``: TLS when ``files`` has a CA, plaintext otherwise.

    Raises:
        ConfigurationError: A file cannot be read.
    """
    credentials = grpc_channel_credentials(files)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials, options=options)


def client_ssl_context(files: TlsFiles) -> ssl.SSLContext | None:
    """An ``ssl`` client context (NATS, Redis) that verifies servers against ``files.ca_file`` and
    presents this process's certificate when it has one; None without a CA.

    Raises:
        ConfigurationError: A file cannot be read or is not PEM of the right kind.
    """
    if files.ca_file is None:
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files.ca_file))
        if files.cert_file is not None and files.key_file is not None:
            context.load_cert_chain(str(files.cert_file), str(files.key_file))
    except (OSError, ssl.SSLError) as error:
        raise ConfigurationError(f"cannot load the TLS files: {error.strerror or error}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def server_ssl_context(files: TlsFiles) -> ssl.SSLContext | None:
    """An ``ssl`` server context for the HTTP side (TLS 1.2+, no client certificate asked for), or
    None for a plaintext server.

    Raises:
        ConfigurationError: A file cannot be read or is not PEM of the right kind.
    """
    if files.cert_file is None or files.key_file is None:
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(files.cert_file), str(files.key_file))
    except (OSError, ssl.SSLError) as error:
        raise ConfigurationError(f"cannot load the TLS files: {error.strerror or error}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def check_https_url(url: str, files: TlsFiles, setting: str) -> None:
    """Refuse an HTTP URL that would not be verified as the fleet's TLS promises.

    ``https://`` needs the CA to verify against (never the system's roots), and a process that has a CA
    (it speaks TLS to its peers) refuses ``http://``: the auth service's metadata says what tokens to
    trust, and a plaintext answer could be anyone's.

    Args:
        url: The URL to be fetched.
        files: This process's TLS material.
        setting: The setting that named the URL, for the error (``AUTHMESH_AUTH_URL``).

    Raises:
        ConfigurationError: Neither ``http://`` nor ``https://``, ``https://`` without a CA, or
            ``http://`` with one.
    """
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in ("http", "https"):
        raise ConfigurationError(f"{setting} must be an http:// or https:// URL")
    if scheme == "https" and files.ca_file is None:
        raise ConfigurationError(
            f"{setting} is https:// but AUTHMESH_TLS_CA_FILE is unset (nothing to verify against)"
        )
    if scheme == "http" and files.ca_file is not None:
        raise ConfigurationError(
            f"{setting} is http:// but this service speaks TLS (AUTHMESH_TLS_CA_FILE is set): use https://"
        )


REDIS_TLS_SCHEMES = ("rediss://", "rediss+sentinel://")


def redis_tls_options(url: str, files: TlsFiles) -> dict[str, Any]:
    """redis-py keyword arguments for a ``rediss://`` or ``rediss+sentinel://`` URL: verify against
    ``files.ca_file`` and present this process's certificate; none for a plaintext ``redis://`` or
    ``redis+sentinel://`` URL (which refuses them).
    """
    if not url.startswith(REDIS_TLS_SCHEMES):
        return {}
    options: dict[str, Any] = {"ssl_cert_reqs": "required"}
    if files.ca_file is not None:
        options["ssl_ca_certs"] = str(files.ca_file)
    if files.cert_file is not None and files.key_file is not None:
        options["ssl_certfile"] = str(files.cert_file)
        options["ssl_keyfile"] = str(files.key_file)
    return options
