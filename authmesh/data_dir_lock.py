"""One running stack per data directory: an exclusive lock held for the stack's life.

The lock is an ``flock`` on ``<data dir>/stack.lock``: the kernel releases it when the process that
holds it exits, however it exits, so a stack killed with ``kill -9`` leaves no stale lock behind. The
file also records the holder's process id, for the error message of the next one that tries.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from types import TracebackType
from typing import Self

from authmesh._shared.errors import ConfigurationError

LOCK_FILE = "stack.lock"


class DataDirLock:
    """Holds ``<directory>/stack.lock`` exclusively while entered (a context manager).

    Args:
        directory: The stack's data directory (it must exist).

    Raises:
        ConfigurationError: On entry, when another running process holds the directory.
    """

    def __init__(self, directory: Path) -> None:
        self._path = directory / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> Self:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise ConfigurationError(
                f"{self._path.parent} is held by another running stack (process {holder}); "
                "stop it or choose another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._fd = fd
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the descriptor releases the lock
