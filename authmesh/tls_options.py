"""The command line's TLS options, defined once for every command that calls a server.

A client verifies servers against ``--tls-ca-file`` (the fleet's CA, never the system's roots) and, for
mutual TLS, presents ``--tls-cert-file``/``--tls-key-file``: an auth service that lets services log in
by certificate demands a client certificate from every caller. Each option also reads its
``AUTHMESH_TLS_*`` variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from authmesh._shared.errors import ConfigurationError
from authmesh._shared.tls import TlsFiles


def _file_option(flag: str, variable: str, help_text: str) -> Any:
    return typer.Option(flag, envvar=variable, dir_okay=False, help=help_text, show_default=False)


TlsCaFileOption = Annotated[
    Path | None,
    _file_option(
        "--tls-ca-file", "AUTHMESH_TLS_CA_FILE", "Call over TLS, verifying the servers against this CA (PEM)."
    ),
]
TlsCertFileOption = Annotated[
    Path | None,
    _file_option(
        "--tls-cert-file",
        "AUTHMESH_TLS_CERT_FILE",
        "Present this client certificate (PEM) for mutual TLS; needs --tls-ca-file and --tls-key-file.",
    ),
]
TlsKeyFileOption = Annotated[
    Path | None,
    _file_option("--tls-key-file", "AUTHMESH_TLS_KEY_FILE", "The private key (PEM) of --tls-cert-file."),
]


def client_tls(ca_file: Path | None, cert_file: Path | None = None, key_file: Path | None = None) -> TlsFiles:
    """A client's TLS files from the options (absolute paths, so they may be stored and reused).

    Raises:
        ConfigurationError: A certificate without its key (or the reverse), or one without a CA.
    """
    if (cert_file is None) != (key_file is None):
        raise ConfigurationError("--tls-cert-file and --tls-key-file go together")
    if cert_file is not None and ca_file is None:
        raise ConfigurationError("a client certificate (--tls-cert-file) needs --tls-ca-file")
    return TlsFiles(ca_file=_absolute(ca_file), cert_file=_absolute(cert_file), key_file=_absolute(key_file))


def _absolute(path: Path | None) -> Path | None:
    return None if path is None else path.expanduser().absolute()


_CLIENT_CERTIFICATE_WANTED = (
    "TLS handshake failed: the server demands a client certificate signed by its CA "
    "(--tls-cert-file, --tls-key-file)"
)
# What gRPC's handshake errors mean to a person, by the BoringSSL reason they carry.
_HANDSHAKE_FAILURES = (
    (
        "CERTIFICATE_VERIFY_FAILED",
        "TLS handshake failed: the server's certificate is not signed by the CA of --tls-ca-file "
        "(or names another host)",
    ),
    ("WRONG_VERSION_NUMBER", "TLS handshake failed: the server does not speak TLS (leave out --tls-ca-file)"),
    ("CERTIFICATE_REQUIRED", _CLIENT_CERTIFICATE_WANTED),
    ("PEER_DID_NOT_RETURN_A_CERTIFICATE", _CLIENT_CERTIFICATE_WANTED),
)


def tls_failure(message: str) -> str | None:
    """A short explanation when a failed call's ``message`` is a TLS handshake failure, else None."""
    for reason, meaning in _HANDSHAKE_FAILURES:
        if reason in message:
            return meaning
    if "handshake failed" in message.lower() and ("tls" in message.lower() or "ssl" in message.lower()):
        return "TLS handshake failed (check --tls-ca-file and the server's certificate)"
    return None
