"""Logins of the right password that a client gave up on never lock the account; guesses stay limited.

The auth service here checks a password with Argon2id at a cost (~1 s a check on this kind of host)
far above the too-short client deadlines used, so those logins time out on every run, whatever the
host's load. Guessing itself is covered by ``tests/attacks/test_password_guessing.py``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import redis.asyncio as redis

from authmesh._auth_service.app import AuthApp
from authmesh._auth_service.store import login_checks_key, login_failures_key
from authmesh._shared.auth_client import AuthClient as ServiceAuthClient
from authmesh._shared.errors import Unavailable
from authmesh.auth.v1 import auth_pb2
from tests.auth_support import SERVICE, AuthClient, auth_settings, running_auth, service_login
from tests.faults import OK, in_process_replicas, outcome
from tests.waiting import eventually

MAX_FAILURES = 5
WINDOW_SECONDS = 60
# ~1 s a check here; every deadline called too short below is a small fraction of it.
SLOW_ARGON2 = {"argon2_time_cost": 20, "argon2_memory_kib": 65_536, "argon2_parallelism": 1}
TOO_SHORT_SECONDS = 0.3
SANE_SECONDS = 60.0
# PasswordChecker's default: checks that may run at once, each holding a unit of the budget.
PASSWORD_SLOTS = 4


@pytest_asyncio.fixture(loop_scope="session")
async def slow_auth(redis_url: str, nats_url: str) -> AsyncIterator[tuple[AuthApp, AuthClient]]:
    """An auth service whose password checks are slow, with a small failure budget."""
    settings = auth_settings(
        redis_url,
        [nats_url],
        login_max_failures=MAX_FAILURES,
        login_window=WINDOW_SECONDS,
        **SLOW_ARGON2,
    )
    async with running_auth(settings) as running:
        yield running


async def logins_at_once(client: AuthClient, request: auth_pb2.LoginRequest, count: int) -> Counter[str]:
    """``count`` copies of one login sent at once with a deadline far shorter than a password check."""
    calls = [outcome(client.stub.Login(request, timeout=TOO_SHORT_SECONDS)) for _ in range(count)]
    return Counter(label for label, _ in await asyncio.gather(*calls))


async def only_running_checks_left(store: redis.Redis, username: str) -> None:
    """Wait until no login of ``username`` waits for a check slot (those the clients left are dropped)."""

    async def drained() -> bool:
        return int(await store.zcard(login_checks_key(username))) <= PASSWORD_SLOTS

    await eventually(drained, within=10, what="the abandoned logins to give back their budget")


async def test_correct_logins_cut_off_by_a_too_short_deadline_do_not_lock_the_account(
    slow_auth: tuple[AuthApp, AuthClient], raw_redis: redis.Redis
) -> None:
    """Regression: every timed-out Login counted as a failure, so a replica retrying its service login
    under load locked itself out for the whole window. Now a login with a sane deadline right after
    three budgets' worth of cut-off correct logins succeeds on its first try."""
    _, client = slow_auth

    answers = await logins_at_once(client, service_login(), 3 * MAX_FAILURES)
    assert answers["DEADLINE_EXCEEDED"] >= MAX_FAILURES, answers
    assert set(answers) <= {"DEADLINE_EXCEEDED", "RATE_LIMITED"}, answers
    await only_running_checks_left(raw_redis, SERVICE[0])

    label, _ = await outcome(client.stub.Login(service_login(), timeout=SANE_SECONDS))
    assert label == OK
    assert await raw_redis.get(login_failures_key(SERVICE[0])) is None


async def test_guesses_cut_off_by_their_deadline_still_count_and_lock_the_account(
    slow_auth: tuple[AuthApp, AuthClient], raw_redis: redis.Redis
) -> None:
    """Invariant: a guess whose check started is counted even though its client left; leaving early
    gains a guesser nothing, and the right password is then refused for the window."""
    _, client = slow_auth
    guess = auth_pb2.LoginRequest(username=SERVICE[0], password="a-wrong-guess-1", scopes=["service"])

    async def locked() -> bool:
        failures = await raw_redis.get(login_failures_key(SERVICE[0]))
        if failures is not None and int(failures) >= MAX_FAILURES:
            return True
        if await raw_redis.zcard(login_checks_key(SERVICE[0])) == 0:
            await logins_at_once(client, guess, MAX_FAILURES)
        return False

    await eventually(locked, within=60, what="the cut-off guesses to use up the budget")
    label, _ = await outcome(client.stub.Login(service_login(), timeout=SANE_SECONDS))
    assert label == "RATE_LIMITED"


async def test_a_rate_limited_service_login_waits_for_the_window_instead_of_asking_again(
    slow_auth: tuple[AuthApp, AuthClient],
) -> None:
    """The service-account client sends no Login while a RATE_LIMITED answer's window lasts, and says
    how long is left, so the token refresher's backoff waits it out."""
    app, client = slow_auth
    guess = auth_pb2.LoginRequest(username=SERVICE[0], password="a-wrong-guess-2", scopes=["service"])
    for _ in range(MAX_FAILURES):
        label, _ = await outcome(client.stub.Login(guess, timeout=SANE_SECONDS))
        assert label == "INVALID_CREDENTIALS"

    def refused() -> float:
        return app.registry.get_sample_value("authmesh_logins_total", {"result": "rate_limited"}) or 0.0

    async with ServiceAuthClient(app.grpc_address, service_account=SERVICE) as service:
        with pytest.raises(Unavailable) as first:
            await service.introspect("any-token")
        assert 1.0 < first.value.retry_after <= WINDOW_SECONDS  # what is left of the window
        refused_once = refused()
        for _ in range(5):
            with pytest.raises(Unavailable) as again:
                await service.introspect("any-token")
            assert 0 < again.value.retry_after <= first.value.retry_after
    assert refused() == refused_once


async def test_a_replica_whose_first_service_logins_time_out_still_becomes_ready(
    slow_auth: tuple[AuthApp, AuthClient], nats_url: str, raw_redis: redis.Redis
) -> None:
    """A replica configured with a Login deadline far shorter than a password check times out, doubles
    the deadline, and gets its service token without being locked out."""
    app, _ = slow_auth
    await raw_redis.delete(login_failures_key(SERVICE[0]), login_checks_key(SERVICE[0]))

    async with in_process_replicas(
        app.grpc_address, [nats_url], 1, login_timeout=TOO_SHORT_SECONDS
    ) as replicas:
        assert replicas[0].app.ready
