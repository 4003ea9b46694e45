"""``authmesh bench memory``: what one revoked token costs a replica in memory, at a million of them.

Contender: :class:`authmesh._shared.denylist.Denylist` holding ``entries`` revoked tokens (``revoke_token(jti,
exp)``, exactly what applying a ``revoked.token`` event does). Baseline: a plain ``dict`` of jti (the
36-character string) → exp (an int), the obvious way to write a denylist in Python.

Each figure comes from a fresh worker process (``python -m authmesh.bench.memory --worker``) that builds
one structure and reports the memory it kept, two ways:

* **tracemalloc**: bytes still allocated once the structure is built and garbage collected, divided by
  the entries (exact, independent of the allocator; the goal is judged on this one);
* **RSS**: growth of the process's resident set (what the operating system sees, allocator slack
  included), measured in another fresh process without tracemalloc.

Inputs are generated inside the measured region, as events would deliver them: each jti is a new
36-character string shaped like a UUIDv7 (74 pseudo-random bits from a counter hash, cheaper to make than
a real UUIDv7 so that tracemalloc's per-allocation cost stays bearable), each ``exp`` a new int spread
over one access-token lifetime. The denylist runs on a fixed clock, so nothing expires while it fills.
Goal: at most 80 bytes per entry.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
import timeit
import tracemalloc
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rich.table import Table

from authmesh._shared.claims import AccessClaims
from authmesh._shared.denylist import Denylist
from authmesh._shared.errors import TokenRevoked
from authmesh._shared.settings import CommonSettings
from authmesh.bench.common import (
    Goal,
    JsonDict,
    Worker,
    add_goal_rows,
    bar_chart,
    environment,
    judge,
    measure_and_report,
    serve_worker,
)

GOAL_BYTES_PER_ENTRY = 80.0
ENTRIES = 1_000_000
STRUCTURES = ("denylist", "dict")
METHODS = ("tracemalloc", "rss")
# A worker building a million entries under tracemalloc takes a while on a slow machine.
MEASURE_TIMEOUT_SECONDS = 600.0
_LOOKUPS = 20_000
_MULTIPLIER = 0x9E3779B97F4A7C15  # odd, so i → i * M mod 2**74 is a bijection: every jti differs
_RANDOM_BITS = (1 << 74) - 1
GOALS = (
    Goal("denylist_bytes_per_entry", "denylist bytes per revoked token", GOAL_BYTES_PER_ENTRY, False, "B"),
)


def uuid7_shaped(index: int, unix_ms: int) -> str:
    """A UUIDv7-shaped jti whose 74 random bits come from ``index`` (distinct for distinct indexes)."""
    bits = (index * _MULTIPLIER) & _RANDOM_BITS
    return "%08x-%04x-7%03x-%04x-%012x" % (  # noqa: UP031  # the fastest way to build it, timed
        (unix_ms >> 16) & 0xFFFFFFFF,
        unix_ms & 0xFFFF,
        (bits >> 62) & 0xFFF,
        0x8000 | ((bits >> 48) & 0x3FFF),
        bits & 0xFFFFFFFFFFFF,
    )


def _rss_bytes() -> int | None:
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _claims(jti: str, now: int) -> AccessClaims:
    return AccessClaims(
        iss="authmesh",
        sub="user",
        aud=("authmesh-resources",),
        exp=now + 300,
        iat=now,
        nbf=now,
        jti=jti,
        sid="session",
        scopes=("docs:read",),
        client_id="bench",
        kid="key",
    )


Lookup = Callable[[str], Callable[[], bool]]
"""Given a jti, a ready-made call that says whether it is revoked (what a request would run)."""


def build(structure: str, entries: int, lifetime: int, leeway: float, now: int) -> tuple[Any, Lookup]:
    """Build one structure of ``entries`` revoked tokens; return it and its lookup."""
    unix_ms = now * 1000
    if structure == "denylist":
        denylist = Denylist(access_token_ttl=lifetime, leeway=leeway, clock=lambda: float(now))
        for index in range(entries):
            denylist.revoke_token(uuid7_shaped(index, unix_ms), now + 1 + index % lifetime)

        def denylist_lookup(jti: str) -> Callable[[], bool]:
            claims = _claims(jti, now)  # built once: verification makes them, not the denylist

            def revoked() -> bool:
                try:
                    denylist.check(claims)
                except TokenRevoked:
                    return True
                return False

            return revoked

        return denylist, denylist_lookup
    if structure == "dict":
        table: dict[str, int] = {}
        for index in range(entries):
            table[uuid7_shaped(index, unix_ms)] = now + 1 + index % lifetime
        return table, lambda jti: lambda: jti in table
    raise ValueError(f"unknown structure {structure!r}")


async def _measure_in_worker(command: JsonDict) -> JsonDict:
    """Worker side: build one structure and report what it kept."""
    structure, method = str(command["structure"]), str(command["method"])
    entries, lifetime, leeway = int(command["entries"]), int(command["lifetime"]), float(command["leeway"])
    now = int(time.time())
    gc.collect()
    if method == "tracemalloc":
        tracemalloc.start()
        before: int | None = tracemalloc.get_traced_memory()[0]
    elif method == "rss":
        before = _rss_bytes()
    else:
        raise ValueError(f"unknown method {method!r}")
    started = time.perf_counter()
    built, lookup = build(structure, entries, lifetime, leeway, now)
    seconds = time.perf_counter() - started
    gc.collect()
    if method == "tracemalloc":
        after: int | None = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
    else:
        after = _rss_bytes()
    held = len(built)
    # A lookup of a token that is not there: the per-request cost (after tracing stopped).
    absent = lookup(uuid7_shaped(entries + 1, now * 1000))
    if absent() or not lookup(uuid7_shaped(0, now * 1000))():
        raise RuntimeError(f"{structure} answers membership wrongly")
    lookup_ns = min(timeit.repeat(absent, number=_LOOKUPS, repeat=3)) / _LOOKUPS * 1e9
    return {
        "structure": structure,
        "method": method,
        "entries": entries,
        "held": held,
        "bytes_per_entry": None if before is None or after is None else (after - before) / entries,
        "build_seconds": seconds,
        "lookup_ns": lookup_ns,
    }


def worker_main() -> None:
    """The measuring process's entry point (``python -m authmesh.bench.memory --worker``)."""
    serve_worker({"measure": _measure_in_worker})


async def measure(
    *,
    entries: int = ENTRIES,
    methods: tuple[str, ...] = METHODS,
    progress: Callable[[str], None] = lambda _: None,
) -> JsonDict:
    """Run the benchmark: each structure, each method, in a fresh process.

    Args:
        entries: Revoked tokens each structure holds.
        methods: ``tracemalloc`` and/or ``rss``.
        progress: Told what is being measured.

    Returns:
        A JSON-ready result (see ``docs/benchmarks.md``).
    """
    if entries < 1 or not methods or set(methods) - set(METHODS):
        raise ValueError("entries must be positive; methods tracemalloc and/or rss")
    settings = CommonSettings()
    figures: dict[str, dict[str, JsonDict]] = {structure: {} for structure in STRUCTURES}
    for method in methods:
        for structure in STRUCTURES:
            progress(f"{structure}, {entries:,} entries, {method}")
            async with Worker("authmesh.bench.memory", f"{structure} {method}") as worker:
                figures[structure][method] = await worker.request(
                    {
                        "op": "measure",
                        "structure": structure,
                        "method": method,
                        "entries": entries,
                        "lifetime": settings.access_token_ttl,
                        "leeway": settings.leeway,
                    },
                    timeout=MEASURE_TIMEOUT_SECONDS,
                )
    judged_by = "tracemalloc" if "tracemalloc" in methods else methods[0]
    value = figures["denylist"][judged_by]["bytes_per_entry"]
    baseline = figures["dict"][judged_by]["bytes_per_entry"]
    return {
        "benchmark": "memory",
        "environment": environment(),
        "config": {
            "entries": entries,
            "methods": list(methods),
            "judged_by": judged_by,
            "access_token_ttl_s": settings.access_token_ttl,
            "leeway_s": settings.leeway,
        },
        "figures": figures,
        "denylist_over_dict": value / baseline if value is not None and baseline else None,
        **judge(GOALS, {"denylist_bytes_per_entry": value}),
    }


def run(**options: Any) -> JsonDict:
    """:func:`measure` from synchronous code."""
    return asyncio.run(measure(**options))


_LABELS = {
    "denylist": "authmesh Denylist (60-bit int keys, expiry generations)",
    "dict": "dict jti → exp (baseline)",
}


def render(result: Mapping[str, Any]) -> Table:
    """The result of :func:`run` as a table."""
    config = result["config"]
    table = Table(title=f"memory per revoked token, {config['entries']:,} revoked tokens")
    table.add_column("structure")
    for method in config["methods"]:
        table.add_column(f"bytes/entry ({method})", justify="right")
    table.add_column("entries held", justify="right")
    table.add_column("lookup ns, token not revoked", justify="right")
    for structure in STRUCTURES:
        figures = result["figures"][structure]
        first = figures[config["methods"][0]]
        cells = [
            "n/a"
            if figures[method]["bytes_per_entry"] is None
            else f"{figures[method]['bytes_per_entry']:.1f}"
            for method in config["methods"]
        ]
        table.add_row(_LABELS[structure], *cells, f"{first['held']:,}", f"{first['lookup_ns']:,.0f}")
    if result.get("denylist_over_dict") is not None:
        table.add_row("denylist / dict", f"{result['denylist_over_dict']:.2f}×")
    add_goal_rows(table, result, len(config["methods"]) + 1)
    return table


def draw(result: Mapping[str, Any], directory: Path) -> list[Path]:
    """A chart of :func:`run`'s result: bytes per entry by method."""
    methods = result["config"]["methods"]
    chart = bar_chart(
        directory / "memory.png",
        title=f"bytes per revoked token at {result['config']['entries']:,} entries",
        groups=list(methods),
        series={
            _LABELS[structure]: [
                result["figures"][structure][method]["bytes_per_entry"] or float("nan") for method in methods
            ]
            for structure in STRUCTURES
        },
        ylabel="bytes per entry",
        goal=GOAL_BYTES_PER_ENTRY,
        goal_label="goal (denylist)",
    )
    return [chart]


def main(json_path: Path | None, plot_dir: Path | None, *, entries: int) -> int:
    """Run the benchmark, print the table, write JSON and charts if asked.

    Returns:
        The exit status: 0 when the goal is met, 1 otherwise.
    """
    return measure_and_report(
        "memory",
        "measuring denylist memory…",
        lambda progress: run(entries=entries, progress=progress),
        render,
        draw,
        json_path,
        plot_dir,
    )


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    worker_main()
