"""Several auth-service addresses as one gRPC target balanced round-robin."""

from __future__ import annotations

import json

import pytest

from authmesh._shared.errors import ConfigurationError
from authmesh._shared.grpc_targets import SERVICE_CONFIG, balanced_target


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ("127.0.0.1:50051", "127.0.0.1:50051"),
        ("auth.internal:50051", "auth.internal:50051"),
        ("127.0.0.1:50051, 127.0.0.2:50052", "ipv4:127.0.0.1:50051,127.0.0.2:50052"),
        ("[::1]:50051,[::1]:50052", "ipv6:[::1]:50051,[::1]:50052"),
    ],
)
def test_one_address_stays_as_it_is_and_several_become_one_literal_address_list(
    targets: str, expected: str
) -> None:
    assert balanced_target(targets) == expected


@pytest.mark.parametrize(
    "targets",
    ["", " , ", "auth-1:50051,auth-2:50051", "127.0.0.1:50051,[::1]:50051", "127.0.0.1,127.0.0.2:1"],
)
def test_several_addresses_that_grpc_cannot_resolve_as_a_list_are_refused_clearly(targets: str) -> None:
    with pytest.raises(ConfigurationError, match="auth target"):
        balanced_target(targets)


def test_the_service_config_balances_round_robin() -> None:
    assert json.loads(SERVICE_CONFIG)["loadBalancingConfig"] == [{"round_robin": {}}]
