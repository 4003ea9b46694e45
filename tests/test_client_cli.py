"""The command-line client against a real auth service and a real resource replica, both in process.

Each command runs through typer's ``CliRunner`` in a worker thread: a command runs its own event loop
(``asyncio.run``), which cannot nest inside the test's loop, where the services run.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import typer
from pydantic import SecretStr
from typer.testing import CliRunner, Result

from authmesh._auth_service.app import AuthApp
from authmesh._resource_service.app import ResourceApp
from authmesh._shared.dpop import LOGIN_METHOD, ProofSigner
from authmesh._shared.settings import ResourceSettings
from authmesh.auth.v1 import auth_pb2
from authmesh.client import StoredLogin, TokenFile, Tokens
from authmesh.client_commands import register
from authmesh.processes import LOOPBACK, free_port
from tests.auth_support import (
    ADMIN,
    ADMIN_SCOPE,
    SERVICE,
    AuthClient,
    auth_settings,
    expect_error,
    running_auth,
)

ALICE = ("alice", "alice-password-1")
READY_DEADLINE = 15.0


def cli() -> typer.Typer:
    """The client commands on an application of their own, as ``authmesh`` wires them."""
    app = typer.Typer()
    register(app)
    return app


@dataclass
class Services:
    """The running services and where the test keeps its token file."""

    auth: AuthApp
    client: AuthClient
    replica: ResourceApp
    token_file: Path

    async def run(
        self, *args: str, stdin: str | None = None, env: dict[str, str | None] | None = None
    ) -> Result:
        """Run ``authmesh ARGS`` (off the test's event loop) and return what it did."""
        return await asyncio.to_thread(CliRunner().invoke, cli(), list(args), input=stdin, env=env)

    def common(self) -> list[str]:
        """Flags that point a command at these services and this token file."""
        return ["--target", self.auth.grpc_address, "--token-file", str(self.token_file)]

    async def login(self, username: str, password: str, *extra: str) -> Result:
        """``authmesh login USER --password-stdin``."""
        return await self.run(
            "login", username, "--password-stdin", *self.common(), *extra, stdin=f"{password}\n"
        )

    async def admin_login(self) -> Result:
        """``authmesh login admin --scope admin``: the login the admin commands need."""
        return await self.login(*ADMIN, "--scope", ADMIN_SCOPE)

    def stored(self) -> StoredLogin:
        """What the token file holds now."""
        stored = TokenFile(self.token_file).load()
        assert stored is not None
        return stored


# A line the in-process services log while a command runs: CliRunner captures the process's stdout, so
# their lines can land among the command's own output.
SERVICE_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[")


def cli_json(result: Result) -> Any:
    """The JSON document a command printed, without the in-process services' log lines."""
    return json.loads(
        "\n".join(line for line in result.stdout.splitlines() if not SERVICE_LOG_LINE.match(line))
    )


@asynccontextmanager
async def running_replica(
    auth: AuthApp, nats_url: str, instance: str = "replica-cli", **overrides: Any
) -> AsyncIterator[ResourceApp]:
    """A resource replica in process, once it serves (``overrides`` are further settings)."""
    values: dict[str, Any] = {
        "nats_urls": [nats_url],
        "auth_target": auth.grpc_address,
        "grpc_listen": f"{LOOPBACK}:0",
        "http_listen": f"{LOOPBACK}:0",
        "service_account": SecretStr(f"{SERVICE[0]}:{SERVICE[1]}"),
        "instance": instance,
        "shutdown_grace": 0.2,
        "log_level": "warning",
    }
    settings = ResourceSettings(**(values | overrides))
    async with ResourceApp(settings) as replica:
        deadline = time.monotonic() + READY_DEADLINE
        while not replica.ready:
            assert time.monotonic() < deadline, "the replica did not become ready"
            await asyncio.sleep(0.02)
        yield replica


@pytest_asyncio.fixture(loop_scope="session")
async def services(redis_url: str, nats_url: str, tmp_path: Path) -> AsyncIterator[Services]:
    """An auth service with alice, a replica, and a token file path under ``tmp_path``."""
    async with running_auth(auth_settings(redis_url, [nats_url])) as (auth, client):
        await client.create_user(*ALICE)
        async with running_replica(auth, nats_url) as replica:
            yield Services(auth, client, replica, tmp_path / "state" / "authmesh" / "tokens.json")


def assert_failed_with(result: Result, *fragments: str, exit_code: int = 1) -> None:
    """The command failed with ``exit_code`` and its error output names every fragment."""
    assert result.exit_code == exit_code, result.output
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def assert_no_token_in(outputs: Sequence[str], tokens: Tokens) -> None:
    for output in outputs:
        assert tokens.access_token not in output
        assert tokens.refresh_token not in output


async def test_login_keeps_the_tokens_in_a_file_only_the_owner_can_read(services: Services) -> None:
    result = await services.login(*ALICE)

    assert result.exit_code == 0, result.output
    assert "Logged in as alice" in result.stdout
    assert stat.S_IMODE(services.token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(services.token_file.parent.stat().st_mode) == 0o700
    stored = services.stored()
    assert stored.username == "alice"
    assert stored.auth_target == services.auth.grpc_address
    assert "docs:read" in stored.tokens.scopes
    assert_no_token_in([result.stdout, result.stderr], stored.tokens)


async def test_the_token_file_defaults_to_the_xdg_state_directory(services: Services, tmp_path: Path) -> None:
    state = tmp_path / "xdg-state"
    result = await services.run(
        "login", ALICE[0], "--password-stdin", "--target", services.auth.grpc_address,
        stdin=f"{ALICE[1]}\n", env={"XDG_STATE_HOME": str(state), "AUTHMESH_TOKEN_FILE": None},
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    token_file = state / "authmesh" / "tokens.json"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700


async def test_the_token_file_is_created_private_whatever_the_umask(tmp_path: Path) -> None:
    token_file = TokenFile(tmp_path / "loose" / "tokens.json")
    tokens = Tokens("access", "refresh", "sid", ("docs:read",), time.time() + 60, time.time() + 600)
    previous = os.umask(0)
    try:
        token_file.save(StoredLogin("127.0.0.1:1", "alice", tokens))
    finally:
        os.umask(previous)

    assert stat.S_IMODE(token_file.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.path.parent.stat().st_mode) == 0o700
    assert token_file.load() == StoredLogin("127.0.0.1:1", "alice", tokens)


async def test_login_prompts_for_the_password_when_none_is_given(services: Services) -> None:
    result = await services.run("login", ALICE[0], *services.common(), stdin=f"{ALICE[1]}\n")

    assert result.exit_code == 0, result.output
    assert ALICE[1] not in result.output
    assert services.stored().username == "alice"


async def test_only_show_token_prints_the_tokens(services: Services) -> None:
    result = await services.login(*ALICE, "--show-token")

    assert result.exit_code == 0, result.output
    tokens = services.stored().tokens
    assert f"access_token: {tokens.access_token}" in result.stdout
    assert f"refresh_token: {tokens.refresh_token}" in result.stdout


async def test_a_wrong_password_exits_non_zero_with_the_status_and_reason(services: Services) -> None:
    result = await services.login(ALICE[0], "not-her-password")

    assert_failed_with(result, "UNAUTHENTICATED", "INVALID_CREDENTIALS")
    assert not services.token_file.exists()


async def test_an_unreachable_auth_service_is_reported_with_its_address(services: Services) -> None:
    nowhere = f"{LOOPBACK}:{free_port()}"
    result = await services.run(
        "login", ALICE[0], "--password-stdin", "--target", nowhere, "--token-file", str(services.token_file),
        "--timeout", "2", stdin=f"{ALICE[1]}\n",
    )  # fmt: skip

    assert_failed_with(result, f"cannot reach {nowhere}", "UNAVAILABLE")


async def test_whoami_answers_from_the_replica_with_the_stored_token(services: Services) -> None:
    await services.login(*ALICE)

    result = await services.run("whoami", "--resource", services.replica.grpc_address, *services.common())

    assert result.exit_code == 0, result.output
    assert "replica-cli" in result.stdout
    assert services.stored().tokens.session_id in result.stdout
    assert_no_token_in([result.stdout, result.stderr], services.stored().tokens)


async def test_commands_that_need_a_login_fail_without_one(services: Services) -> None:
    for command in (["whoami"], ["refresh"], ["revoke"], ["rotate-key"], ["logout"]):
        result = await services.run(*command, *services.common())
        assert_failed_with(result, "not logged in")


async def test_a_token_file_others_can_read_is_refused(services: Services) -> None:
    await services.login(*ALICE)
    services.token_file.chmod(0o644)

    result = await services.run("whoami", "--resource", services.replica.grpc_address, *services.common())

    assert_failed_with(result, "accessible by others")


async def test_refresh_replaces_the_stored_pair_and_spends_the_old_refresh_token(services: Services) -> None:
    await services.login(*ALICE)
    before = services.stored().tokens

    result = await services.run("refresh", *services.common())

    assert result.exit_code == 0, result.output
    after = services.stored().tokens
    assert after.refresh_token != before.refresh_token
    assert after.session_id == before.session_id
    assert stat.S_IMODE(services.token_file.stat().st_mode) == 0o600
    # Presenting the spent token again is reuse: the whole session dies, the new pair with it.
    TokenFile(services.token_file).save(services.stored().with_tokens(before))
    reused = await services.run("refresh", *services.common())
    assert_failed_with(reused, "UNAUTHENTICATED", "REFRESH_TOKEN_REUSED")


async def test_an_expired_stored_access_token_is_refreshed_before_use(services: Services) -> None:
    await services.login(*ALICE)
    stored = services.stored()
    expired = Tokens(
        stored.tokens.access_token, stored.tokens.refresh_token, stored.tokens.session_id,
        stored.tokens.scopes, time.time() - 1, stored.tokens.refresh_expires_at,
    )  # fmt: skip
    TokenFile(services.token_file).save(stored.with_tokens(expired))

    result = await services.run("whoami", "--resource", services.replica.grpc_address, *services.common())

    assert result.exit_code == 0, result.output
    assert "refreshed" in result.stderr
    assert services.stored().tokens.refresh_token != stored.tokens.refresh_token


async def test_revoke_revokes_the_stored_access_token_everywhere(services: Services) -> None:
    await services.login(*ALICE)

    result = await services.run("revoke", *services.common())

    assert result.exit_code == 0, result.output
    assert "Revoked the stored access token" in result.stdout
    whoami = [*services.common(), "--resource", services.replica.grpc_address]
    deadline = time.monotonic() + READY_DEADLINE
    while (refused := await services.run("whoami", *whoami)).exit_code == 0:
        assert time.monotonic() < deadline, "the replica kept accepting a revoked token"
        await asyncio.sleep(0.02)
    assert_failed_with(refused, "UNAUTHENTICATED", "TOKEN_REVOKED")


async def test_revoke_session_ends_the_session(services: Services) -> None:
    await services.login(*ALICE)
    session = services.stored().tokens.session_id

    result = await services.run("revoke", "--session", session, *services.common())

    assert result.exit_code == 0, result.output
    assert f"session {session}" in result.stdout
    refused = await services.run("refresh", *services.common())
    assert_failed_with(refused, "UNAUTHENTICATED")


async def test_revoke_accepts_one_target_at_most(services: Services) -> None:
    await services.login(*ALICE)

    result = await services.run("revoke", "--session", "s", "--user", "u", *services.common())

    assert_failed_with(result, "at most one", exit_code=2)


async def test_revoking_a_user_needs_an_admin(services: Services) -> None:
    await services.login(*ALICE)

    result = await services.run("revoke", "--user", "someone", *services.common())

    assert_failed_with(result, "UNAUTHENTICATED", "WRONG_AUDIENCE", "--scope admin")


async def test_an_admin_logged_in_without_the_admin_scope_gets_no_admin_power(services: Services) -> None:
    plain = await services.login(*ADMIN)
    assert plain.exit_code == 0, plain.output
    assert "scopes (none)" in plain.stdout

    result = await services.run("revoke", "--user", "someone", *services.common())

    assert_failed_with(result, "UNAUTHENTICATED", "WRONG_AUDIENCE")


async def test_revoke_reads_a_token_from_stdin(services: Services) -> None:
    victim = await services.client.login(*ALICE)
    await services.admin_login()

    result = await services.run(
        "revoke", "--token", "-", *services.common(), stdin=f"{victim.access_token}\n"
    )

    assert result.exit_code == 0, result.output
    assert victim.access_token not in result.output


async def test_rotate_key_needs_an_admin(services: Services) -> None:
    await services.login(*ALICE)

    result = await services.run("rotate-key", *services.common())

    assert_failed_with(result, "UNAUTHENTICATED", "WRONG_AUDIENCE")


async def test_rotate_key_with_retire_previous_rejects_tokens_of_the_old_key(services: Services) -> None:
    await services.admin_login()
    keys_before = cli_json(await services.run("jwks", *services.common()))

    result = await services.run("rotate-key", "--retire-previous", *services.common())

    assert result.exit_code == 0, result.output
    assert "retired" in result.stdout
    keys_after = cli_json(await services.run("jwks", *services.common()))
    assert {key["kid"] for key in keys_after["keys"]} != {key["kid"] for key in keys_before["keys"]}
    # The admin's own token was signed by the retired key.
    again = await services.run("rotate-key", *services.common())
    assert_failed_with(again, "UNAUTHENTICATED", "KEY_REVOKED")


async def test_jwks_prints_the_public_key_set(services: Services) -> None:
    result = await services.run("jwks", "--target", services.auth.grpc_address)

    assert result.exit_code == 0, result.output
    keys = cli_json(result)["keys"]
    assert keys
    assert all(key["kty"] == "EC" and "d" not in key for key in keys)


async def test_status_reports_every_service_and_fails_when_one_does_not_serve(services: Services) -> None:
    replica = services.replica.grpc_address
    healthy = await services.run("status", "--target", services.auth.grpc_address, "--resource", replica)

    assert healthy.exit_code == 0, healthy.output
    assert healthy.stdout.count("SERVING") == 2

    nowhere = f"{LOOPBACK}:{free_port()}"
    broken = await services.run(
        "status",
        "--target",
        services.auth.grpc_address,
        "--resource",
        f"{replica},{nowhere}",
        "--timeout",
        "1",
    )
    assert broken.exit_code == 1
    assert "UNREACHABLE" in broken.stdout


async def test_logout_ends_the_session_and_deletes_the_token_file(services: Services) -> None:
    await services.login(*ALICE)

    result = await services.run("logout", *services.common())

    assert result.exit_code == 0, result.output
    assert not services.token_file.exists()


@pytest.mark.parametrize("flags", [["--password", "x", "--password-stdin"]])
async def test_login_refuses_two_password_sources(services: Services, flags: list[str]) -> None:
    result = await services.run("login", ALICE[0], *flags, *services.common(), stdin="x\n")

    assert_failed_with(result, "either --password or --password-stdin", exit_code=2)


async def test_an_admin_creates_and_lists_users(services: Services) -> None:
    await services.login(*ADMIN, "--scope", "admin")

    created = await services.run(
        "user", "create", "bob", "--password-stdin", "--scope", "docs:read", "--scope", "docs:write",
        *services.common(), stdin="bob-password-1\n",
    )  # fmt: skip
    listed = await services.run("user", "list", "--json", *services.common())
    bobs = await services.run("user", "list", "--prefix", "bo", *services.common())

    assert created.exit_code == 0, created.output
    assert "Created user bob" in created.stdout
    assert listed.exit_code == 0, listed.output
    users = {user["username"]: user for user in cli_json(listed)["users"]}
    assert {"alice", "bob", ADMIN[0]} <= set(users)
    assert users["bob"]["scopes"] == ["docs:read", "docs:write"]
    assert bobs.exit_code == 0, bobs.output
    assert "bob" in bobs.stdout
    assert "alice" not in bobs.stdout
    assert (await services.client.login("bob", "bob-password-1")).access_token


async def test_user_commands_need_an_admin(services: Services) -> None:
    await services.login(*ALICE)

    listed = await services.run("user", "list", *services.common())
    created = await services.run("user", "create", "eve", "--password", "eve-password-1", *services.common())

    assert_failed_with(listed, "UNAUTHENTICATED", "WRONG_AUDIENCE", "--scope admin")
    assert_failed_with(created, "UNAUTHENTICATED", "WRONG_AUDIENCE", "--scope admin")


async def test_revoke_by_username_refuses_every_token_of_that_user(services: Services) -> None:
    victim = await services.client.login(*ALICE)
    await services.login(*ADMIN, "--scope", "admin")

    result = await services.run("revoke", "--username", ALICE[0], *services.common())
    unknown = await services.run("revoke", "--username", "nobody", *services.common())

    assert result.exit_code == 0, result.output
    assert "every token of alice" in result.stdout
    assert_failed_with(unknown, "no user is named nobody")
    await expect_error(
        services.client.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=victim.refresh_token), timeout=10),
        grpc.StatusCode.UNAUTHENTICATED,
    )


async def test_revoke_by_key_thumbprint_refuses_every_token_bound_to_that_key(services: Services) -> None:
    lost = ProofSigner()
    settings = services.auth.settings
    auth_origin = settings.proof_origins(settings.grpc_listen)[0]  # the name Login's proofs must use
    bound = await services.client.stub.Login(
        auth_pb2.LoginRequest(username=ALICE[0], password=ALICE[1]),
        metadata=(("dpop", lost.proof(auth_origin, LOGIN_METHOD)),),
        timeout=10,
    )
    await services.login(*ADMIN, "--scope", "admin")

    result = await services.run("revoke", "--jkt", lost.jkt, *services.common())

    assert result.exit_code == 0, result.output
    assert f"every token bound to key {lost.jkt}" in result.stdout
    assert (await services.client.introspect(bound.access_token)).inactive_reason == "TOKEN_REVOKED"


async def test_a_stored_session_the_auth_service_refuses_to_renew_is_reported_once(
    services: Services,
) -> None:
    await services.login(*ALICE)
    stored = services.stored()
    await services.run("revoke", "--session", stored.tokens.session_id, *services.common())
    due = Tokens(
        stored.tokens.access_token, stored.tokens.refresh_token, stored.tokens.session_id,
        stored.tokens.scopes, time.time() - 1, stored.tokens.refresh_expires_at,
    )  # fmt: skip
    TokenFile(services.token_file).save(stored.with_tokens(due))

    result = await services.run("whoami", "--resource", services.replica.grpc_address, *services.common())

    assert_failed_with(result, "UNAUTHENTICATED", "REFRESH_TOKEN_INVALID")
    assert services.stored().tokens == due


async def test_an_admin_disables_and_enables_a_user_by_name(services: Services) -> None:
    await services.login(*ADMIN, "--scope", "admin")

    disabled = await services.run("user", "disable", ALICE[0], *services.common())
    listed = await services.run("user", "list", "--json", *services.common())
    elsewhere = ["--target", services.auth.grpc_address, "--token-file", str(services.token_file) + ".alice"]
    refused = await services.run("login", ALICE[0], "--password-stdin", *elsewhere, stdin=f"{ALICE[1]}\n")
    enabled = await services.run("user", "enable", ALICE[0], *services.common())
    unknown = await services.run("user", "disable", "nobody", *services.common())

    assert disabled.exit_code == 0, disabled.output
    assert "Disabled alice" in disabled.stdout
    users = {user["username"]: user for user in cli_json(listed)["users"]}
    assert users["alice"]["disabled"] is True
    assert_failed_with(refused, "UNAUTHENTICATED", "USER_DISABLED")
    assert enabled.exit_code == 0, enabled.output
    assert (await services.client.login(*ALICE)).access_token
    assert_failed_with(unknown, "no user is named nobody")
