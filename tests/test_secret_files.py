"""Secrets from files (``AUTHMESH_<SECRET>_FILE``), and secrets that never print."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from pydantic import SecretStr

from authmesh._shared.settings import AuthSettings, ResourceSettings
from authmesh.processes import free_port
from authmesh.stack import authmesh_command

KEK = "kek-secret-value-0123456789"
ADMIN = "admin:admin-secret-password"
SERVICE = "svc:service-secret-password"
NATS_PASSWORD = "nats-secret-password"
REDIS_PASSWORD = "redis-secret-password"
SECRETS = (KEK, ADMIN, SERVICE, NATS_PASSWORD, REDIS_PASSWORD)


def secret_files(directory: Path) -> dict[str, str]:
    """Every secret of the auth service in its own file (with the trailing newline editors add)."""
    values = {
        "KEY_ENCRYPTION_KEY": KEK,
        "BOOTSTRAP_ADMIN": ADMIN,
        "SERVICE_ACCOUNT": SERVICE,
        "NATS_PASSWORD": NATS_PASSWORD,
        "REDIS_PASSWORD": REDIS_PASSWORD,
    }
    env = {}
    for name, value in values.items():
        path = directory / name.lower()
        path.write_text(value + "\n")
        env[f"AUTHMESH_{name}_FILE"] = str(path)
    return env


def test_every_secret_setting_is_read_from_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in secret_files(tmp_path).items():
        monkeypatch.setenv(name, value)
    settings = AuthSettings()
    assert settings.require_key_encryption_key() == KEK.encode()
    assert settings.bootstrap_admin is not None
    assert settings.bootstrap_admin.get_secret_value() == ADMIN
    assert settings.service_account is not None
    assert settings.service_account.get_secret_value() == SERVICE
    assert settings.nats_password is not None
    assert settings.nats_password.get_secret_value() == NATS_PASSWORD
    assert settings.redis_password is not None
    assert settings.redis_password.get_secret_value() == REDIS_PASSWORD
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert not [secret for secret in SECRETS if secret in text]


def test_the_redis_url_and_the_resource_service_account_come_from_files(tmp_path: Path) -> None:
    url = tmp_path / "url"
    url.write_text(f"rediss://auth:{REDIS_PASSWORD}@127.0.0.1:7000/0\n")
    account = tmp_path / "account"
    account.write_text(SERVICE)
    assert REDIS_PASSWORD in AuthSettings(redis_url_file=url).redis_url.get_secret_value()
    replica = ResourceSettings(service_account_file=account)
    assert replica.service_account is not None
    assert replica.service_account.get_secret_value() == SERVICE


def test_a_secret_set_both_ways_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    path.write_text(KEK)
    with pytest.raises(ValueError, match="AUTHMESH_KEY_ENCRYPTION_KEY or AUTHMESH_KEY_ENCRYPTION_KEY_FILE"):
        AuthSettings(key_encryption_key=SecretStr(KEK), key_encryption_key_file=path)


def test_an_unreadable_secret_file_is_named_and_nothing_else(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read AUTHMESH_BOOTSTRAP_ADMIN_FILE") as info:
        AuthSettings(bootstrap_admin_file=tmp_path / "absent")
    assert "absent" in str(info.value)


def test_a_malformed_secret_from_a_file_is_refused_without_echoing_it(tmp_path: Path) -> None:
    path = tmp_path / "admin"
    path.write_text("no-colon-secret-value")
    with pytest.raises(ValueError, match="username:password") as info:
        AuthSettings(bootstrap_admin_file=path)
    assert "no-colon-secret-value" not in str(info.value)


async def run_authmesh(env: dict[str, str], *args: str) -> tuple[int, str]:
    """Run ``authmesh`` with ``env`` over this process's environment; exit status and all its output."""
    process = await asyncio.create_subprocess_exec(
        *authmesh_command(*args),
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(60):
        output, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def test_secrets_appear_neither_in_help_nor_in_a_failed_start(tmp_path: Path) -> None:
    closed = free_port()
    env = {
        **secret_files(tmp_path),
        # A password in the URL too, as an operator might write it.
        "AUTHMESH_REDIS_URL": f"redis://auth:{REDIS_PASSWORD}@127.0.0.1:{closed}/0",
        "AUTHMESH_NATS_URLS": f"nats://127.0.0.1:{closed}",
        "AUTHMESH_LOG_FORMAT": "json",
    }
    status, help_text = await run_authmesh(env, "auth-server", "--help")
    assert status == 0, help_text
    assert "--key-encryption-key-file" in help_text
    assert not [secret for secret in SECRETS if secret in help_text]

    status, output = await run_authmesh(env, "auth-server")
    assert status != 0
    assert output.strip(), "a failed start must say why"
    assert not [secret for secret in SECRETS if secret in output], output

    env["AUTHMESH_BOOTSTRAP_ADMIN_FILE"] = str(tmp_path / "absent")
    status, output = await run_authmesh(env, "auth-server")
    assert status == 2
    assert "AUTHMESH_BOOTSTRAP_ADMIN_FILE" in output
    assert not [secret for secret in SECRETS if secret in output], output
