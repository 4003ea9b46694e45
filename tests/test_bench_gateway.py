"""``authmesh bench gateway`` in a tiny configuration: a well-formed result, nothing about speed."""

from __future__ import annotations

from pathlib import Path

import pytest

from authmesh.bench import gateway
from authmesh.bench.common import Goal
from tests.test_bench import assert_charts, assert_latency, rendered

pytestmark = pytest.mark.slow


async def test_the_gateway_bench_compares_both_gateways_and_sees_every_revocation(tmp_path: Path) -> None:
    result = await gateway.measure(concurrency=2, slices=2, slice_s=0.1, revocations=2)
    for name in gateway.GATEWAYS:
        assert result["throughput"][name]["per_second"] > 0
        assert_latency(result["throughput"][name]["latency_ms"])
    assert result["throughput"]["ext_authz_over_jwt_authn"] > 0
    revocation = result["revocation"]
    assert revocation["ext_authz"]["refused"] == 2
    assert revocation["replica"]["refused"] == 2
    assert revocation["jwt_authn"]["refused"] == 0  # it never learns of a revocation
    assert_latency(revocation["ext_authz"]["latency_ms"])
    assert_latency(revocation["jwt_authn"]["latency_ms"], samples=False)
    for name, goal in result["goals"].items():
        judged = Goal(name, "", goal["target"], goal["higher_is_better"], goal["unit"]).met(goal["value"])
        assert result["passed"][name] is judged
    assert result["ok"] is all(result["passed"].values())
    text = rendered(gateway.render(result))
    assert "never" in text
    assert "ext_authz / jwt_authn" in text
    assert_charts(gateway.draw(result, tmp_path))
