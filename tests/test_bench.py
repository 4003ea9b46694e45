"""The benchmarks behind ``authmesh bench``: each runs in a tiny configuration, with a well-formed result.

Nothing here asserts speed: a figure only has to be there, finite where it must be, and consistent with
the rest of the result (goals judged, tables rendered, charts and JSON written).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from authmesh._shared.errors import ConfigurationError
from authmesh.bench import catchup, common, memory, propagation, refresh, replica_ack, rpc
from authmesh.bench.commands import bench_app

LATENCY_KEYS = {"count", "p50", "p99", "max", "mean"}


def rendered(table: Table) -> str:
    """The table as plain text."""
    console = Console(width=200, record=True, color_system=None)
    console.print(table)
    return console.export_text()


def assert_latency(summary: Mapping[str, Any], *, samples: bool = True) -> None:
    assert set(summary) == LATENCY_KEYS
    if samples:
        assert summary["count"] > 0
        assert 0 < summary["p50"] <= summary["p99"] <= summary["max"]


def assert_judged(result: Mapping[str, Any], *goals: str) -> None:
    assert set(result["goals"]) == set(goals)
    for goal in goals:
        assert_goal_judged(result, goal)


def assert_goal_judged(result: Mapping[str, Any], goal: str) -> None:
    assert result["passed"][goal] is common.Goal(
        goal,
        "",
        result["goals"][goal]["target"],
        result["goals"][goal]["higher_is_better"],
        result["goals"][goal]["unit"],
    ).met(result["goals"][goal]["value"])
    assert result["ok"] is all(result["passed"].values())


def assert_charts(paths: list[Path]) -> None:
    assert paths
    for path in paths:
        assert path.read_bytes().startswith(b"\x89PNG")


# --- shared helpers -----------------------------------------------------------------------------------


def test_percentile_interpolates_between_order_statistics() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert common.percentile(values, 0) == 1.0
    assert common.percentile(values, 50) == 2.5
    assert common.percentile(values, 100) == 4.0
    with pytest.raises(ValueError, match="no values"):
        common.percentile([], 50)


def test_latency_summary_of_no_samples_is_all_zero() -> None:
    assert common.Latency.of([]) == common.Latency(0, 0.0, 0.0, 0.0, 0.0)


def test_goal_judges_either_direction_and_refuses_missing_values() -> None:
    at_least = common.Goal("ratio", "a ratio", 0.85, True, "ratio")
    at_most = common.Goal("p99", "a latency", 10.0, False, "ms")
    assert at_least.met(0.9)
    assert not at_least.met(0.8)
    assert at_most.met(9.9)
    assert not at_most.met(10.1)
    assert not at_most.met(None)
    assert not at_least.met(math.nan)
    judged = common.judge([at_least, at_most], {"ratio": 0.9, "p99": 12.0})
    assert judged["passed"] == {"ratio": True, "p99": False}
    assert judged["ok"] is False


def test_json_output_turns_nan_and_infinity_into_null(tmp_path: Path) -> None:
    path = tmp_path / "result.json"
    common.write_json(path, {"a": math.nan, "b": [1.0, math.inf], "c": {"d": 2}})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "c": {"d": 2}}


def test_bar_chart_writes_a_png(tmp_path: Path) -> None:
    path = common.bar_chart(
        tmp_path / "chart.png",
        title="t",
        groups=["a", "b"],
        series={"x": [1.0, 2.0], "y": [3.0, math.nan]},
        ylabel="ms",
        log=True,
        goal=2.0,
    )
    assert_charts([path])


async def test_a_worker_reports_an_unknown_command_as_an_error() -> None:
    async with common.Worker("authmesh.bench.memory", "memory worker") as worker:
        with pytest.raises(ConfigurationError, match="unknown op"):
            await worker.request({"op": "no-such-op"})
        answer = await worker.request({"op": "ping"})
    assert answer == {"pong": True}


# --- the benchmarks -----------------------------------------------------------------------------------


async def test_memory_bench_reports_bytes_per_entry_for_the_denylist_and_the_dict(tmp_path: Path) -> None:
    result = await memory.measure(entries=3000)
    assert result["benchmark"] == "memory"
    for structure in memory.STRUCTURES:
        for method in memory.METHODS:
            figures = result["figures"][structure][method]
            assert figures["held"] == 3000
            assert figures["lookup_ns"] > 0
        # Resident memory moves by whole pages and arenas: only the traced figure is exact at this size.
        assert result["figures"][structure]["tracemalloc"]["bytes_per_entry"] > 0
        assert result["figures"][structure]["rss"]["bytes_per_entry"] is not None
    assert result["denylist_over_dict"] > 0
    assert_judged(result, "denylist_bytes_per_entry")
    assert "denylist bytes per revoked token" in rendered(memory.render(result))
    assert_charts(memory.draw(result, tmp_path))


def test_uuid7_shaped_jtis_are_distinct_and_shaped_like_uuid7() -> None:
    jtis = {memory.uuid7_shaped(index, 1_700_000_000_000) for index in range(1000)}
    assert len(jtis) == 1000
    for jti in jtis:
        assert len(jti) == 36
        assert jti[14] == "7"
        assert jti[8] == jti[13] == jti[18] == jti[23] == "-"


@pytest.mark.slow
async def test_rpc_bench_times_protected_calls_beside_open_ones_on_every_kind_of_server(
    tmp_path: Path,
) -> None:
    result = await rpc.measure(concurrency=(1, 3), slices=2, slice_s=0.1)
    assert result["benchmark"] == "rpc"
    assert [level["concurrency"] for level in result["levels"]] == [1, 3]
    for level in result["levels"]:
        for kind in ("health", "whoami", "whoami_dpop"):
            figures = level[kind]
            assert figures["per_second"] > 0
            assert len(figures["slices_per_second"]) == 2
            assert figures["errors"] == {}
            assert_latency(figures["latency"])
        assert level["whoami_over_health"] > 0
        assert level["dpop_over_whoami"] > 0
    for name, (kinds, ratio_name) in rpc.PROTECTED_SERVERS.items():
        assert [level["concurrency"] for level in result["servers"][name]] == [1, 3]
        for level in result["servers"][name]:
            for kind in kinds:
                assert level[kind]["per_second"] > 0
                assert level[kind]["errors"] == {}
            assert level[ratio_name] > 0
    ratios = {"whoami_over_health", "dpop_cpu_over_bearer"} | {
        ratio_name for _, ratio_name in rpc.PROTECTED_SERVERS.values()
    }
    assert_judged(result, *ratios)
    text = rendered(rpc.render(result))
    assert "WhoAmI / health" in text
    assert "DPoP / bearer" in text
    assert "FastAPI: GET /whoami" in text
    assert_charts(rpc.draw(result, tmp_path))


@pytest.mark.slow
async def test_refresh_bench_times_refresh_login_and_the_floor_beside_health(tmp_path: Path) -> None:
    result = await refresh.measure(concurrency=(1, 2), slices=2, slice_s=0.1, login_s=1.0)
    assert result["benchmark"] == "refresh"
    assert set(result["config"]["argon2"]) == {"time_cost", "memory_kib", "parallelism"}
    for level in result["levels"]:
        for kind in ("health", "refresh", "login", "floor_health", "floor"):
            assert level[kind]["errors"] == {}
            assert_latency(level[kind]["latency"])
            assert level[kind]["server_cpu_us"] > 0
        assert level["refresh_over_health"] > 0
        assert level["login_over_health"] > 0
        assert level["floor_over_health"] > 0
    assert_judged(result, "refresh_over_health")
    text = rendered(refresh.render(result))
    assert "Argon2id" in text
    assert "floor / its health" in text
    assert_charts(refresh.draw(result, tmp_path))


@pytest.mark.slow
@pytest.mark.redis_tls
async def test_refresh_bench_on_tls_calls_over_tls_without_errors() -> None:
    result = await refresh.measure(concurrency=(2,), slices=1, slice_s=0.1, login_s=0, tls=True)
    assert result["config"]["tls"] is True
    (level,) = result["levels"]
    for kind in ("health", "refresh", "floor_health", "floor"):
        assert level[kind]["errors"] == {}
        assert level[kind]["per_second"] > 0
    assert "on TLS" in rendered(refresh.render(result))


@pytest.mark.slow
async def test_refresh_bench_without_the_floor_starts_no_floor_server() -> None:
    result = await refresh.measure(concurrency=(1,), slices=1, slice_s=0.1, login_s=0, floor=False)
    (level,) = result["levels"]
    assert "floor" not in level
    assert "floor_over_health" not in level
    assert "floor" not in rendered(refresh.render(result))


@pytest.mark.slow
@pytest.mark.parametrize(
    "tls",
    # Redis on TLS needs a redis-server built with TLS (the embedded valkey-server has none).
    [False, pytest.param(True, marks=pytest.mark.redis_tls)],
    ids=["plaintext", "tls"],
)
async def test_replica_ack_bench_times_each_rpc_with_and_without_wait(tmp_path: Path, tls: bool) -> None:
    result = await replica_ack.measure(concurrency=(1, 2), slices=2, slice_s=0.1, floor_calls=5, tls=tls)
    assert result["benchmark"] == "replica_ack"
    assert result["config"]["tls"] is tls
    assert result["config"]["min_replicas_acked"] == {"no_wait": 0, "wait": 1}
    assert [level["concurrency"] for level in result["levels"]] == [1, 2]
    for level in result["levels"]:
        for rpc_name in replica_ack.RPCS:
            for service in replica_ack.SERVICES:
                figures = level[f"{rpc_name}_{service}"]
                assert figures["per_second"] > 0
                assert len(figures["slices_per_second"]) == 2
                assert figures["errors"] == {}
                assert_latency(figures["latency"])
            compared = level["wait_over_no_wait"][rpc_name]
            assert compared["throughput"] > 0
            assert compared["p50"] > 0
            assert compared["p99"] > 0
            assert math.isfinite(compared["p50_added_ms"])
    # Only the WAIT service waits; calls in flight together share one WAIT per batch of scripts.
    assert result["wait_commands"] >= 1
    assert len(result["config"]["tokens_minted"]) == 2
    assert 0 <= result["config"]["tokens_left"] < sum(result["config"]["tokens_minted"])
    floor = result["redis_floor"]
    for service in replica_ack.SERVICES:
        assert_latency(floor[service]["latency"])
        assert floor[service]["latency"]["count"] == 2 * 5
    assert math.isfinite(floor["p50_added_ms"])
    assert result["ok"] is True
    text = rendered(replica_ack.render(result))
    assert "floor: WAIT adds" in text
    assert "RevokeToken WAIT / no WAIT" in text
    assert "Refresh WAIT / no WAIT" in text
    assert_charts(replica_ack.draw(result, tmp_path))


@pytest.mark.slow
async def test_propagation_bench_times_each_revocation_to_the_last_replica_and_the_floor(
    tmp_path: Path,
) -> None:
    result = await propagation.measure(replica_counts=(1, 2), revocations=4)
    assert result["benchmark"] == "propagation"
    assert [level["replicas"] for level in result["levels"]] == [1, 2]
    for level in result["levels"]:
        assert level["revocations"] == 4
        assert level["missing"] == 0
        assert_latency(level["last_replica"])
        assert_latency(level["rpc"])
        assert level["probes_per_revocation"] >= level["replicas"]
        for mode in ("core", "jetstream"):
            assert level["floor"][mode]["missing"] == 0
            assert_latency(level["floor"][mode]["latency"])
        check = level["unperturbed"]
        assert check["rounds"] == 4
        assert 0 <= check["all_refused_share"] <= 1
        assert check["asked"]["p50"] > 0
        assert set(check["replica_view_within"]) == {"2.5", "5", "10", "25"}
        cpu = level["cpu_ms_per_round"]
        assert set(cpu) == {"auth", "nats", "redis", "replicas", "probers", "driver", "total"}
        assert cpu["total"] == pytest.approx(sum(value for part, value in cpu.items() if part != "total"))
        assert cpu["total"] > 0
        assert all(value >= 0 for value in cpu.values())
        assert level["cpu_floor_ms"] == pytest.approx(cpu["total"] / result["environment"]["cpus"])
    # No level with 10 replicas: the goal cannot be judged, so it is not met.
    assert result["goals"]["p99_ms_at_10"]["value"] is None
    assert result["ok"] is False
    assert "last replica refusing" in rendered(propagation.render(result))
    assert_charts(propagation.draw(result, tmp_path))


@pytest.mark.slow
async def test_catchup_bench_times_fresh_replicas_on_both_paths(tmp_path: Path) -> None:
    result = await catchup.measure(event_counts=(20, 60), rounds=1, stream_rounds=1)
    assert result["benchmark"] == "catchup"
    assert [level["events"] for level in result["levels"]] == [20, 60]
    for level in result["levels"]:
        for path in catchup.PATHS:
            figures = level[path]
            assert 0 < figures["listening_s"] <= figures["serving_s"]
            assert len(figures["rounds"]) == 1
    assert result["goals"]["seconds_at_100k"]["value"] is None
    text = rendered(catchup.render(result))
    assert "snapshot + tail" in text
    assert "stream only" in text
    assert_charts(catchup.draw(result, tmp_path))


def test_bench_memory_command_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    path = tmp_path / "memory.json"
    outcome = CliRunner().invoke(bench_app, ["memory", "--entries", "2000", "--json", str(path)])
    assert outcome.exit_code in (0, 1), outcome.output
    assert "bytes/entry" in outcome.output
    written = json.loads(path.read_text())
    assert written["config"]["entries"] == 2000
    assert outcome.exit_code == (0 if written["ok"] else 1)


def test_bench_catchup_command_refuses_an_unknown_path() -> None:
    outcome = CliRunner().invoke(bench_app, ["catchup", "--path", "sideways"])
    assert outcome.exit_code == 2
    assert "sideways" in outcome.output
