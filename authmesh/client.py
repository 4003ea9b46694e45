"""A small async client for authmesh: the auth service, resource replicas, their health, a token file.

The command-line client and the demo are built on it; the auth service's client, :class:`AuthApi`,
is the library's (re-exported here with its value types). Calls raise ``grpc.aio.AioRpcError`` as gRPC does;
:class:`RpcProblem` turns one into the status code, the ``ErrorInfo`` reason and the message, which is
all a person or a script needs to know about a failure. :meth:`ResourceApi.outcome` never raises for a
refusal: it is what polling loops use to watch a token go from accepted to rejected.

The token file keeps a login between commands. It holds live credentials, so it is written the way
ssh treats private keys: created with mode 0600 through ``os.open`` (never readable by others, not even
for a moment), replaced atomically, in a directory created 0700, and refused when its mode lets anyone
else read it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authmesh._shared.auth_api import (
    ADMIN_SCOPE,
    DEFAULT_TIMEOUT_SECONDS,
    AuthApi,
    KeyRotation,
    Revocation,
    Tokens,
    bearer,
)
from authmesh._shared.auth_client import channel_options
from authmesh._shared.errors import ConfigurationError
from authmesh._shared.grpc_errors import error_reason
from authmesh._shared.tls import TlsFiles, open_channel
from authmesh.resource.v1 import resource_pb2, resource_pb2_grpc

DEFAULT_AUTH_TARGET = "127.0.0.1:50051"
DEFAULT_RESOURCE_TARGET = "127.0.0.1:50061"
TOKEN_FILE_NAME = "tokens.json"
TOKEN_FILE_VERSION = 1
ACCEPTED = "OK"
__all__ = [
    "ACCEPTED",
    "ADMIN_SCOPE",
    "DEFAULT_AUTH_TARGET",
    "DEFAULT_RESOURCE_TARGET",
    "DEFAULT_TIMEOUT_SECONDS",
    "AuthApi",
    "Health",
    "Identity",
    "KeyRotation",
    "Outcome",
    "ResourceApi",
    "Revocation",
    "RpcProblem",
    "StoredLogin",
    "TokenFile",
    "Tokens",
    "bearer",
    "check_health",
    "default_token_path",
]
# A token file is a few kilobytes; anything far larger is not ours.
_MAX_TOKEN_FILE_BYTES = 64 * 1024
_PRIVATE_FILE_MODE = 0o600
_PRIVATE_DIR_MODE = 0o700


@dataclass(frozen=True, slots=True)
class RpcProblem:
    """Why a call failed, in the terms of the contract.

    Attributes:
        code: The gRPC status code's name (``UNAUTHENTICATED``, ``UNAVAILABLE``, ...).
        reason: The ``ErrorInfo.reason`` (``SESSION_REVOKED``, ...), when the server sent one.
        message: The status message.
    """

    code: str
    reason: str | None
    message: str

    @classmethod
    def from_error(cls, error: grpc.aio.AioRpcError) -> RpcProblem:
        """Read a failed call."""
        return cls(code=error.code().name, reason=error_reason(error), message=error.details() or "")

    @property
    def label(self) -> str:
        """The reason when there is one, else the status code: what a summary shows."""
        return self.reason or self.code

    def __str__(self) -> str:
        head = f"{self.code} ({self.reason})" if self.reason else self.code
        return f"{head}: {self.message}" if self.message else head


@dataclass(frozen=True, slots=True)
class Identity:
    """What a replica's ``WhoAmI`` said.

    Attributes:
        subject: ``sub`` of the token.
        scopes: Its scopes.
        session_id: ``sid``.
        token_id: ``jti``.
        instance: The replica that answered.
    """

    subject: str
    scopes: tuple[str, ...]
    session_id: str
    token_id: str
    instance: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a replica answered one protected call.

    Attributes:
        label: ``OK`` when accepted, else the error reason (or the status code without one).
        code: The gRPC status code's name (``OK`` when accepted).
        instance: The replica that answered, when it accepted.
    """

    label: str
    code: str
    instance: str = ""

    @property
    def accepted(self) -> bool:
        """Whether the call was accepted."""
        return self.code == ACCEPTED


@dataclass(frozen=True, slots=True)
class Health:
    """One service's ``grpc.health.v1`` answer.

    Attributes:
        target: Where it was asked.
        status: ``SERVING``, ``NOT_SERVING``, ... or ``UNREACHABLE``.
        detail: Why it could not be asked, when unreachable.
    """

    target: str
    status: str
    detail: str = ""

    @property
    def serving(self) -> bool:
        """Whether the service says it serves."""
        return self.status == "SERVING"


async def check_health(channel: grpc.aio.Channel, target: str, call_timeout: float) -> Health:
    """Ask a service's health endpoint (the whole server, service name ``""``).

    Args:
        channel: A channel to the service.
        target: Its address, for the answer.
        call_timeout: The call's gRPC deadline, seconds.

    Returns:
        The answer; ``UNREACHABLE`` when the call failed.
    """
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        response = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=call_timeout)
    except grpc.aio.AioRpcError as error:
        return Health(target, "UNREACHABLE", str(RpcProblem.from_error(error)))
    return Health(target, health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


class _Channel:
    """A channel to one target (TLS when ``tls`` has a CA), opened on entry and closed on exit."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        tls: TlsFiles = TlsFiles(),  # noqa: B008  # frozen, so one shared default is safe
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.tls = tls
        self._channel: grpc.aio.Channel | None = None

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            raise RuntimeError(f"the client for {self.target} is not open")
        return self._channel

    async def __aenter__(self) -> Self:
        self._channel = open_channel(self.target, self.tls, channel_options())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the channel (calls in flight are cancelled)."""
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close(grace=None)


class ResourceApi(_Channel):
    """One resource-service replica (an async context manager).

    Args:
        target: ``host:port`` of the replica.
        timeout: Deadline of each call, seconds.
        tls: The CA to verify the server against (and a client certificate); plaintext without.
    """

    _resource_stub: resource_pb2_grpc.ResourceServiceAsyncStub | None = None
    _stub_for: grpc.aio.Channel | None = None

    @property
    def _stub(self) -> resource_pb2_grpc.ResourceServiceAsyncStub:
        channel = self.channel
        if self._resource_stub is None or self._stub_for is not channel:
            self._resource_stub, self._stub_for = resource_pb2_grpc.ResourceServiceStub(channel), channel
        return self._resource_stub

    async def whoami(self, token: str, *, call_timeout: float | None = None) -> Identity:
        """``WhoAmI`` with ``token``.

        Raises:
            grpc.aio.AioRpcError: The replica refused the token or could not be reached.
        """
        response = await self._stub.WhoAmI(
            resource_pb2.WhoAmIRequest(), metadata=bearer(token), timeout=call_timeout or self.timeout
        )
        return Identity(
            subject=response.subject,
            scopes=tuple(response.scopes),
            session_id=response.session_id,
            token_id=response.token_id,
            instance=response.instance,
        )

    async def outcome(self, token: str, *, call_timeout: float | None = None) -> Outcome:
        """How the replica answers ``WhoAmI`` with ``token`` right now; never raises for a refusal."""
        try:
            identity = await self.whoami(token, call_timeout=call_timeout)
        except grpc.aio.AioRpcError as error:
            problem = RpcProblem.from_error(error)
            return Outcome(label=problem.label, code=problem.code)
        return Outcome(label=ACCEPTED, code=ACCEPTED, instance=identity.instance)


@dataclass(frozen=True, slots=True)
class StoredLogin:
    """What the token file keeps: who logged in where, and the tokens.

    Attributes:
        auth_target: The auth service that issued the tokens.
        username: Who logged in.
        tokens: The current pair.
    """

    auth_target: str
    username: str
    tokens: Tokens

    def with_tokens(self, tokens: Tokens) -> StoredLogin:
        """The same login with a new pair (after a refresh)."""
        return StoredLogin(self.auth_target, self.username, tokens)

    def to_json(self) -> dict[str, Any]:
        """The file's JSON document."""
        tokens = asdict(self.tokens)
        tokens["scopes"] = list(self.tokens.scopes)
        return {
            "version": TOKEN_FILE_VERSION,
            "auth_target": self.auth_target,
            "username": self.username,
            "tokens": tokens,
        }

    @classmethod
    def from_json(cls, document: object) -> StoredLogin:
        """Read the file's JSON document.

        Raises:
            ValueError: It is not a token file this version wrote.
        """
        if not isinstance(document, dict) or document.get("version") != TOKEN_FILE_VERSION:
            raise ValueError("not a version 1 token file")
        tokens = document.get("tokens")
        if not isinstance(tokens, dict):
            raise ValueError("no tokens")
        scopes = tokens.get("scopes")
        if not isinstance(scopes, list) or not all(isinstance(scope, str) for scope in scopes):
            raise ValueError("scopes must be a list of strings")
        return cls(
            auth_target=_text(document, "auth_target"),
            username=_text(document, "username"),
            tokens=Tokens(
                access_token=_text(tokens, "access_token"),
                refresh_token=_text(tokens, "refresh_token"),
                session_id=_text(tokens, "session_id"),
                scopes=tuple(scopes),
                expires_at=_number(tokens, "expires_at"),
                refresh_expires_at=_number(tokens, "refresh_expires_at"),
            ),
        )


def _text(document: dict[str, Any], key: str) -> str:
    value = document.get(key)
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string")
    return value


def _number(document: dict[str, Any], key: str) -> float:
    value = document.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number")
    return float(value)


def default_token_path(environ: Mapping[str, str]) -> Path:
    """Where the token file lives by default: ``$XDG_STATE_HOME/authmesh/tokens.json``.

    Args:
        environ: The process environment (passed in: this module reads no globals).

    Returns:
        ``$XDG_STATE_HOME/authmesh/tokens.json``, or ``~/.local/state/authmesh/tokens.json`` when
        ``XDG_STATE_HOME`` is unset or not absolute (as the XDG specification says to treat it).
    """
    state_home = environ.get("XDG_STATE_HOME", "")
    base = Path(state_home) if state_home and Path(state_home).is_absolute() else None
    if base is None:
        home = environ.get("HOME")
        base = (Path(home) if home else Path.home()) / ".local" / "state"
    return base / "authmesh" / TOKEN_FILE_NAME


class TokenFile:
    """The file that keeps a login between commands, readable by its owner only.

    Args:
        path: Where it lives.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> StoredLogin | None:
        """The stored login, or None when there is no file.

        Raises:
            ConfigurationError: The file is not ours, others may read it, or it is not a token file.
        """
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            descriptor = os.open(self.path, flags)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise ConfigurationError(f"cannot read token file {self.path}: {error.strerror}") from error
        with os.fdopen(descriptor, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ConfigurationError(f"token file {self.path} is not a regular file")
            if info.st_uid != os.getuid():
                raise ConfigurationError(f"token file {self.path} belongs to another user")
            if info.st_mode & 0o077:
                raise ConfigurationError(
                    f"token file {self.path} is accessible by others (mode {stat.S_IMODE(info.st_mode):o}); "
                    "run: chmod 600 on it, or log in again after deleting it"
                )
            content = handle.read(_MAX_TOKEN_FILE_BYTES + 1)
        if len(content) > _MAX_TOKEN_FILE_BYTES:
            raise ConfigurationError(f"token file {self.path} is too large to be a token file")
        try:
            return StoredLogin.from_json(json.loads(content))
        except ValueError as error:
            raise ConfigurationError(f"token file {self.path} is damaged ({error}); log in again") from error

    def save(self, login: StoredLogin) -> None:
        """Write the login atomically, mode 0600, creating the directory (mode 0700) if missing.

        Raises:
            ConfigurationError: The file could not be written.
        """
        directory = self.path.parent
        try:
            if not directory.exists():
                directory.mkdir(mode=_PRIVATE_DIR_MODE, parents=True)
                os.chmod(directory, _PRIVATE_DIR_MODE)  # mkdir's mode is filtered by the umask
            self._write(json.dumps(login.to_json(), indent=2).encode() + b"\n")
        except OSError as error:
            raise ConfigurationError(f"cannot write token file {self.path}: {error.strerror}") from error

    def delete(self) -> bool:
        """Remove the file; whether there was one."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        return True

    def _write(self, content: bytes) -> None:
        # A fresh file created 0600 by this very call (O_EXCL), then renamed over the old one: the
        # tokens are never in a file anyone else could open, nor in a half-written one.
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        descriptor = os.open(temporary, flags, _PRIVATE_FILE_MODE)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                os.fchmod(handle.fileno(), _PRIVATE_FILE_MODE)
                handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
