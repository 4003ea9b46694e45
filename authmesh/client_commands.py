"""The command-line client: `authmesh login, logout, whoami, refresh, revoke, rotate-key, jwks, status`.

A login is kept in a token file only its owner can read (see :class:`authmesh.client.TokenFile`);
the commands that act as someone use its access token, refreshing it first when it has expired. No
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
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, TypeVar

import grpc
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from authmesh._shared.errors import ConfigurationError
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

T = TypeVar("T")
EXIT_FAILURE = 1
EXIT_USAGE = 2
DEFAULT_REASON = "revoked with the authmesh command-line client"

TargetOption = Annotated[
    str | None,
    typer.Option(
        "--target",
        envvar="AUTHMESH_AUTH_TARGET",
        help=f"Auth service host:port (default: the one logged in to, else {DEFAULT_AUTH_TARGET}).",
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


def login(
    username: Annotated[str, typer.Argument(help="Who to log in as.")],
    password: Annotated[
        str | None,
        typer.Option(
            "--password",
            help="The password (visible to other local users in the process list: prefer the prompt).",
        ),
    ] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from the first line of stdin.")
    ] = False,
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
) -> None:
    """Log in and keep the tokens in the token file (readable by you only)."""
    if password is not None and password_stdin:
        _usage("give either --password or --password-stdin, not both")
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif password is None:
        password = typer.prompt("Password", hide_input=True)
    if not password:
        _usage("the password is empty")
    address = target or DEFAULT_AUTH_TARGET
    store = _token_file(token_file)

    async def work() -> None:
        async with AuthApi(address, timeout=timeout) as auth:
            tokens = await auth.login(username, password, tuple(scopes or ()))
        store.save(StoredLogin(address, username, tokens))
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
) -> None:
    """End the stored session (every token issued in it) and delete the token file."""
    store = _token_file(token_file)
    stored = _require_login(store)
    address = target or stored.auth_target

    async def work() -> None:
        async with AuthApi(address, timeout=timeout) as auth:
            try:
                revocation = await auth.logout(stored.tokens.refresh_token)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAUTHENTICATED:
                    raise
                store.delete()
                _out().print(
                    f"The session had already ended ({escape(RpcProblem.from_error(error).label)}); "
                    f"removed {escape(str(store.path))}."
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
) -> None:
    """Ask a resource service replica who the stored access token says you are."""
    store = _token_file(token_file)
    stored = _require_login(store)

    async def work() -> None:
        current = await _fresh_login(store, stored, target, timeout)
        async with ResourceApi(resource, timeout=timeout) as replica:
            identity = await replica.whoami(current.tokens.access_token)
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
) -> None:
    """Spend the stored refresh token for a new pair (the old refresh token is then worthless)."""
    store = _token_file(token_file)
    stored = _require_login(store)
    address = target or stored.auth_target

    async def work() -> None:
        async with AuthApi(address, timeout=timeout) as auth:
            tokens = await auth.refresh(stored.tokens.refresh_token)
        store.save(stored.with_tokens(tokens))
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
    token: Annotated[
        str | None,
        typer.Option("--token", help="Revoke this access or refresh token ('-' reads it from stdin)."),
    ] = None,
    reason: Annotated[
        str, typer.Option("--reason", help="Why (recorded with the revocation).")
    ] = DEFAULT_REASON,
    target: TargetOption = None,
    token_file: TokenFileOption = None,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_SECONDS,
) -> None:
    """Revoke the stored access token, or a session, a user's tokens or a given token.

    The call is made as the logged-in user: anyone may revoke their own tokens and sessions; an admin
    may revoke anyone's.
    """
    chosen = [name for name, value in (("--session", session), ("--user", user), ("--token", token)) if value]
    if len(chosen) > 1:
        _usage(f"give at most one of {', '.join(chosen)}")
    if token == "-":
        token = sys.stdin.readline().strip()
        if not token:
            _usage("no token on stdin")
    store = _token_file(token_file)
    stored = _require_login(store)

    async def work() -> None:
        current = await _fresh_login(store, stored, target, timeout)
        caller = current.tokens.access_token
        async with AuthApi(target or current.auth_target, timeout=timeout) as auth:
            if session is not None:
                done, what = await auth.revoke_session(caller, session, reason), f"session {session}"
            elif user is not None:
                done, what = await auth.revoke_user(caller, user, reason), f"every token of {user}"
            elif token is not None:
                done, what = await auth.revoke_token(caller, token, reason), "the given token"
            else:
                done, what = await auth.revoke_token(caller, caller, reason), "the stored access token"
        _out().print(f"Revoked {escape(what)} {_when(done)}.")
        if session is None and user is None and token is None:
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
) -> None:
    """Make a new signing key active (admin only)."""
    store = _token_file(token_file)
    stored = _require_login(store)

    async def work() -> None:
        current = await _fresh_login(store, stored, target, timeout)
        async with AuthApi(target or current.auth_target, timeout=timeout) as auth:
            rotation = await auth.rotate_signing_key(
                current.tokens.access_token, retire_previous=retire_previous
            )
        _out().print(
            f"New signing key [bold]{escape(rotation.kid)}[/bold] "
            f"(previous: {escape(rotation.previous_kid)})."
        )
        if retire_previous:
            _out().print(
                f"Key {escape(rotation.previous_kid)} is retired: every token it signed is now rejected "
                "(yours too, if it was: log in again)."
            )

    _run(work, target or stored.auth_target)


def jwks(
    target: TargetOption = None,
    token_file: TokenFileOption = None,
    timeout: TimeoutOption = DEFAULT_TIMEOUT_SECONDS,
) -> None:
    """Print the auth service's public keys (an RFC 7517 JWK Set)."""
    address = target or _stored_target(_token_file(token_file))

    async def work() -> None:
        async with AuthApi(address, timeout=timeout) as auth:
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
) -> None:
    """Check the health of the auth service and of the replicas given; exit 1 unless all serve."""
    address = target or _stored_target(_token_file(token_file))
    replicas = [part.strip() for entry in resources or () for part in entry.split(",") if part.strip()]

    async def check(where: str) -> Health:
        async with grpc.aio.insecure_channel(where) as channel:
            return await check_health(channel, where, timeout)

    async def work() -> list[Health]:
        return list(await asyncio.gather(check(address), *(check(where) for where in replicas)))

    answers = _run(work, address)
    table = Table("component", "address", "health", "detail")
    for index, health in enumerate(answers):
        colour = "green" if health.serving else "red"
        table.add_row(
            "auth service" if index == 0 else f"resource replica {index}",
            escape(health.target),
            f"[{colour}]{health.status}[/{colour}]",
            escape(health.detail),
        )
    _out().print(table)
    if not all(health.serving for health in answers):
        raise typer.Exit(EXIT_FAILURE)


async def _fresh_login(
    store: TokenFile, stored: StoredLogin, target: str | None, call_timeout: float
) -> StoredLogin:
    """The stored login, refreshed first (and saved) when its access token has expired."""
    if not stored.tokens.access_expired(time.time()):
        return stored
    if stored.tokens.refresh_expires_at <= time.time():
        _err().print("[red]error[/red]: the stored login has expired; run `authmesh login` again")
        raise typer.Exit(EXIT_FAILURE)
    async with AuthApi(target or stored.auth_target, timeout=call_timeout) as auth:
        tokens = await auth.refresh(stored.tokens.refresh_token)
    renewed = stored.with_tokens(tokens)
    store.save(renewed)
    _err().print("The stored access token had expired: refreshed it.")
    return renewed


def _run(work: Callable[[], Awaitable[T]], where: str) -> T:
    """Run ``work`` on a new event loop; report a failed call or a token-file problem and exit 1."""

    async def main() -> T:
        return await work()

    try:
        return asyncio.run(main())
    except grpc.aio.AioRpcError as error:
        problem = RpcProblem.from_error(error)
        if problem.code in {"UNAVAILABLE", "DEADLINE_EXCEEDED"} and problem.reason is None:
            _err().print(f"[red]error[/red]: cannot reach {escape(where)}: {escape(str(problem))}")
        else:
            _err().print(f"[red]error[/red]: {escape(str(problem))}")
        if problem.reason == "WRONG_AUDIENCE":
            _err().print("admin commands need an admin login: authmesh login USER --scope admin")
        raise typer.Exit(EXIT_FAILURE) from None
    except ConfigurationError as error:
        _err().print(f"[red]error[/red]: {escape(error.message)}")
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


def _stored_target(store: TokenFile) -> str:
    """The auth service logged in to, else the default (a damaged token file is no reason to fail)."""
    try:
        stored = store.load()
    except ConfigurationError:
        return DEFAULT_AUTH_TARGET
    return stored.auth_target if stored is not None else DEFAULT_AUTH_TARGET


def _usage(message: str) -> None:
    _err().print(f"[red]usage error[/red]: {escape(message)}")
    raise typer.Exit(EXIT_USAGE)


def _print_tokens(tokens: Tokens) -> None:
    # Plain output: rich would wrap a long token at the terminal's width and break copy and paste.
    typer.echo(f"access_token: {tokens.access_token}")
    typer.echo(f"refresh_token: {tokens.refresh_token}")


def _seconds_left(unix_seconds: float) -> str:
    return f"{max(0, round(unix_seconds - time.time()))} s"


def _when(revocation: Revocation) -> str:
    at = datetime.fromtimestamp(revocation.revoked_at_unix_ms / 1000, tz=UTC)
    return f"at {at.isoformat(timespec='milliseconds')} (event {escape(revocation.event_id)})"


def _out() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _err() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)
