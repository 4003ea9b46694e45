"""``authmesh compose-env``: the secrets directory of docker-compose.yml and the .env it prints."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from typer.testing import CliRunner

from authmesh.cli import app
from authmesh.compose_secrets import (
    CERTIFIED_SERVICES,
    DIRECTORY_MODE,
    FILE_MODE,
    SECRETS_DIR_VARIABLE,
    certificate_file,
    key_file,
    nats_password_file,
    service_hosts,
)
from authmesh.stack_nats_config import nats_authorization, replica_names

PASSWORD_FILES = (
    "key-encryption-key",
    "bootstrap-admin",
    "service-account",
    "redis-password",
    *(nats_password_file(user) for user in ("auth", *replica_names(3))),
)


def compose_env(*arguments: str) -> tuple[int, str, str]:
    """Run ``authmesh compose-env``: exit code, standard output, standard error."""
    result = CliRunner().invoke(app, ["compose-env", *arguments])
    return result.exit_code, result.stdout, result.stderr


def names(certificate: x509.Certificate) -> set[str]:
    """A certificate's DNS and IP address SANs."""
    extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = extension.get_values_for_type(x509.DNSName)
    addresses = [str(address) for address in extension.get_values_for_type(x509.IPAddress)]
    return {*dns, *addresses}


def test_it_writes_every_secret_and_prints_only_where_they_are(tmp_path: Path) -> None:
    directory = tmp_path / "secrets"

    code, stdout, stderr = compose_env("--secrets-dir", str(directory))

    assert code == 0, stderr
    variables = dict(line.split("=", 1) for line in stdout.splitlines() if not line.startswith("#"))
    assert variables == {SECRETS_DIR_VARIABLE: str(directory.absolute())}
    secrets = [(directory / name).read_text() for name in PASSWORD_FILES]
    passwords = [secret.rpartition(":")[2] for secret in secrets]
    assert all(len(password) >= 32 for password in passwords)
    assert len(set(passwords)) == len(passwords)
    assert not [password for password in passwords if password in stdout + stderr]
    assert stat.S_IMODE(directory.stat().st_mode) == DIRECTORY_MODE
    assert {stat.S_IMODE(path.stat().st_mode) for path in directory.iterdir()} == {FILE_MODE}


def test_the_certificates_chain_to_the_ca_and_name_their_services(tmp_path: Path) -> None:
    directory = tmp_path / "secrets"
    compose_env("--secrets-dir", str(directory))
    authority = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())

    for service in CERTIFIED_SERVICES:
        certificate = x509.load_pem_x509_certificate((directory / certificate_file(service)).read_bytes())
        key = (directory / key_file(service)).read_bytes()
        private = load_pem_private_key(key, password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)

        certificate.verify_directly_issued_by(authority)
        assert names(certificate) == set(service_hosts(service)), service
        assert private.public_key() == certificate.public_key()
    assert {"127.0.0.1", "localhost"} <= set(service_hosts("auth")) & set(service_hosts("gateway"))
    assert service_hosts("nats-1") == ("nats-1",)
    # The CA's key is not kept: nothing can sign another certificate the stack would trust.
    keys = [path.name for path in directory.iterdir() if b"PRIVATE KEY" in path.read_bytes()]
    assert sorted(keys) == sorted(key_file(service) for service in CERTIFIED_SERVICES)


def test_the_nats_configuration_carries_the_passwords_the_services_read(tmp_path: Path) -> None:
    directory = tmp_path / "secrets"
    compose_env("--secrets-dir", str(directory))

    def password(user: str) -> str:
        return (directory / nats_password_file(user)).read_text()

    expected = nats_authorization(
        json.dumps(password("auth")), [(name, json.dumps(password(name))) for name in replica_names(3)]
    )
    routes = (directory / "nats-routes.conf").read_text()

    assert (directory / "nats-users.conf").read_text() == expected
    assert routes.count("nats-route://route:") == 3
    assert (directory / "redis-auth.conf").read_text().splitlines() == [
        f"requirepass {(directory / 'redis-password').read_text()}",
        f"masterauth {(directory / 'redis-password').read_text()}",
    ]


def test_it_refuses_to_overwrite_secrets_without_force(tmp_path: Path) -> None:
    directory = tmp_path / "secrets"
    compose_env("--secrets-dir", str(directory))
    before = (directory / "key-encryption-key").read_text()

    code, stdout, stderr = compose_env("--secrets-dir", str(directory))
    kept = (directory / "key-encryption-key").read_text()
    forced, _, _ = compose_env("--secrets-dir", str(directory), "--force")

    assert code == 1
    assert stdout == ""
    assert "already holds secrets" in stderr
    assert "--force" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert kept == before
    assert forced == 0
    assert (directory / "key-encryption-key").read_text() != before


def test_it_refuses_a_file_where_the_directory_goes(tmp_path: Path) -> None:
    path = tmp_path / "secrets"
    path.write_text("not a directory")

    code, stdout, stderr = compose_env("--secrets-dir", str(path))

    assert code == 2
    assert stdout == ""
    assert "--secrets-dir" in stderr


def test_with_sentinel_it_turns_on_the_profile_and_names_the_sentinels(tmp_path: Path) -> None:
    code, stdout, _ = compose_env("--secrets-dir", str(tmp_path / "secrets"), "--sentinel")
    variables = dict(line.split("=", 1) for line in stdout.splitlines() if not line.startswith("#"))

    assert code == 0
    assert variables["COMPOSE_PROFILES"] == "sentinel"
    assert variables["AUTHMESH_COMPOSE_REDIS_URL"].startswith("rediss+sentinel://sentinel-1:26379,")
    assert variables["AUTHMESH_COMPOSE_REDIS_MIN_REPLICAS_ACKED"] == "1"


def test_the_demo_reads_the_admin_from_a_file_and_says_when_it_cannot(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    both = CliRunner().invoke(
        app,
        ["demo", "--target-auth", "a:1", "--target-replicas", "b:2", "--admin", "x:y", "--admin-file", "f"],
    )
    unreadable = CliRunner().invoke(
        app, ["demo", "--target-auth", "a:1", "--target-replicas", "b:2", "--admin-file", str(missing)]
    )

    assert both.exit_code == 2
    assert "one at a time" in both.stderr
    assert unreadable.exit_code == 2
    assert f"cannot read --admin-file {missing}" in unreadable.stderr
