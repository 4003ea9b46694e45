"""Two auth-service processes on one store behind client-side round-robin: one killed under load."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from pathlib import Path

import grpc

from authmesh._shared.auth_client import AuthClient
from authmesh._shared.errors import Unavailable
from authmesh._shared.grpc_targets import balanced_channel_options, balanced_target
from tests.auth_support import SERVICE
from tests.faults import (
    OK,
    Answers,
    Auth,
    auth_at,
    auth_process,
    fetch_metrics,
    jti_of,
    metric_sum,
    revoke_next,
)
from tests.faults.test_redis_restart import until
from tests.waiting import eventually

PASSWORD = "steady-password-1"
DEADLINE = 30.0
BEFORE = 5
AFTER = 20
UNAVAILABLE = {"UNAVAILABLE", "AUTH_UNAVAILABLE"}


async def test_killing_one_of_two_auth_processes_loses_nothing_and_callers_carry_on_through_the_other(
    tmp_path: Path, redis_url: str, nats_url: str
) -> None:
    """Invariant, with one of two auth processes killed (``kill -9``) while revocations are made through
    a round-robin channel over both and a resource-side client introspects and fetches keys through
    ``AUTHMESH_AUTH_TARGET=ip:port,ip:port``:

    - every answer is OK or UNAVAILABLE, never a wrong one;
    - the callers carry on through the survivor: revocations, introspections and key fetches succeed
      again after the kill, with no reconfiguration;
    - every acknowledged revocation is inactive by ``Introspect`` at the survivor.
    """
    processes = [auth_process(tmp_path / f"auth-{index}", redis_url, [nats_url]) for index in range(2)]
    targets = ",".join(process.grpc_address for process in processes)
    load = Answers(frozenset(UNAVAILABLE))
    revoked: list[str] = []
    stop = asyncio.Event()
    async with AsyncExitStack() as stack:
        for process in processes:
            stack.push_async_callback(process.stop)
            await process.start()
        survivor = await stack.enter_async_context(auth_at(processes[1].grpc_address))
        await survivor.create_user("steady", PASSWORD)
        steady = await survivor.login("steady", PASSWORD)
        pool = [await survivor.login("steady", PASSWORD) for _ in range(200)]
        admin = await survivor.admin()
        balanced = await stack.enter_async_context(
            grpc.aio.insecure_channel(balanced_target(targets), options=balanced_channel_options())
        )
        callers = Auth(balanced)
        resource_side = await stack.enter_async_context(AuthClient(targets, service_account=SERVICE))

        async def revoke() -> bool:
            if not pool:
                return False
            token = await revoke_next(callers.stub, pool, admin, load)
            if token is not None:
                revoked.append(token)
            return True

        async def introspect() -> bool:
            try:
                answer = await resource_side.introspect(steady.access_token)
                await resource_side.get_jwks()
            except Unavailable as error:
                load.saw("Introspect", error.code)
                return True
            load.saw("Introspect", OK if answer.active else "CALLED_INACTIVE")
            return True

        workers = [asyncio.create_task(until(stop, step)) for step in (revoke, introspect, introspect)]
        try:

            async def warmed_up() -> bool:
                return all(load.oks_after(call, 0) >= BEFORE for call in ("RevokeToken", "Introspect"))

            await eventually(warmed_up, within=DEADLINE, what="load through both processes")
            for method in ("RevokeToken", "Introspect"):
                served = [
                    metric_sum(
                        await fetch_metrics(process.http_address),
                        "grpc_server_handled_total",
                        {"grpc_method": method},
                    )
                    for process in processes
                ]
                assert min(served) > 0, f"round-robin sent no {method} to one process: {served}"
            killed_at = time.monotonic()
            processes[0].kill()

            async def carried_on() -> bool:
                return all(load.oks_after(call, killed_at) >= AFTER for call in ("RevokeToken", "Introspect"))

            await eventually(carried_on, within=DEADLINE, what="the callers to carry on through the survivor")
        finally:
            stop.set()
            await asyncio.gather(*workers)

        assert load.wrong == []
        service = await survivor.service()
        still_active = [jti_of(token) for token in revoked if await survivor.active(token, service)]
        assert still_active == []
        assert await survivor.active(steady.access_token, service)
        failed = len(load.failures_after(killed_at))
        print(f"auth process killed: {failed} calls failed over, {len(revoked)} revocations acknowledged")
