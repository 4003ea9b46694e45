"""The command-line client: `authmesh login, logout, whoami, refresh, revoke, rotate-key, user, jwks, status`.

A login is kept in a token file only its owner can read (see :class:`authmesh.client.TokenFile`). The
commands are built on the library's client: the stored login is resumed as a
:class:`~authmesh._shared.token_session.TokenSession` (renewed when due, the new pair saved at once),
and the administrative commands go through :class:`~authmesh._shared.admin_client.AdminClient`. No
command prints a token unless asked with ``--show-token``.

Exit codes: 0 on success; 1 when a call fails (the message names the status code and the reason),
when nobody is logged in, or when ``status`` finds a service that does not serve; 2 for a usage error.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import grpc
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from authmesh._shared.admin_client import AdminClient
from authmesh._shared.auth_api import KeyRotation, User
from authmesh._shared.errors import AuthError, ConfigurationError, SessionEnded, Unavailable
from authmesh._shared.grpc_errors import status_code_for
from authmesh._shared.tls import TlsFiles, grpc_channel_credentials, open_channel
from authmesh._shared.token_session import TokenSession
from authmesh.client import (
    DEFAULT_AUTH_TARGET,
    DEFAULT_RESOURCE_TARGET,
    DEFAULT_TIMEOUT_SECONDS,
    AuthApi,
    Health,
    ResourceApi,
    Revocation,
    RpcProblem,
    StoredLogin,
    TokenFile,
    Tokens,
    check_health,
    default_token_path,
)
from authmesh.tls_options import (
    TlsCaFileOption,
    TlsCertFileOption,
    TlsKeyFileOption,
    client_tls,
    tls_failure,
)

T = TypeVar("T")
EXIT_FAILURE = 1
EXIT_USAGE = 2
DEFAULT_REASON = "revoked with the authmesh command-line client"
# A stored access token this close to its end is renewed before a command uses it.
RENEW_MARGIN_SECONDS = 5.0

TargetOption = Annotated[
    str | None,
    typer.Option(
        "--target",
        envvar="AUTHMESH_AUTH_TARGET",
        help="Auth service host:port, or several ip:port separated by commas (calls are balanced over "
        f"those that are up; default: the one logged in to, else {DEFAULT_AUTH_TARGET}).",
        show_default=False,
    ),
]
TokenFileOption = Annotated[
    Path | None,
    typer.Option(
        "--token-file",
        envvar="AUTHMESH_TOKEN_FILE",
        help="Where the login is kept (default: $XDG_STATE_HOME/authmesh/tokens.json).",
        show_default=False,
        dir_okay=False,
    ),
]
TimeoutOption = Annotated[
    float, typer.Option("--timeout", min=0.1, max=300.0, help="Deadline of each call, seconds.")
]
PasswordOption = Annotated[
    str | None,
    typer.Option(
        "--password",
        help="The password (visible to other local users in the process list: prefer the prompt).",
    ),
]
PasswordStdinOption = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from the first line of stdin.")
]
ShowTokenOption = Annotated[
    bool, typer.Option("--show-token", help="Also print the tokens (they are secrets: mind your terminal).")
]


def register(app: typer.Typer) -> None:
    """Add the client commands to the ``authmesh`` application."""
    app.command("login")(login)
    app.command("logout")(logout)
    app.command("whoami")(whoami)
    app.command("refresh")(refresh)
    app.command("revoke")(revoke)
    app.command("rotate-key")(rotate_key)
    app.command("jwks")(jwks)
    app.command("status")(status)
    users = typer.Typer(help="Manage users (admin only).", no_args_is_help=True)
    users.command("create")(user_create)
    users.command("list")(user_list)
    users.command("disable")(user_disable)
    users.command("enable")(user_enable)
    app.add_typer(users, name="user")


def login(
    username: Annotated[str, typer.Argument(help="Who to log in as.")],
    password: PasswordOption = None,
    password_stdin: PasswordStdinOption = False,
    scopes: Annotated[
        list[str] | None,
        typer.Option(
            "--scope",
            help=(
                "A scope to ask for (repeat for several; default: the user's resource scopes). "
                "--scope admin logs in for the admin commands (revoke --user, rotate-key)."
            ),
        ),
    ] = None,
    target: TargetOption = None,
    token_file: TokenFileOption = None,
    show_token: ShowTokenOption = False,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_SECONDS,
    tls_ca_file: TlsCaFileOption = None,
    tls_cert_file: TlsCertFileOption = None,
    tls_key_file: TlsKeyFileOption = None,
) -> None:
    """Log in and keep the tokens in the token file (readable by you only)."""
    if password is not None and password_stdin:
        _usage("give either --password or --password-stdin, not both")
    password = _read_password(password, password_stdin, "Password")
    address = target or DEFAULT_AUTH_TARGET
    store = _token_file(token_file)

    async def work() -> None:
        tls = client_tls(tls_ca_file, tls_cert_file, tls_key_file)
        session = TokenSession.login(
            address,
            username,
            password,
            scopes=tuple(scopes or ()),
            timeout=timeout,
            credentials=grpc_channel_credentials(tls),
        )
        async with session:
            tokens = _tokens(session)
        store.save(StoredLogin(address, username, tokens, tls))
        _out().print(
            f"Logged in as [bold]{escape(username)}[/bold] at {escape(address)}: "
            f"session {escape(tokens.session_id)}, scopes {escape(' '.join(tokens.scopes) or '(none)')}, "
            f"access token valid for {_seconds_left(tokens.expires_at)}."
        )
        _out().print(f"Tokens saved to {escape(str(store.path))}")
        if show_token:
            _print_tokens(tokens)

    _run(work, address)


def logout(
    target: TargetOption = None,
    token_file: TokenFileOption = None,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_SECONDS,
    tls_ca_file: TlsCaFileOption = None,
    tls_cert_file: TlsCertFileOption = None,
    tls_key_file: TlsKeyFileOption = None,
) -> None:
    """End the stored session (every token issued in it) and delete the token file."""
    store = _token_file(token_file)
    stored = _require_login(store)
    address = target or stored.auth_target

    async def work() -> None:
        try:
            tls = _chosen_tls(stored, tls_ca_file, tls_cert_file, tls_key_file)
            async with _stored_session(store, stored, target, timeout, tls) as session:
                revocation = await session.logout()
        except (grpc.aio.AioRpcError, SessionEnded) as error:
            if isinstance(error, grpc.aio.AioRpcError) and error.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise
            label = error.code if isinstance(error, SessionEnded) else RpcProblem.from_error(error).label
            store.delete()
            _out().print(
                f"The session had already ended ({escape(label)}); removed {escape(str(store.path))}."
            )
            return
        store.delete()
        _out().print(
            f"Logged out: session {escape(stored.tokens.session_id)} revoked {_when(revocation)}; "
            f"removed {escape(str(store.path))}."
        )

    _run(work, address)


def whoami(
    resource: Annotated[
        str, typer.Option("--resource", help="Resource service replica host:port.")
    ] = DEFAULT_RESOURCE_TARGET,
    target: TargetOption = None,
    token_file: TokenFileOption = None,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_SECONDS,
    tls_ca_file: TlsCaFileOption = None,
    tls_cert_file: TlsCertFileOption = None,
    tls_key_file: TlsKeyFileOption = None,
) -> None:
    """Ask a resource service replica who the stored access token says you are."""
    store = _token_file(token_file)
    stored = _require_login(store)

    async def work() -> None:
        tls = _chosen_tls(stored, tls_ca_file, tls_cert_file, tls_key_file)
        async with (
            _stored_session(store, stored, target, timeout, tls) as session,
            ResourceApi(resource, timeout=timeout, tls=tls) as replica,
        ):
            identity = await replica.whoami(await session.access_token())
        table = Table(show_header=False, box=None)
        table.add_row("subject", escape(identity.subject))
        table.add_row("scopes", escape(" ".join(identity.scopes)))
        table.add_row("session", escape(identity.session_id))
        table.add_row("token id", escape(identity.token_id))
        table.add_row("answered by", escape(identity.instance))
        _out().print(table)

    _run(work, resource)


def refresh(
    target: TargetOption = None,
    token_file: TokenFileOption = None,
    show_token: ShowTokenOption = False,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_SECONDS,
    tls_ca_file: TlsCaFileOption = None,
    tls_cert_file: TlsCertFileOption = None,
    tls_key_file: TlsKeyFileOption = None,
) -> None:
    """Spend the stored refresh token for a new pair (the old refresh token is then worthless)."""
    store = _token_file(token_file)
    stored = _require_login(store)
    address = target or stored.auth_target

    async def work() -> None:
        tls = _chosen_tls(stored, tls_ca_file, tls_cert_file, tls_key_file)
        async with _stored_session(store, stored, address, timeout, tls, renew=False) as session:
            tokens = await session.renew()
        _out().print(
            f"Refreshed session {escape(tokens.session_id)}: "
            f"access token valid for {_seconds_left(tokens.expires_at)}."
        )
        if show_token:
            _print_tokens(tokens)

    _run(work, address)


def revoke(
    session: Annotated[str | None, typer.Option("--session", help="Revoke this session.")] = None,
    user: Annotated[
        str | None, typer.Option("--user", help="Revoke every token of this subject (admin only).")
    ] = None,
    username: Annotated[
        str | None, typer.Option("--username", help="Revoke every token of this user, by name (admin only).")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option("--token", help="Revoke this access or refresh token ('-' reads it from stdin)."),
    ] = None,
    jkt: Annotated[
        str | None,
        typer.Option(
            "--jkt", help="Revoke every token bound to this DPoP key thumbprint (a lost device; admin only)."
        ),
    ] = None,
    reason: Annotated[
        str, typer.Option("--reason", help="Why (recorded with the revocation).")
    ] = DEFAULT_REASON,
    target: TargetOption = None,
    token_file: TokenFileOption = None,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_SECONDS,
    tls_ca_file: TlsCaFileOption = None,
    tls_cert_file: TlsCertFileOption = None,
    tls_key_file: TlsKeyFileOption = None,
) -> None:
    """Revoke the stored access token, or a session, a user's tokens, a DPoP key's or a given token.

    The call is made as the logged-in user: anyone may revoke their own tokens and sessions; an admin
    may revoke anyone's.
    """
    given = (
        ("--session", session),
        ("--user", user),
        ("--username", username),
        ("--token", token),
        ("--jkt", jkt),
    )
    chosen = [name for name, value in given if value]
    if len(chosen) > 1:
        _usage(f"give at most one of {', '.join(chosen)}")
    if token == "-":
        token = sys.stdin.readline().strip()
        if not token:
            _usage("no token on stdin")
    store = _token_file(token_file)
    stored = _require_login(store)

    async def work() -> None:
        tls = _chosen_tls(stored, tls_ca_file, tls_cert_file, tls_key_file)
        async with _admin(store, stored, target, timeout, tls) as (current, admin):
            if session is not None:
                done, what = await admin.revoke_session(session, reason), f"session {session}"
            elif user is not None:
                done, what = await admin.revoke_user(user, reason), f"every token of {user}"
            elif username is not None:
                found = await _named(admin, username)
                done = await admin.revoke_user(found.subject, reason)
                what = f"every token of {username} ({found.subject})"
            elif token is not None:
                done, what = await admin.revoke_token(token, reason), "the given token"
            elif jkt is not None:
                done, what = await admin.revoke_key_binding(jkt, reason), f"every token bound to key {jkt}"
            else:
                caller = await current.access_token()
                done, what = await admin.revoke_token(caller, reason), "the stored access token"
        _out().print(f"Revoked {escape(what)} {_when(done)}.")
        if not chosen:
            _out().print("The stored refresh token still works: `authmesh refresh` gets a new access token.")

    _run(work, target or stored.auth_target)


def rotate_key(
    retire_previous: Annotated[
        bool,
        typer.Option(
            "--retire-previous",
            help="Key compromise: reject every token the previous key signed, at once, everywhere.",
        ),
    ] = False,
    target: TargetOption = None,
    token_file: TokenFileOption = None,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_SECONDS,
    tls_ca_file: TlsCaFileOption = None,
    tls_cert_file: TlsCertFileOption = None,
    tls_key_file: TlsKeyFileOption = None,
) -> None:
    """Make a new signing key active (admin only)."""

    async def act(admin: AdminClient) -> KeyRotation:
        return await admin.rotate_signing_key(retire_previous=retire_previous)

    rotation = _run_as_admin(token_file, target, timeout, (tls_ca_file, tls_cert_file, tls_key_file), act)
    _out().print(
        f"New signing key [bold]{escape(rotation.kid)}[/bold] (previous: {escape(rotation.previous_kid)})."
    )
    if retire_previous:
        _out().print(
            f"Key {escape(rotation.previous_kid)} is retired: every token it signed is now rejected "
            "(yours too, if it was: log in again)."
        )


def user_create(
    username: Annotated[str, typer.Argument(help="The new user's name.")],
    password: PasswordOption = None,
    password_stdin: PasswordStdinOption = False,
    scopes: Annotated[
        list[str] | None, typer.Option("--scope", help="A scope the user holds (repeat for several).")
    ] = None,
    target: TargetOption = None,
    token_file: TokenFileOption = None,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_SECONDS,
    tls_ca_file: TlsCaFileOption = None,
    tls_cert_file: TlsCertFileOption = None,
    tls_key_file: TlsKeyFileOption = None,
) -> None:
    """Add a user (as the logged-in admin)."""
    password = _read_password(password, password_stdin, f"Password for {username}", confirm=True)

    async def act(admin: AdminClient) -> str:
        return await admin.create_user(username, password, tuple(scopes or ()))

    subject = _run_as_admin(token_file, target, timeout, (tls_ca_file, tls_cert_file, tls_key_file), act)
    _out().print(
        f"Created user [bold]{escape(username)}[/bold] ({escape(subject)}) "
        f"with scopes {escape(' '.join(scopes or ()) or '(none)')}."
    )


def user_list(
    prefix: Annotated[str, typer.Option("--prefix", help="Only users whose name starts with this.")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document instead of a table.")] = False,
    target: TargetOption = None,
    token_file: TokenFileOption = None,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_SECONDS,
    tls_ca_file: TlsCaFileOption = None,
    tls_cert_file: TlsCertFileOption = None,
    tls_key_file: TlsKeyFileOption = None,
) -> None:
    """List the users in username order (as the logged-in admin)."""

    async def act(admin: AdminClient) -> list[User]:
        return [user async for user in admin.users(username_prefix=prefix)]

    users = _run_as_admin(token_file, target, timeout, (tls_ca_file, tls_cert_file, tls_key_file), act)
    if as_json:
        typer.echo(json.dumps({"users": [_user_json(user) for user in users]}, indent=2))
        return
    table = Table("username", "subject", "scopes", "created", "state")
    for user in users:
        table.add_row(
            escape(user.username),
            escape(user.subject),
            escape(" ".join(user.scopes)),
            _instant(user.created_at_unix_ms),
            "[red]disabled[/red]" if user.disabled else "active",
        )
    _out().print(table)


def user_disable(
    username: Annotated[str, typer.Argument(help="Who to disable.")],
    reason: Annotated[
        str, typer.Option("--reason", help="Why (recorded with the revocation).")
    ] = "disabled with the authmesh command-line client",
    target: TargetOption = None,
    token_file: TokenFileOption = None,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_SECONDS,
    tls_ca_file: TlsCaFileOption = None,
    tls_cert_file: TlsCertFileOption = None,
    tls_key_file: TlsKeyFileOption = None,
) -> None:
    """Disable a user: no login or refresh until enabled; every session and token of it is revoked."""

    async def act(admin: AdminClient) -> tuple[User, Revocation]:
        found = await _named(admin, username)
        return found, await admin.disable_user(found.subject, reason)

    found, done = _run_as_admin(token_file, target, timeout, (tls_ca_file, tls_cert_file, tls_key_file), act)
    _out().print(
        f"Disabled {escape(username)} ({escape(found.subject)}); its tokens were revoked {_when(done)}."
    )


def user_enable(
    username: Annotated[str, typer.Argument(help="Who to enable again.")],
    target: TargetOption = None,
    token_file: TokenFileOption = None,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_SECONDS,
    tls_ca_file: TlsCaFileOption = None,
    tls_cert_file: TlsCertFileOption = None,
    tls_key_file: TlsKeyFileOption = None,
) -> None:
    """Let a disabled user log in again (what was revoked stays revoked)."""

    async def act(admin: AdminClient) -> User:
        found = await _named(admin, username)
        await admin.enable_user(found.subject)
        return found

    found = _run_as_admin(token_file, target, timeout, (tls_ca_file, tls_cert_file, tls_key_file), act)
    _out().print(f"Enabled {escape(username)} ({escape(found.subject)}): it may log in again.")


def jwks(
    target: TargetOption = None,
    token_file: TokenFileOption = None,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_SECONDS,
    tls_ca_file: TlsCaFileOption = None,
    tls_cert_file: TlsCertFileOption = None,
    tls_key_file: TlsKeyFileOption = None,
) -> None:
    """Print the auth service's public keys (an RFC 7517 JWK Set)."""
    stored = _stored_login(_token_file(token_file))
    address = target or (stored.auth_target if stored else DEFAULT_AUTH_TARGET)

    async def work() -> None:
        tls = _chosen_tls(stored, tls_ca_file, tls_cert_file, tls_key_file)
        async with AuthApi(address, timeout=timeout, credentials=grpc_channel_credentials(tls)) as auth:
            text = await auth.jwks()
        typer.echo(json.dumps(json.loads(text), indent=2))

    _run(work, address)


def status(
    resources: Annotated[
        list[str] | None,
        typer.Option(
            "--resource",
            help="A resource service replica host:port to check (repeat, or separate with commas).",
        ),
    ] = None,
    target: TargetOption = None,
    token_file: TokenFileOption = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, max=300.0, help="Deadline of each check, seconds.")
    ] = 3.0,
    tls_ca_file: TlsCaFileOption = None,
    tls_cert_file: TlsCertFileOption = None,
    tls_key_file: TlsKeyFileOption = None,
) -> None:
    """Check the health of the auth service and of the replicas given; exit 1 unless all serve."""
    stored = _stored_login(_token_file(token_file))
    address = target or (stored.auth_target if stored else DEFAULT_AUTH_TARGET)
    replicas = [part.strip() for entry in resources or () for part in entry.split(",") if part.strip()]
    # Every auth process on its own: a balanced channel would hide the one that is down.
    auth_targets = [part.strip() for part in address.split(",") if part.strip()]

    async def check(where: str, tls: TlsFiles) -> Health:
        async with open_channel(where, tls) as channel:
            return await check_health(channel, where, timeout)

    async def work() -> list[Health]:
        tls = _chosen_tls(stored, tls_ca_file, tls_cert_file, tls_key_file)
        every = [*auth_targets, *replicas]
        return list(await asyncio.gather(*(check(where, tls) for where in every)))

    answers = _run(work, address)
    table = Table("component", "address", "health", "detail")
    for index, health in enumerate(answers):
        colour = "green" if health.serving else "red"
        table.add_row(
            "auth service"
            if index < len(auth_targets)
            else f"resource replica {index - len(auth_targets) + 1}",
            escape(health.target),
            f"[{colour}]{health.status}[/{colour}]",
            escape(health.detail),
        )
    _out().print(table)
    if not all(health.serving for health in answers):
        raise typer.Exit(EXIT_FAILURE)


@asynccontextmanager
async def _stored_session(
    store: TokenFile,
    stored: StoredLogin,
    target: str | None,
    call_timeout: float,
    tls: TlsFiles,
    *,
    renew: bool = True,
) -> AsyncIterator[TokenSession]:
    """The stored login as a session: renewed when due (say so, and save the new pair at once)."""
    if stored.tokens.refresh_expires_at <= time.time():
        _fail("the stored login has expired; run `authmesh login` again")

    def save(tokens: Tokens) -> None:
        store.save(stored.with_tokens(tokens))
        if renew:
            _err().print("The stored access token was about to expire: refreshed it.")

    session = TokenSession.resume(
        target or stored.auth_target,
        stored.tokens,
        renew_margin=RENEW_MARGIN_SECONDS,
        timeout=call_timeout,
        on_renew=save,
        credentials=grpc_channel_credentials(tls),
    )
    async with session:
        yield session


@asynccontextmanager
async def _admin(
    store: TokenFile, stored: StoredLogin, target: str | None, call_timeout: float, tls: TlsFiles
) -> AsyncIterator[tuple[TokenSession, AdminClient]]:
    """The stored session and an admin client acting as it."""
    async with (
        _stored_session(store, stored, target, call_timeout, tls) as session,
        AdminClient(session, timeout=call_timeout) as admin,
    ):
        yield session, admin


def _run_as_admin(
    token_file: Path | None,
    target: str | None,
    call_timeout: float,
    tls_options: tuple[Path | None, Path | None, Path | None],
    act: Callable[[AdminClient], Awaitable[T]],
) -> T:
    """Run ``act`` with an admin client acting as the stored login; exit 1 on any failure."""
    store = _token_file(token_file)
    stored = _require_login(store)

    async def work() -> T:
        tls = _chosen_tls(stored, *tls_options)
        async with _admin(store, stored, target, call_timeout, tls) as (_, admin):
            return await act(admin)

    return _run(work, target or stored.auth_target)


async def _named(admin: AdminClient, username: str) -> User:
    """The user called ``username``; exits 1 when there is none."""
    found = await admin.find_user(username)
    if found is None:
        _fail(f"no user is named {username}")
    return found


def _read_password(password: str | None, from_stdin: bool, prompt: str, *, confirm: bool = False) -> str:
    if password is not None and from_stdin:
        _usage("give either --password or --password-stdin, not both")
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif password is None:
        password = typer.prompt(prompt, hide_input=True, confirmation_prompt=confirm)
    if not password:
        _usage("the password is empty")
    return password


def _tokens(session: TokenSession) -> Tokens:
    tokens = session.tokens
    if tokens is None:  # an entered session always holds tokens
        raise RuntimeError("the session holds no tokens")
    return tokens


def _run(work: Callable[[], Awaitable[T]], where: str) -> T:
    """Run ``work`` on a new event loop; report a failed call or a token-file problem and exit 1."""

    async def main() -> T:
        return await work()

    try:
        return asyncio.run(main())
    except grpc.aio.AioRpcError as error:
        problem = RpcProblem.from_error(error)
        if problem.code in {"UNAVAILABLE", "DEADLINE_EXCEEDED"} and problem.reason is None:
            described = tls_failure(problem.message) or str(problem)
            _err().print(f"[red]error[/red]: cannot reach {escape(where)}: {escape(described)}")
        else:
            _err().print(f"[red]error[/red]: {escape(str(problem))}")
        if problem.reason == "WRONG_AUDIENCE":
            _err().print("admin commands need an admin login: authmesh login USER --scope admin")
        raise typer.Exit(EXIT_FAILURE) from None
    except ConfigurationError as error:
        _err().print(f"[red]error[/red]: {escape(error.message)}")
        raise typer.Exit(EXIT_FAILURE) from None
    except AuthError as error:
        described = f"{status_code_for(error).name} ({error.code}): {error.message}"
        if isinstance(error, Unavailable):
            described = tls_failure(error.message) or described
        unreachable = f"cannot reach {where}: " if isinstance(error, Unavailable) else ""
        _err().print(f"[red]error[/red]: {escape(unreachable + described)}")
        raise typer.Exit(EXIT_FAILURE) from None


def _token_file(path: Path | None) -> TokenFile:
    return TokenFile(path if path is not None else default_token_path(os.environ))


def _require_login(store: TokenFile) -> StoredLogin:
    try:
        stored = store.load()
    except ConfigurationError as error:
        _err().print(f"[red]error[/red]: {escape(error.message)}")
        raise typer.Exit(EXIT_FAILURE) from None
    if stored is None:
        _err().print(
            f"[red]error[/red]: not logged in (no {escape(str(store.path))}); run `authmesh login USER`"
        )
        raise typer.Exit(EXIT_FAILURE)
    return stored


def _stored_login(store: TokenFile) -> StoredLogin | None:
    """The stored login, if any (a damaged token file is no reason to fail a command that needs none)."""
    try:
        return store.load()
    except ConfigurationError:
        return None


def _chosen_tls(
    stored: StoredLogin | None, ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> TlsFiles:
    """The TLS files given as options (or their variables), else those of the stored login.

    Raises:
        ConfigurationError: The options given do not go together.
    """
    if ca_file is None and cert_file is None and key_file is None:
        return stored.tls if stored is not None else TlsFiles()
    return client_tls(ca_file, cert_file, key_file)


def _usage(message: str) -> NoReturn:
    _err().print(f"[red]usage error[/red]: {escape(message)}")
    raise typer.Exit(EXIT_USAGE)


def _fail(message: str) -> NoReturn:
    _err().print(f"[red]error[/red]: {escape(message)}")
    raise typer.Exit(EXIT_FAILURE)


def _print_tokens(tokens: Tokens) -> None:
    # Plain output: rich would wrap a long token at the terminal's width and break copy and paste.
    typer.echo(f"access_token: {tokens.access_token}")
    typer.echo(f"refresh_token: {tokens.refresh_token}")


def _seconds_left(unix_seconds: float) -> str:
    return f"{max(0, round(unix_seconds - time.time()))} s"


def _when(revocation: Revocation) -> str:
    return f"at {_instant(revocation.revoked_at_unix_ms)} (event {escape(revocation.event_id)})"


def _instant(unix_ms: int) -> str:
    return datetime.fromtimestamp(unix_ms / 1000, tz=UTC).isoformat(timespec="milliseconds")


def _user_json(user: User) -> dict[str, object]:
    return {
        "username": user.username,
        "subject": user.subject,
        "scopes": list(user.scopes),
        "created_at": _instant(user.created_at_unix_ms),
        "disabled": user.disabled,
    }


def _out() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _err() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)
