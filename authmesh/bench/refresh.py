"""``authmesh bench refresh``: ``Login`` and ``Refresh`` throughput and latency on the auth service.

The auth service runs as its own process in a :class:`~authmesh.stack.LocalStack` (with its NATS and
Redis, no replicas); the load generator of :mod:`authmesh.bench.rpc` runs in another process.

* **Refresh** against the baseline, the same server's ``grpc.health.v1`` ``Check``: the two alternate
  slice by slice as in ``bench rpc``; each concurrent caller follows its own session's chain of refresh
  tokens (every call spends one and receives the next: a Redis Lua script and an ES256 signature).
  Goal: at every concurrency, at least 0.6 times the health check's throughput.
* **The floor** beside it (:mod:`authmesh.bench.refresh_floor`): a server set up as the auth service,
  whose one method makes only a rotation's durable writes and returns a token pair's bytes, against its
  own health check. No Refresh can do better than the floor's ratio; the gap between the two is the
  auth service's own handler.
* **Login** is reported on its own: it runs Argon2id on purpose (the cost is in the result), so it is
  hundreds of times slower than anything else and is timed in one longer window per concurrency, once
  every caller has had its first answer. Each caller logs in as its own user, so the per-user limit on
  login attempts never counts one caller against another.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from authmesh._shared.settings import AuthSettings
from authmesh._shared.tls import grpc_channel_credentials
from authmesh.bench.common import (
    Goal,
    JsonDict,
    Worker,
    add_goal_rows,
    bar_chart,
    environment,
    judge,
    measure_and_report,
    ratio,
)
from authmesh.bench.rpc import (
    CONCURRENCY,
    alternate,
    level_rows,
    paired_ratio,
    pin_apart,
    rate_table,
    tls_command,
)
from authmesh.client import AuthApi, Tokens
from authmesh.stack import LocalStack

GOAL_REFRESH_OVER_HEALTH = 0.6
USER_PREFIX = "bench-login-"
USER_SCOPES = ("docs:read",)
# The auth service hashes at most a few passwords at once; more in flight only queue.
_SETUP_CONCURRENCY = 8
# The floor server listens where the system puts it.
_ANY_PORT = "127.0.0.1:0"
GOALS = (
    Goal(
        "refresh_over_health",
        "Refresh / health throughput, lowest level",
        GOAL_REFRESH_OVER_HEALTH,
        True,
        "ratio",
    ),
)


def argon2_cost() -> JsonDict:
    """The Argon2id parameters a local stack's auth service uses (its settings, from this environment)."""
    settings = AuthSettings()
    return {
        "time_cost": settings.argon2_time_cost,
        "memory_kib": settings.argon2_memory_kib,
        "parallelism": settings.argon2_parallelism,
    }


async def prepare_users(stack: LocalStack, count: int) -> tuple[list[tuple[str, str]], list[str]]:
    """``count`` users, and one fresh session's refresh token for each.

    Returns:
        ``(username, password)`` pairs and the refresh tokens, in the same order.
    """
    users = [(f"{USER_PREFIX}{index}", f"bench-password-{index}-x") for index in range(count)]
    credentials = grpc_channel_credentials(stack.client_tls)
    async with AuthApi(stack.auth_grpc, timeout=120, credentials=credentials) as auth:
        admin = await auth.admin_login(*stack.admin_credentials)
        slots = asyncio.Semaphore(_SETUP_CONCURRENCY)

        async def create(name: str, password: str) -> None:
            async with slots:
                await auth.create_user(admin.access_token, name, password, USER_SCOPES)

        async def login(name: str, password: str) -> Tokens:
            async with slots:
                return await auth.login(name, password)

        await asyncio.gather(*(create(name, password) for name, password in users))
        sessions = await asyncio.gather(*(login(name, password) for name, password in users))
    return users, [session.refresh_token for session in sessions]


async def measure(
    *,
    concurrency: Sequence[int] = CONCURRENCY,
    slices: int = 24,
    slice_s: float = 0.25,
    login_s: float = 4.0,
    pin_cpus: bool = False,
    progress: Callable[[str], None] = lambda _: None,
    tls: bool = False,
    floor: bool = True,
) -> JsonDict:
    """Run the benchmark on a fresh local stack (no replicas).

    Args:
        concurrency: Calls in flight, one level after another.
        slices: Timed slices per kind (Refresh and health alternate) and level.
        slice_s: Seconds each timed slice lasts.
        login_s: Seconds of the one timed Login window per level (0 skips Login).
        pin_cpus: Pin the auth service and the load generator to different CPUs where there are two.
        progress: Told what is being measured.
        tls: Run the stack and every call on TLS (``authmesh up --tls``).
        floor: Also time the floor (:mod:`authmesh.bench.refresh_floor`) against its own health check.

    Returns:
        A JSON-ready result (see ``docs/benchmarks.md``).
    """
    if slices < 1 or slice_s <= 0 or login_s < 0 or not concurrency or min(concurrency) < 1:
        raise ValueError("slices, slice_s and the concurrency levels must be positive")
    progress("starting a local stack without replicas")
    async with contextlib.AsyncExitStack() as running:
        stack = await running.enter_async_context(LocalStack(replicas=0, tls=tls))
        load = await running.enter_async_context(Worker("authmesh.bench.rpc", "load generator"))
        server_pid = stack.pids().get("auth")
        pinned = await pin_apart(server_pid, load.pid) if pin_cpus and server_pid is not None else None
        routes: dict[str, JsonDict] = {}
        if floor:
            progress("starting the floor server (a rotation's writes and a token pair's bytes)")
            floor_server = await running.enter_async_context(
                Worker(
                    "authmesh.bench.refresh_floor", "floor server", env=stack.auth_env(_ANY_PORT, _ANY_PORT)
                )
            )
            started = await floor_server.request({"op": "start"})
            running.push_async_callback(floor_server.request, {"op": "stop"})
            if pin_cpus:
                await pin_apart(int(started["pid"]), load.pid)
            routes = {
                kind: {"kind": call, "target": started["target"], "server_pid": started["pid"]}
                for kind, call in (("floor_health", "health"), ("floor", "refresh_floor"))
            }
        progress(f"creating {max(concurrency)} users and sessions (Argon2id)")
        users, refresh_tokens = await prepare_users(stack, max(concurrency))
        await load.request(
            {"op": "setup", "users": users, "refresh_tokens": refresh_tokens, **tls_command(stack.client_tls)}
        )
        levels = []
        for level in concurrency:
            progress(f"Refresh and health, {level} in flight")
            figures = await alternate(
                load,
                kinds=("health", "refresh", *routes),
                target=stack.auth_grpc,
                concurrency=level,
                slices=slices,
                slice_s=slice_s,
                server_pid=server_pid,
                routes=routes,
            )
            entry: JsonDict = {
                "concurrency": level,
                **figures,
                "refresh_over_health": paired_ratio(figures["refresh"], figures["health"]),
            }
            if routes:
                entry["floor_over_health"] = paired_ratio(figures["floor"], figures["floor_health"])
            if login_s > 0:
                progress(f"Login, {level} in flight")
                login = await alternate(
                    load,
                    kinds=("login",),
                    target=stack.auth_grpc,
                    concurrency=level,
                    slices=1,
                    slice_s=login_s,
                    server_pid=server_pid,
                )
                entry["login"] = login["login"]
                entry["login_over_health"] = ratio(
                    login["login"]["per_second"], figures["health"]["per_second"]
                )
            levels.append(entry)
    lowest = min(float(level["refresh_over_health"]) for level in levels)
    return {
        "benchmark": "refresh",
        "environment": environment(),
        "config": {
            "concurrency": list(concurrency),
            "slices": slices,
            "slice_s": slice_s,
            "login_s": login_s,
            "argon2": argon2_cost(),
            "pinned": pinned,
            "tls": tls,
            "floor": floor,
        },
        "levels": levels,
        **judge(GOALS, {"refresh_over_health": lowest}),
    }


def run(**options: Any) -> JsonDict:
    """:func:`measure` from synchronous code."""
    return asyncio.run(measure(**options))


_LABELS = {
    "health": "health Check (baseline)",
    "refresh": "Refresh (rotation + ES256)",
    "login": "Login (Argon2id)",
    "floor_health": "floor server: health Check",
    "floor": "floor: fsynced writes + a pair's bytes",
}


def render(result: Mapping[str, Any]) -> Table:
    """The result of :func:`run` as a table."""
    config = result["config"]
    argon2 = config["argon2"]
    table = rate_table(
        f"auth service: Refresh and Login vs health Check; Argon2id t={argon2['time_cost']}, "
        f"m={argon2['memory_kib']} KiB, p={argon2['parallelism']}" + ("; on TLS" if config.get("tls") else "")
    )
    for level in result["levels"]:
        kinds = [kind for kind in _LABELS if kind in level]
        level_rows(table, level, kinds, _LABELS)
        table.add_row("", "Refresh / health", f"{level['refresh_over_health']:.2f}×", "", "", "", "")
        if "floor_over_health" in level:
            ratio_text = f"{level['floor_over_health']:.2f}×"
            table.add_row("", "floor / its health (Refresh's best)", ratio_text, "", "", "", "")
        if "login" in level:
            table.add_row("", "Login / health", f"{level['login_over_health']:.4f}×", "", "", "", "")
        table.add_section()
    add_goal_rows(table, result, 5)
    return table


def draw(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """Charts of :func:`run`'s result: throughput by concurrency (log scale: Login is far below)."""
    levels = result["levels"]
    kinds = [kind for kind in _LABELS if all(kind in level for level in levels)]
    chart = bar_chart(
        directory / "refresh-throughput.png",
        title="auth service: Refresh and Login vs health Check",
        groups=[f"{level['concurrency']} in flight" for level in levels],
        series={_LABELS[kind]: [level[kind]["per_second"] for level in levels] for kind in kinds},
        ylabel="calls per second (log)",
        log=True,
    )
    return [chart]


def main(
    json_path: Path | None,
    plot_dir: Path | None,
    *,
    slices: int,
    slice_s: float,
    login_s: float,
    concurrency: Sequence[int] = CONCURRENCY,
    pin_cpus: bool = False,
    tls: bool = False,
    floor: bool = True,
) -> int:
    """Run the benchmark, print the table, write JSON and charts if asked.

    Returns:
        The exit status: 0 when the goal is met, 1 otherwise.
    """
    return measure_and_report(
        "refresh",
        "measuring Refresh and Login…",
        lambda progress: run(
            concurrency=concurrency,
            slices=slices,
            slice_s=slice_s,
            login_s=login_s,
            pin_cpus=pin_cpus,
            progress=progress,
            tls=tls,
            floor=floor,
        ),
        render,
        draw,
        json_path,
        plot_dir,
    )
