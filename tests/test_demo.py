"""The demo end to end: on a stack that is already up (``--target-*``), and on a fresh local stack.

The first runs against an auth service and two replicas in this process; the act that cuts a replica
off from NATS is skipped there, as it is on any stack the demo did not start. The last test runs the
whole story, that act included, on ``authmesh.stack.LocalStack`` (processes).
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest
import pytest_asyncio
import typer
from rich.console import Console
from typer.testing import CliRunner, Result

from authmesh._auth_service.app import AuthApp
from authmesh._resource_service.app import ResourceApp
from authmesh.demo import (
    ActResult,
    DemoReport,
    DemoTarget,
    Propagation,
    ReplicaTarget,
    ReplicaTiming,
    run_demo,
)
from authmesh.demo_commands import print_summary, register
from authmesh.processes import LOOPBACK, free_port
from tests.auth_support import ADMIN, auth_settings, running_auth
from tests.legible import assert_legible
from tests.test_client_cli import running_replica

ACTS = ("login", "theft", "revocation", "aftermath", "reuse", "key-compromise", "nats-cut", "gateway", "dpop")


@dataclass
class Stack:
    """An auth service and replicas running in this process."""

    auth: AuthApp
    replicas: list[ResourceApp]

    def target(self) -> DemoTarget:
        """The stack as the demo sees one it did not start."""
        return DemoTarget(
            auth_grpc=self.auth.grpc_address,
            replicas=tuple(
                ReplicaTarget(replica.grpc_address, replica.grpc_address) for replica in self.replicas
            ),
            admin=ADMIN,
        )

    def flags(self) -> list[str]:
        """The same as ``authmesh demo`` flags."""
        replicas = ",".join(replica.grpc_address for replica in self.replicas)
        return [
            "--target-auth",
            self.auth.grpc_address,
            "--target-replicas",
            replicas,
            "--admin",
            ":".join(ADMIN),
        ]


@pytest_asyncio.fixture(loop_scope="session")
async def stack(redis_url: str, nats_url: str) -> AsyncIterator[Stack]:
    """An auth service and two replicas, in process."""
    async with AsyncExitStack() as exits:
        # Listening on the addresses the demo dials: the default DPoP origins (http://<listen>) then
        # match the proofs the demo makes for them.
        auth, _ = await exits.enter_async_context(
            running_auth(auth_settings(redis_url, [nats_url], grpc_listen=f"127.0.0.1:{free_port()}"))
        )
        replicas = [
            await exits.enter_async_context(
                running_replica(auth, nats_url, f"replica-{name}", grpc_listen=f"127.0.0.1:{free_port()}")
            )
            for name in "ab"
        ]
        yield Stack(auth, replicas)


def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.callback()
    def root() -> None:
        """A group, so that ``demo`` is a subcommand as in ``authmesh``."""

    return app


async def run_cli(*args: str) -> Result:
    """``authmesh ARGS`` off the test's event loop (the command runs a loop of its own)."""
    return await asyncio.to_thread(CliRunner().invoke, cli(), list(args))


def assert_every_act_as_expected(report: DemoReport, *, skipped: tuple[str, ...] = ()) -> None:
    assert [act.key for act in report.acts] == list(ACTS)
    for act in report.acts:
        failed = [check for check in act.checks if not check.ok]
        assert act.ok, f"act {act.key}: {act.observed}; failed checks: {failed}"
        assert act.skipped == (act.key in skipped), act.key
    assert report.ok


def assert_every_replica_measured(report: DemoReport, act_key: str, label: str) -> None:
    act = next(act for act in report.acts if act.key == act_key)
    measured = act.main_propagation
    assert measured is not None
    assert measured.ok
    assert {timing.replica for timing in measured.replicas} == set(report.replicas)
    for timing in measured.replicas:
        assert timing.label == label
        assert timing.first_rejected_ms is not None
        assert timing.polls >= 1
        assert not timing.rejected_before_action


async def test_the_story_runs_on_an_existing_stack_and_skips_only_the_nats_cut_and_the_gateway(
    stack: Stack,
) -> None:
    report = await run_demo(stack.target(), username="alice-existing")

    assert_every_act_as_expected(report, skipped=("nats-cut", "gateway"))
    assert report.replicas == ("replica-a", "replica-b")  # named by the instance each reports
    assert_every_replica_measured(report, "revocation", "SESSION_REVOKED")
    assert_every_replica_measured(report, "reuse", "SESSION_REVOKED")
    assert_every_replica_measured(report, "key-compromise", "KEY_REVOKED")
    dpop = next(act for act in report.acts if act.key == "dpop")
    assert {check.expected for check in dpop.checks} >= {
        "refused DPOP_PROOF_MISSING",
        "refused DPOP_KEY_MISMATCH",
    }
    reuse = next(act for act in report.acts if act.key == "reuse")
    assert reuse.main_propagation is not None
    assert reuse.main_propagation.action_result == "REFRESH_TOKEN_REUSED"


async def test_the_demo_command_writes_json_and_exits_zero_when_every_act_behaves(
    stack: Stack, tmp_path: Path
) -> None:
    report_file = tmp_path / "demo.json"

    result = await run_cli("demo", *stack.flags(), "--json", str(report_file))

    assert result.exit_code == 0, result.output
    assert "Summary" in result.stdout
    assert "Every act behaved as expected" in result.stdout
    document = json.loads(report_file.read_text())
    assert document["ok"] is True
    assert [act["key"] for act in document["acts"]] == list(ACTS)
    revocation = document["acts"][2]["propagations"][0]
    assert len(revocation["replicas"]) == 2
    assert all(timing["first_rejected_ms"] > 0 for timing in revocation["replicas"])


async def test_the_demo_command_draws_the_timeline(stack: Stack, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    picture = tmp_path / "timeline.png"

    result = await run_cli("demo", *stack.flags(), "--plot", str(picture))

    assert result.exit_code == 0, result.output
    assert picture.read_bytes().startswith(b"\x89PNG")


async def test_the_demo_exits_non_zero_when_an_act_does_not_behave(stack: Stack) -> None:
    nowhere = f"{LOOPBACK}:{free_port()}"

    result = await run_cli(
        "demo",
        "--target-auth",
        stack.auth.grpc_address,
        "--target-replicas",
        nowhere,
        "--admin",
        ":".join(ADMIN),
    )

    assert result.exit_code == 1, result.output
    assert "did not behave as expected" in result.stdout


async def test_asking_for_a_plot_without_matplotlib_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real_find_spec = importlib.util.find_spec

    def without_matplotlib(name: str, package: str | None = None) -> ModuleSpec | None:
        return None if name == "matplotlib" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", without_matplotlib)

    result = await run_cli("demo", "--plot", str(tmp_path / "timeline.png"))

    assert result.exit_code == 2
    assert "pip install 'authmesh[plot]'" in result.stderr
    assert not (tmp_path / "timeline.png").exists()


async def test_the_target_flags_must_come_together() -> None:
    result = await run_cli("demo", "--target-auth", f"{LOOPBACK}:1")

    assert result.exit_code == 2
    assert "--target-auth and --target-replicas go together" in result.stderr
    assert "--admin" in result.stderr


async def test_the_target_gateway_needs_the_stack_and_a_url() -> None:
    result = await run_cli("demo", "--target-gateway", f"{LOOPBACK}:8080", "--admin", "admin:secret")

    assert result.exit_code == 2
    assert "--target-gateway needs them" in result.stderr
    assert "--target-gateway is a base URL" in result.stderr


async def test_an_https_target_gateway_needs_the_ca_to_verify_it() -> None:
    result = await run_cli(
        "demo",
        "--target-auth", f"{LOOPBACK}:1",
        "--target-replicas", f"{LOOPBACK}:2",
        "--target-gateway", f"https://{LOOPBACK}:8443",
        "--admin", "admin:secret",
    )  # fmt: skip

    assert result.exit_code == 2
    assert "verified against --tls-ca-file" in result.stderr


@pytest.mark.slow
async def test_every_act_behaves_on_a_fresh_local_stack() -> None:
    pytest.importorskip("authmesh.stack", reason="authmesh.stack.LocalStack is not available")
    from authmesh.demo import run_local_demo

    report = await run_local_demo(3, staleness_bound=1.0)

    assert_every_act_as_expected(report)
    assert len(report.replicas) == 3
    for key, label in (
        ("revocation", "SESSION_REVOKED"),
        ("reuse", "SESSION_REVOKED"),
        ("key-compromise", "KEY_REVOKED"),
    ):
        assert_every_replica_measured(report, key, label)
    cut = next(act for act in report.acts if act.key == "nats-cut")
    assert len(cut.propagations) == 2
    assert {mark.label for mark in cut.marks} >= {"NATS cut", "NATS restored"}
    gateway = next(act for act in report.acts if act.key == "gateway")
    assert "SESSION_REVOKED after" in gateway.observed


# --- the summary at any width ------------------------------------------------------------------


def sample_report() -> DemoReport:
    """The README's run: three replicas, every act as expected."""

    def measured(*latencies: float) -> Propagation:
        timings = tuple(
            ReplicaTiming(f"resource-{index}", latency, None, "SESSION_REVOKED", 5)
            for index, latency in enumerate(latencies, start=1)
        )
        return Propagation(
            "the stolen access token", "RevokeSession", 1.0, 18.7, "OK", ("SESSION_REVOKED",), 3.0, timings
        )

    rows = [
        ("login", "accepted on every replica", "OK on all 3", ()),
        ("theft", "the stolen token works everywhere", "OK on all 3", ()),
        ("revocation", "stolen token refused everywhere", "SESSION_REVOKED on all 3", (18.9, 19.0, 19.0)),
        (
            "aftermath",
            "attacker's refresh refused; new login works",
            "refresh: REFRESH_TOKEN_INVALID; login OK",
            (),
        ),
        (
            "reuse",
            "REFRESH_TOKEN_REUSED; session refused",
            "REFRESH_TOKEN_REUSED; SESSION_REVOKED",
            (74.3, 67.4, 72.5),
        ),
        (
            "key-compromise",
            "old-key tokens refused; new logins work",
            "KEY_REVOKED on all 3; new login OK",
            (56.0, 58.0, 51.0),
        ),
        (
            "nats-cut",
            "cut replica refuses revoked tokens within the staleness bound (1 s here); recovers",
            "resource-3: TOKEN_REVOKED after 1328.4 ms (degraded after 1007 ms); "
            "current 14 ms after the reconnect",
            (37.2, 36.7, 1328.4),
        ),
    ]
    acts = tuple(
        ActResult(
            number,
            key,
            key,
            expected,
            observed,
            True,
            propagations=(measured(*latencies),) if latencies else (),
        )
        for number, (key, expected, observed, latencies) in enumerate(rows, start=1)
    )
    replicas = ("resource-1", "resource-2", "resource-3")
    return DemoReport(0.0, "127.0.0.1:50051", replicas, True, 1.0, acts, 3.9)


def summary_texts(report: DemoReport) -> list[str]:
    """Everything the summary must show whole: acts, expectations, observations, latencies."""
    texts = [text for act in report.acts for text in (act.key, act.expected, act.observed)]
    for act in report.acts:
        if act.main_propagation is not None:
            texts += [f"{timing.first_rejected_ms:.1f}" for timing in act.main_propagation.replicas]
    return [*texts, *report.replicas]


def test_the_summary_reads_whole_at_80_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    # Issue 15.7: at 80 columns the table squeezed "expected" and "observed" to a few letters a line.
    report = sample_report()
    output = io.StringIO()
    print_summary(Console(file=output, width=80, force_terminal=False), report)
    assert_legible(output.getvalue(), texts=summary_texts(report), width=80)
    assert "┃" not in output.getvalue()  # one block per act: the table does not fit


def test_the_summary_reads_whole_in_a_log_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    report = sample_report()
    log = tmp_path / "demo.log"
    with log.open("w") as file:
        print_summary(Console(file=file), report)  # not a terminal: rich lays out for 80 columns
    assert_legible(log.read_text(), texts=summary_texts(report), width=80)


def test_the_summary_is_a_table_where_the_terminal_is_wide_enough() -> None:
    report = sample_report()
    output = io.StringIO()
    print_summary(Console(file=output, width=160, force_terminal=False), report)
    assert "┃ act" in output.getvalue()
    assert_legible(output.getvalue(), texts=summary_texts(report), width=160)
