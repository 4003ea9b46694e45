"""Redis (append-only, ``appendfsync always``) restarted under load: what was acknowledged survives."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from authmesh.auth.v1 import auth_pb2
from authmesh.processes import RedisServer
from tests.auth_support import auth_settings, running_auth
from tests.faults import OK, Auth, kid_of, outcome
from tests.waiting import eventually

PASSWORD = "steady-password-1"
DEADLINE = 20.0
# Progress wanted from each worker before the outage, during it (answers) and after it.
BEFORE = 3
DURING = 5
ROTATIONS = 6
STORE_DOWN = {"STORE_UNAVAILABLE"}


@dataclass
class Load:
    """What the workers were told, per kind of call: acknowledged effects and every answer seen."""

    users: list[str] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
    users_revoked: list[str] = field(default_factory=list)
    kids: list[str] = field(default_factory=list)
    answers: list[tuple[str, str, bool]] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    down: bool = False

    def saw(self, call: str, label: str, allowed: set[str]) -> None:
        """Record an answer; anything but OK, a store outage, or what ``allowed`` names is wrong."""
        self.answers.append((call, label, self.down))
        if label not in {OK, *STORE_DOWN, *allowed}:
            self.wrong.append(f"{call}: {label}")

    def count(self, call: str, label: str = OK, *, down: bool | None = None) -> int:
        """How many answers of ``call`` were ``label`` (while the store was down, if asked)."""
        return sum(
            1 for c, lab, d in self.answers if c == call and lab == label and (down is None or d == down)
        )


async def until(stop: asyncio.Event, step: Callable[[], Awaitable[bool]]) -> None:
    """Run ``step`` until ``stop`` is set or it returns False."""
    while not stop.is_set():
        if not await step():
            return


@pytest.mark.parametrize("how", ["kill", "stop"])
async def test_a_redis_restart_under_load_loses_no_acknowledged_revocation_user_or_key(
    own_redis: RedisServer, nats_url: str, how: str
) -> None:
    """Invariant, with Redis killed (``kill -9``) or stopped, then restarted, while users are created, tokens,
    sessions and users revoked, keys rotated, logins made and tokens introspected:

    - no acknowledged user, revocation or key is lost: each user can log in, each revoked token is
      inactive by ``Introspect``, each rotated-in key is in the JWK Set;
    - while Redis is down every call answers ``UNAVAILABLE`` (``STORE_UNAVAILABLE``), never a wrong answer
      (a valid token called inactive, a revoked one active, a correct password refused);
    - the service resumes by itself, without a restart.
    """
    async with running_auth(auth_settings(own_redis.url, [nats_url])) as (_, client):
        auth = Auth(client.channel)
        await auth.create_user("steady", PASSWORD)
        steady = await auth.login("steady", PASSWORD)
        admin = await auth.admin()
        service = await auth.service()
        subjects = [await auth.create_user(f"victim-{index}", PASSWORD) for index in range(24)]
        pool = [await auth.login(f"victim-{index}", PASSWORD) for index in range(16)]
        victims = [
            (subjects[index], await auth.login(f"victim-{index}", PASSWORD)) for index in range(16, 24)
        ]
        already_revoked = pool.pop()
        await client.stub.RevokeToken(
            auth_pb2.RevokeTokenRequest(token=already_revoked.access_token), metadata=admin
        )
        load = Load()
        stop = asyncio.Event()
        counter = iter(range(1_000_000))

        async def create() -> bool:
            name = f"new-{next(counter)}"
            label, _ = await outcome(
                client.stub.CreateUser(
                    auth_pb2.CreateUserRequest(username=name, password=PASSWORD, scopes=["docs:read"]),
                    metadata=admin,
                    timeout=10,
                )
            )
            load.saw("CreateUser", label, set())
            if label == OK:
                load.users.append(name)
            return True

        async def revoke() -> bool:
            if not pool:
                return False
            pair = pool[-1]
            label, _ = await outcome(
                client.stub.RevokeToken(
                    auth_pb2.RevokeTokenRequest(token=pair.access_token), metadata=admin, timeout=10
                )
            )
            load.saw("RevokeToken", label, set())
            if label == OK:
                load.revoked.append(pool.pop().access_token)
            return True

        async def revoke_user() -> bool:
            if not victims:
                return False
            subject, pair = victims[-1]
            label, _ = await outcome(
                client.stub.RevokeUser(
                    auth_pb2.RevokeUserRequest(subject=subject), metadata=admin, timeout=10
                )
            )
            load.saw("RevokeUser", label, set())
            if label == OK:
                victims.pop()
                load.users_revoked.append(pair.access_token)
            return True

        async def rotate() -> bool:
            if len(load.kids) >= ROTATIONS:
                return False
            label, reply = await outcome(
                client.stub.RotateSigningKey(auth_pb2.RotateSigningKeyRequest(), metadata=admin, timeout=10)
            )
            load.saw("RotateSigningKey", label, set())
            if label == OK:
                load.kids.append(reply.kid)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)  # a few rotations, spread over the run
            return True

        async def probe() -> bool:
            label, reply = await outcome(
                client.stub.Introspect(
                    auth_pb2.IntrospectRequest(token=steady.access_token), metadata=service, timeout=10
                )
            )
            load.saw("Introspect", label if label != OK or reply.active else "CALLED_INACTIVE", set())
            label, reply = await outcome(
                client.stub.Introspect(
                    auth_pb2.IntrospectRequest(token=already_revoked.access_token),
                    metadata=service,
                    timeout=10,
                )
            )
            load.saw("Introspect", label if label != OK or not reply.active else "CALLED_ACTIVE", set())
            label, _ = await outcome(
                client.stub.Login(auth_pb2.LoginRequest(username="steady", password=PASSWORD))
            )
            load.saw("Login", label, set())
            return True

        workers = [
            asyncio.create_task(until(stop, step)) for step in (create, revoke, revoke_user, rotate, probe)
        ]
        try:

            def progressed(down: bool) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    calls = ("CreateUser", "Introspect", "Login")
                    if down:
                        return all(
                            load.count(call, "STORE_UNAVAILABLE", down=True) >= DURING for call in calls
                        )
                    return all(load.count(call, down=False) >= BEFORE for call in calls) and bool(
                        load.revoked
                    )

                return check

            await eventually(progressed(False), within=DEADLINE, what="load before the outage")
            load.down = True
            if how == "kill":
                own_redis.kill()
            else:
                await own_redis.stop()
            await eventually(progressed(True), within=DEADLINE, what="answers while Redis is down")
            await own_redis.start()
            load.down = False
            acknowledged_before = len(load.users)

            async def resumed() -> bool:
                return len(load.users) >= acknowledged_before + BEFORE

            await eventually(resumed, within=DEADLINE, what="the service to resume without a restart")
        finally:
            stop.set()
            await asyncio.gather(*workers)

        assert load.wrong == []
        during = [label for _, label, down in load.answers if down]
        assert during
        assert set(during) <= {OK, *STORE_DOWN}
        assert load.count("CreateUser", "STORE_UNAVAILABLE") >= DURING

        for name in load.users:
            await auth.login(name, PASSWORD)
        for token in load.revoked + load.users_revoked:
            assert not await auth.active(token, service)
        assert await auth.active(steady.access_token, service)
        assert set(load.kids) <= await auth.jwks_kids()
        assert load.kids, "no rotation was acknowledged"
        assert kid_of((await auth.login("steady", PASSWORD)).access_token) in await auth.jwks_kids()
        summary: dict[str, Any] = {
            "users": len(load.users),
            "revoked": len(load.revoked),
            "users_revoked": len(load.users_revoked),
            "kids": len(load.kids),
        }
        assert summary["users"] > BEFORE, summary
