"""``authmesh bench catchup``: how long a fresh replica takes from process start to serving.

A :class:`~authmesh.stack.LocalStack` without replicas (NATS, Redis, the auth service) is filled with
token revocations, then fresh ``authmesh resource-server`` processes are started one at a time and each
is timed from the moment it is spawned until its gRPC health says ``SERVING`` (it serves nothing before
its revocation state has caught up with the stream). Health is asked every few milliseconds over one
channel; the first answer of any kind (the server listens, still ``NOT_SERVING``) is timed too, which
splits interpreter start and imports from the catch-up itself.

Two ways to catch up, each timed with 10k and then 100k revocation events in ``AUTH_EVENTS``:

* **snapshot**: the replica has the service account, loads ``SnapshotRevocations`` (one streaming RPC)
  and consumes only the events after the sequence the snapshot reflects;
* **stream**: without the account, it replays the stream from one token lifetime ago and verifies every
  event's ES256 signature (about 100 µs each in Python).

The revocations are seeded directly with what the auth service would write for each ``RevokeToken``:
the same Redis keys (``revoked_jti:{jti}`` and the ``revoked_jtis`` index the snapshot reads) and the same
signed event on ``AUTH_EVENTS``, signed with the auth service's active key (unsealed from Redis with the
stack's key-encryption secret). 100k calls through the auth service would take minutes here; the replica
cannot tell the difference. Goal: with 100k events, at most 2 s to serving (the snapshot path).
"""

# The health watch owns its deadline (it is the probe a started replica is polled with).
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import nats
import redis.asyncio as redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.table import Table

from authmesh._auth_service.keyring import Keyring, KeySealer
from authmesh._auth_service.store import REVOKED_JTIS, AuthStore, revoked_jti_key
from authmesh._shared.claims import new_uuid7
from authmesh._shared.events import SecurityEvent, TokenRevokedEvent, encode_event
from authmesh._shared.nats_wiring import inbox_prefix
from authmesh._shared.settings import AuthSettings
from authmesh.bench.common import (
    Goal,
    JsonDict,
    add_goal_rows,
    bar_chart,
    environment,
    judge,
    measure_and_report,
)
from authmesh.processes import LOOPBACK, free_ports
from authmesh.stack import READER_NATS_USER, ChildProcess, LocalStack, authmesh_command

GOAL_SECONDS_AT_100K = 2.0
EVENT_COUNTS = (10_000, 100_000)
PATHS = ("snapshot", "stream")
# A replica replaying 100k events verifies 100k signatures: tens of seconds on a slow machine.
START_TIMEOUT_SECONDS = 180.0
STOP_TIMEOUT_SECONDS = 10.0
# How often health is asked while a replica starts.
POLL_SECONDS = 0.005
HEALTH_CALL_SECONDS = 0.5
# Seeding: events signed per batch, and publishes awaiting their acknowledgement at once.
_SEED_BATCH = 2000
_PUBLISH_WINDOW = 500
GOALS = (
    Goal(
        "seconds_at_100k",
        "100k events: process start → SERVING (snapshot path)",
        GOAL_SECONDS_AT_100K,
        False,
        "s",
    ),
)


class _Seeder:
    """Writes token revocations the way the auth service does, in bulk."""

    def __init__(self, stack: LocalStack, settings: AuthSettings) -> None:
        self._stack = stack
        self._settings = settings
        self.written = 0

    async def add(self, count: int, progress: Callable[[str], None]) -> None:
        """Write ``count`` more revocations to Redis and ``AUTH_EVENTS``."""
        stack, settings = self._stack, self._settings
        assert stack.secrets is not None  # the stack is started
        client = redis.from_url(stack.redis_url)
        nats_client = await nats.connect(
            servers=stack.nats_urls,
            user=stack.secrets.nats_auth.username,
            password=stack.secrets.nats_auth.password,
            inbox_prefix=inbox_prefix(stack.secrets.nats_auth.username),
            connect_timeout=5,
            max_reconnect_attempts=0,
        )
        try:
            store = AuthStore(client, access_ttl=settings.access_token_ttl, leeway=settings.leeway)
            keyring = Keyring(
                store,
                KeySealer(stack.secrets.key_encryption_key.encode()),
                int((settings.access_token_ttl + settings.leeway) * 1000),
            )
            await keyring.reload()
            key = keyring.cached_signing_key()
            js = nats_client.jetstream(timeout=10)
            done = 0
            while done < count:
                batch = min(_SEED_BATCH, count - done)
                now_ms = int(time.time() * 1000)
                # The tokens outlive the run: they expire one lifetime from now, like fresh ones.
                exp = now_ms // 1000 + settings.access_token_ttl
                jtis = [new_uuid7(now_ms) for _ in range(batch)]
                events = [
                    SecurityEvent.new(
                        TokenRevokedEvent(jti=jti, exp=exp), settings.issuer, "bench-seed", now_ms
                    )
                    for jti in jtis
                ]
                keep_ms = int((settings.leeway + settings.access_token_ttl) * 1000) + 60_000
                async with client.pipeline(transaction=False) as pipe:
                    for jti, event in zip(jtis, events, strict=True):
                        pipe.set(revoked_jti_key(jti), f"{now_ms} {event.event_id}", px=keep_ms)
                    pipe.zadd(REVOKED_JTIS, dict.fromkeys(jtis, exp))
                    await pipe.execute()
                for start in range(0, batch, _PUBLISH_WINDOW):
                    await asyncio.gather(
                        *(
                            js.publish(
                                event.type.subject,
                                encode_event(event, key.private_key, key.kid),
                                headers={"Nats-Msg-Id": event.event_id},
                            )
                            for event in events[start : start + _PUBLISH_WINDOW]
                        )
                    )
                done += batch
                self.written += batch
                if done % (_SEED_BATCH * 10) == 0 or done == count:
                    progress(f"seeding revocations: {self.written:,} in the stream")
        finally:
            await nats_client.close()
            await client.aclose()


class _HealthWatch:
    """Asks one target's health every few milliseconds and writes down when it first answered and served."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.first_answer: float | None = None
        self.serving: float | None = None
        # Short reconnect backoff: the server is not listening yet for most of the first second.
        self._channel = grpc.aio.insecure_channel(
            target,
            options=[
                ("grpc.initial_reconnect_backoff_ms", 10),
                ("grpc.min_reconnect_backoff_ms", 10),
                ("grpc.max_reconnect_backoff_ms", 50),
            ],
        )
        self._check = health_pb2_grpc.HealthStub(self._channel).Check

    async def probe(self, timeout: float) -> bool:
        """Whether it serves; keeps asking for up to ``timeout`` seconds before saying no."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                answer = await self._check(health_pb2.HealthCheckRequest(), timeout=HEALTH_CALL_SECONDS)
            except grpc.aio.AioRpcError:
                answer = None
            now = time.monotonic()
            if answer is not None and self.first_answer is None:
                self.first_answer = now
            if answer is not None and answer.status == health_pb2.HealthCheckResponse.SERVING:
                self.serving = now
                return True
            if now >= deadline:
                return False
            await asyncio.sleep(POLL_SECONDS)

    async def aclose(self) -> None:
        await self._channel.close(grace=None)


def replica_env(
    stack: LocalStack, name: str, grpc_address: str, http_address: str, *, snapshot: bool
) -> dict[str, str]:
    """The environment of a replica of ``stack``; ``snapshot`` gives it the service account."""
    assert stack.secrets is not None  # the stack is started
    env = dict(os.environ)
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "AUTHMESH_INSTANCE": name,
            "AUTHMESH_GRPC_LISTEN": grpc_address,
            "AUTHMESH_HTTP_LISTEN": http_address,
            "AUTHMESH_AUTH_TARGET": stack.auth_grpc,
            "AUTHMESH_NATS_URLS": ",".join(stack.nats_urls),
            "AUTHMESH_NATS_USER": stack.secrets.nats_replica(READER_NATS_USER).username,
            "AUTHMESH_NATS_PASSWORD": stack.secrets.nats_replica(READER_NATS_USER).password,
        }
    )
    env.pop("AUTHMESH_SERVICE_ACCOUNT", None)
    if snapshot:
        env["AUTHMESH_SERVICE_ACCOUNT"] = stack.secrets.service_account.joined
    return env


async def time_fresh_replica(stack: LocalStack, *, snapshot: bool, index: int) -> JsonDict:
    """Start one fresh replica, time it to SERVING, stop it.

    Returns:
        ``serving_s`` (spawn → SERVING) and ``listening_s`` (spawn → first health answer).
    """
    grpc_port, http_port = free_ports(2)
    grpc_address, http_address = f"{LOOPBACK}:{grpc_port}", f"{LOOPBACK}:{http_port}"
    name = f"catchup-{'snapshot' if snapshot else 'stream'}-{index}"
    watch = _HealthWatch(grpc_address)
    process = ChildProcess(
        name,
        stack.data_dir / name,
        authmesh_command("resource-server"),
        replica_env(stack, name, grpc_address, http_address, snapshot=snapshot),
        watch.probe,
    )
    try:
        spawned = time.monotonic()
        await process.start(START_TIMEOUT_SECONDS)
        # start() returned, so the probe saw it serve.
        assert watch.serving is not None
        assert watch.first_answer is not None
        return {"serving_s": watch.serving - spawned, "listening_s": watch.first_answer - spawned}
    finally:
        await process.stop(STOP_TIMEOUT_SECONDS)
        await watch.aclose()


async def measure(
    *,
    event_counts: Sequence[int] = EVENT_COUNTS,
    paths: Sequence[str] = PATHS,
    rounds: int = 3,
    stream_rounds: int = 1,
    progress: Callable[[str], None] = lambda _: None,
) -> JsonDict:
    """Run the benchmark.

    Args:
        event_counts: Revocation events in the stream, growing (each level adds to the previous one).
        paths: ``snapshot`` and/or ``stream``.
        rounds: Fresh replicas timed per count on the snapshot path; the report gives the median.
        stream_rounds: The same on the stream-only path (each one verifies every event).
        progress: Told what is being measured.

    Returns:
        A JSON-ready result (see ``docs/benchmarks.md``).
    """
    counts = sorted(set(event_counts))
    unknown = set(paths) - set(PATHS)
    if not counts or counts[0] < 0 or rounds < 1 or stream_rounds < 1 or unknown or not paths:
        raise ValueError("event counts must be 0 or more, rounds positive, paths snapshot and/or stream")
    settings = AuthSettings()
    levels: list[JsonDict] = []
    progress("starting a local stack without replicas")
    async with LocalStack(replicas=0) as stack:
        seeder = _Seeder(stack, settings)
        for count in counts:
            await seeder.add(count - seeder.written, progress)
            level: JsonDict = {"events": count}
            for path in PATHS:
                if path not in paths:
                    continue
                timings = []
                for index in range(rounds if path == "snapshot" else stream_rounds):
                    progress(f"{count:,} events, {path} path: fresh replica {index + 1}")
                    timings.append(await time_fresh_replica(stack, snapshot=path == "snapshot", index=index))
                level[path] = {
                    "serving_s": statistics.median(timing["serving_s"] for timing in timings),
                    "listening_s": statistics.median(timing["listening_s"] for timing in timings),
                    "rounds": timings,
                }
            levels.append(level)
    largest = next((level for level in levels if level["events"] == 100_000), None)
    value = largest["snapshot"]["serving_s"] if largest is not None and "snapshot" in largest else None
    return {
        "benchmark": "catchup",
        "environment": environment(),
        "config": {
            "event_counts": counts,
            "paths": [path for path in PATHS if path in paths],
            "rounds": rounds,
            "stream_rounds": stream_rounds,
            "access_token_ttl_s": settings.access_token_ttl,
        },
        "levels": levels,
        **judge(GOALS, {"seconds_at_100k": value}),
    }


def run(**options: Any) -> JsonDict:
    """:func:`measure` from synchronous code."""
    return asyncio.run(measure(**options))


_PATH_LABELS = {
    "snapshot": "snapshot + tail (SnapshotRevocations)",
    "stream": "stream only (verify every event)",
}


def render(result: Mapping[str, Any]) -> Table:
    """The result of :func:`run` as a table."""
    config = result["config"]
    table = Table(
        title="fresh replica: process start → SERVING "
        f"(median of {config['rounds']} snapshot / {config['stream_rounds']} stream start(s))"
    )
    for column in ("events in stream", "catch-up", "start → listening", "start → SERVING", "catch-up itself"):
        table.add_column(column, justify="left" if column == "catch-up" else "right")
    for level in result["levels"]:
        for path in PATHS:
            figures = level.get(path)
            if figures is None:
                continue
            table.add_row(
                f"{level['events']:,}",
                _PATH_LABELS[path],
                f"{figures['listening_s']:.2f} s",
                f"{figures['serving_s']:.2f} s",
                f"{figures['serving_s'] - figures['listening_s']:.2f} s",
            )
        table.add_section()
    add_goal_rows(table, result, 3)
    return table


def draw(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """A chart of :func:`run`'s result: seconds to SERVING by events in the stream and path."""
    levels = result["levels"]
    series = {
        _PATH_LABELS[path]: [level.get(path, {}).get("serving_s", float("nan")) for level in levels]
        for path in PATHS
        if any(path in level for level in levels)
    }
    chart = bar_chart(
        directory / "catchup.png",
        title="fresh replica: process start → SERVING",
        groups=[f"{level['events']:,} events" for level in levels],
        series=series,
        ylabel="seconds (log)",
        log=True,
        goal=GOAL_SECONDS_AT_100K,
        goal_label="goal at 100k (snapshot)",
    )
    return [chart]


def main(
    json_path: Path | None,
    plot_dir: Path | None,
    *,
    rounds: int,
    stream_rounds: int,
    event_counts: Sequence[int] = EVENT_COUNTS,
    paths: Sequence[str] = PATHS,
) -> int:
    """Run the benchmark, print the table, write JSON and charts if asked.

    Returns:
        The exit status: 0 when the goal is met, 1 otherwise.
    """
    return measure_and_report(
        "catchup",
        "measuring replica catch-up…",
        lambda progress: run(
            event_counts=event_counts,
            paths=paths,
            rounds=rounds,
            stream_rounds=stream_rounds,
            progress=progress,
        ),
        render,
        draw,
        json_path,
        plot_dir,
    )
