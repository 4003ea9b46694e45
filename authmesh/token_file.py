"""The token file: a login kept between commands.

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
from typing import Any

from authmesh._shared.auth_api import Tokens
from authmesh._shared.errors import ConfigurationError
from authmesh._shared.tls import TlsFiles

TOKEN_FILE_NAME = "tokens.json"
TOKEN_FILE_VERSION = 1
# A token file is a few kilobytes; anything far larger is not ours.
_MAX_TOKEN_FILE_BYTES = 64 * 1024
_PRIVATE_FILE_MODE = 0o600
_PRIVATE_DIR_MODE = 0o700


@dataclass(frozen=True, slots=True)
class StoredLogin:
    """What the token file keeps: who logged in where, how the connection was secured, and the tokens.

    Attributes:
        auth_target: The auth service that issued the tokens (one address, or several, comma-separated).
        username: Who logged in.
        tokens: The current pair.
        tls: Where the TLS files of the login were (paths only, never their content), so later commands
            reach the same servers the same way; plaintext when it has no CA.
    """

    auth_target: str
    username: str
    tokens: Tokens
    tls: TlsFiles = TlsFiles()  # noqa: RUF009  # frozen, so one shared default is safe

    def with_tokens(self, tokens: Tokens) -> StoredLogin:
        """The same login with a new pair (after a refresh)."""
        return StoredLogin(self.auth_target, self.username, tokens, self.tls)

    def to_json(self) -> dict[str, Any]:
        """The file's JSON document."""
        tokens = asdict(self.tokens)
        tokens["scopes"] = list(self.tokens.scopes)
        document: dict[str, Any] = {
            "version": TOKEN_FILE_VERSION,
            "auth_target": self.auth_target,
            "username": self.username,
            "tokens": tokens,
        }
        if self.tls.ca_file is not None:
            document["tls"] = {
                name: str(path)
                for name, path in (
                    ("ca_file", self.tls.ca_file),
                    ("cert_file", self.tls.cert_file),
                    ("key_file", self.tls.key_file),
                )
                if path is not None
            }
        return document

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
            tls=_tls(document.get("tls")),
        )


def _tls(value: object) -> TlsFiles:
    """The stored TLS paths (a login without them was made in plaintext)."""
    if value is None:
        return TlsFiles()
    if not isinstance(value, dict):
        raise ValueError("tls must be an object")
    paths: list[Path | None] = []
    for key in ("ca_file", "cert_file", "key_file"):
        path = value.get(key)
        if path is not None and not isinstance(path, str):
            raise ValueError(f"tls.{key} must be a string")
        paths.append(Path(path) if path else None)
    try:
        return TlsFiles(ca_file=paths[0], cert_file=paths[1], key_file=paths[2])
    except ConfigurationError as error:
        raise ValueError(error.message) from None


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
