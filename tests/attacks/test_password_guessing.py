"""Password guessing against two auth-service replicas that share one Redis."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import pytest_asyncio

from authmesh.auth.v1 import auth_pb2
from tests.auth_support import AuthClient, auth_settings, running_auth
from tests.faults import OK, outcome
from tests.waiting import eventually

MAX_FAILURES = 5
WINDOW_SECONDS = 2
GUESSES = 64
VICTIM = ("victim", "the-real-password-1")


@pytest_asyncio.fixture(loop_scope="session")
async def replicas(redis_url: str, nats_url: str) -> AsyncIterator[list[AuthClient]]:
    """Two auth-service replicas on one Redis, with a victim account."""
    settings = [
        auth_settings(
            redis_url,
            [nats_url],
            login_max_failures=MAX_FAILURES,
            login_window=WINDOW_SECONDS,
            instance=f"auth-{name}",
        )
        for name in ("a", "b")
    ]
    async with running_auth(settings[0]) as (_, first), running_auth(settings[1]) as (_, second):
        await first.create_user(*VICTIM)
        yield [first, second]


async def guess_everywhere(clients: list[AuthClient], username: str, count: int) -> Counter[str]:
    """``count`` wrong passwords for ``username``, all at once, spread over the replicas."""
    calls = [
        outcome(
            clients[index % len(clients)].stub.Login(
                auth_pb2.LoginRequest(username=username, password=f"guess-{index:04d}"), timeout=10
            )
        )
        for index in range(count)
    ]
    return Counter(label for label, _ in await asyncio.gather(*calls))


async def test_concurrent_guesses_across_replicas_check_no_more_passwords_than_the_limit(
    replicas: list[AuthClient],
) -> None:
    """Invariant, for 64 wrong passwords sent at once, alternating between two replicas on one Redis:

    - at most ``login_max_failures`` (5) of them are checked at all (``INVALID_CREDENTIALS``); every other
      one is refused before its password is looked at (``RATE_LIMITED``), whichever replica it reached;
    - while the window lasts even the right password is refused on both replicas;
    - after the window the right password works again.
    """
    answers = await guess_everywhere(replicas, VICTIM[0], GUESSES)
    assert answers["INVALID_CREDENTIALS"] == MAX_FAILURES, answers
    assert answers["RATE_LIMITED"] == GUESSES - MAX_FAILURES, answers
    for client in replicas:
        label, _ = await outcome(client.login(*VICTIM))
        assert label == "RATE_LIMITED"

    async def unlocked() -> bool:
        label, _ = await outcome(replicas[1].login(*VICTIM))
        return label == OK

    await eventually(unlocked, within=WINDOW_SECONDS + 10, what="the window to pass")


async def test_guessing_a_username_that_does_not_exist_looks_the_same_as_guessing_a_real_one(
    replicas: list[AuthClient],
) -> None:
    """Invariant: guesses against an unknown username get exactly the answers guesses against a real one get
    (``INVALID_CREDENTIALS`` up to the limit, then ``RATE_LIMITED``), so the answers do not tell an attacker
    which accounts exist."""
    real = await guess_everywhere(replicas, VICTIM[0], GUESSES // 4)
    ghost = await guess_everywhere(replicas, "nobody-by-this-name", GUESSES // 4)
    assert real == ghost


async def test_one_users_lockout_does_not_lock_out_another_user(
    replicas: list[AuthClient], redis_url: str
) -> None:
    """Invariant: the limit counts per username: while one account is locked, another logs in on both
    replicas."""
    await replicas[0].create_user("bystander", "bystander-password-1")
    await guess_everywhere(replicas, VICTIM[0], GUESSES)
    for client in replicas:
        assert (await client.login("bystander", "bystander-password-1")).access_token


async def test_the_limit_holds_for_an_app_started_after_the_guessing_began(
    replicas: list[AuthClient], redis_url: str, nats_url: str
) -> None:
    """Invariant: a third replica started while the window is open refuses the victim at once: the count
    lives in Redis, not in a replica."""
    await guess_everywhere(replicas, VICTIM[0], MAX_FAILURES + 1)
    settings = auth_settings(
        redis_url, [nats_url], login_max_failures=MAX_FAILURES, login_window=WINDOW_SECONDS, instance="auth-c"
    )
    async with running_auth(settings) as (_, late):
        label, _ = await outcome(late.login(*VICTIM))
    assert label == "RATE_LIMITED"
