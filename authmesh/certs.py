"""A throwaway certificate authority for a local or compose stack, and the certificates it signs.

``authmesh up --tls`` and the tests make one CA per stack and one certificate per part (each valid as a
server and as a client, so the same files serve mutual TLS). The keys are ECDSA P-256, kept next to the
certificates in files only their owner can read. Nothing here is meant for production: a real fleet
brings certificates from its own CA and points ``AUTHMESH_TLS_*_FILE`` at them.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from authmesh._shared.tls import TlsFiles

CA_FILE = "ca.pem"
# The names a part on this machine is reached by.
LOCAL_HOSTS = ("127.0.0.1", "localhost")
# Long enough for a stack kept between runs, short enough that a leaked local key soon means nothing.
VALIDITY = datetime.timedelta(days=30)
# Certificates start a little in the past so a peer whose clock is slightly behind accepts them.
_BACKDATE = datetime.timedelta(minutes=5)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "authmesh (local)"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _subject_alternative_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by the owner only (replacing any older file)."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A certificate and its private key, as PEM."""

    certificate_pem: bytes
    key_pem: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    """A self-signed CA that issues server-and-client certificates.

    Attributes:
        certificate: The CA's certificate.
        key: Its private key.
    """

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)

    @classmethod
    def create(cls, common_name: str = "authmesh local CA") -> Self:
        """A new CA with a fresh key."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(certificate, key)

    @property
    def certificate_pem(self) -> bytes:
        """The CA certificate as PEM (what every peer trusts)."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, hosts: Sequence[str]) -> IssuedCertificate:
        """A certificate for ``hosts`` (DNS names or IP addresses), valid for servers and clients.

        Args:
            common_name: The subject's name (the part it identifies).
            hosts: Every name and address peers reach it by.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_subject_alternative_names(hosts), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        return IssuedCertificate(certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key))

    def write_ca(self, directory: Path) -> Path:
        """Write the CA certificate (not its key) to ``directory/ca.pem``."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CA_FILE
        path.write_bytes(self.certificate_pem)
        return path

    def write_issued(
        self, directory: Path, name: str, hosts: Sequence[str], *, require_client_cert: bool = False
    ) -> TlsFiles:
        """Issue a certificate for ``name`` and write it, its key and the CA into ``directory``.

        Args:
            directory: Where the files go (``ca.pem``, ``<name>.pem``, ``<name>-key.pem``).
            name: The part's name, its certificate's common name.
            hosts: Every name and address peers reach it by.
            require_client_cert: Recorded in the returned value for servers that demand mutual TLS.

        Returns:
            The files, ready for a server or a client.
        """
        ca_file = self.write_ca(directory)
        issued = self.issue(name, hosts)
        cert_file = directory / f"{name}.pem"
        key_file = directory / f"{name}-key.pem"
        cert_file.write_bytes(issued.certificate_pem)
        _write_private(key_file, issued.key_pem)
        return TlsFiles(
            ca_file=ca_file, cert_file=cert_file, key_file=key_file, require_client_cert=require_client_cert
        )
