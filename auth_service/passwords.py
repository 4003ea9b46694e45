"""Argon2id password hashing, off the event loop and bounded in memory.

An unknown username is checked against a dummy hash made with the same parameters, so it costs the same
time as a wrong password and the answer cannot tell the two apart.
"""

from __future__ import annotations

import asyncio

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError


class PasswordChecker:
    """Hashes and verifies passwords with Argon2id.

    Args:
        time_cost: Passes.
        memory_kib: Memory per hash, KiB.
        parallelism: Lanes.
        concurrency: Hashes computed at once; each takes ``memory_kib`` of memory.
    """

    def __init__(self, *, time_cost: int, memory_kib: int, parallelism: int, concurrency: int = 4) -> None:
        self._hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism)
        self._slots = asyncio.Semaphore(concurrency)
        self._dummy_hash = self._hasher.hash("authmesh-dummy-password-for-unknown-users")

    async def hash(self, password: str) -> str:
        """An Argon2id hash (PHC string) of ``password``."""
        async with self._slots:
            return await asyncio.to_thread(self._hasher.hash, password)

    async def start_verify(self, password_hash: str | None, password: str) -> asyncio.Future[bool]:
        """Start a check once a slot is free; the returned future says whether ``password`` matches.

        ``None`` (an unknown user) is checked against the dummy hash and never matches.

        Waiting for the slot can be cancelled, and then nothing is checked. Once started, the check runs
        to its end whatever happens to the caller (a thread cannot be stopped), and keeps its slot till
        then, so cancelled calls never run more checks at once than ``concurrency``.
        """
        target = password_hash if password_hash is not None else self._dummy_hash
        await self._slots.acquire()
        check = asyncio.get_running_loop().run_in_executor(
            None, self._verify_sync, target, password, password_hash is not None
        )
        check.add_done_callback(lambda _: self._slots.release())
        return check

    def needs_rehash(self, password_hash: str) -> bool:
        """Whether a (verified) hash was made with other parameters than the configured ones."""
        try:
            return self._hasher.check_needs_rehash(password_hash)
        except InvalidHashError:
            return False

    def _verify_sync(self, password_hash: str, password: str, known_user: bool) -> bool:
        try:
            return self._hasher.verify(password_hash, password) and known_user
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
