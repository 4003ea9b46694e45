"""``authmesh up --tls``: the whole local stack on TLS, and nothing of it reachable in plaintext."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from authmesh._resource_service.app import ResourceApp
from authmesh._shared.auth_metadata import METADATA_PATH
from authmesh._shared.settings import ResourceSettings
from authmesh._shared.tls import TlsFiles, client_ssl_context
from authmesh.bench import rpc
from authmesh.demo import run_local_demo
from authmesh.stack import LocalStack, ServiceLogin, grpc_health_status
from tests.test_demo import assert_every_act_as_expected
from tests.test_stack import FAST_ENV
from tests.test_tls_hops import nats_connects, redis_answers
from tests.test_tls_http import fetch_json, http_status
from tests.waiting import eventually

# The stack's Redis on TLS needs a redis-server built with TLS (the embedded valkey-server has none).
pytestmark = pytest.mark.redis_tls
# A line of gRPC's C core (absl's format): "I1205 05:00:03.005796   12446 ssl_transport_security.cc:2563] …".
GRPC_CORE_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")


async def test_a_tls_stack_serves_on_tls_and_refuses_plaintext_on_every_hop(tmp_path: Path) -> None:
    async with LocalStack(replicas=1, base_dir=tmp_path, env=FAST_ENV, tls=True) as stack:
        tls = stack.client_tls
        assert await grpc_health_status(stack.auth_grpc, 5, tls=tls) == "SERVING"
        assert await grpc_health_status(stack.replicas[0].grpc, 5, tls=tls) == "SERVING"
        assert await grpc_health_status(stack.auth_grpc, 2) is None, "plaintext gRPC got an answer"
        # Its replicas log in by certificate, so the auth service demands one from every caller.
        ca_only = TlsFiles(ca_file=tls.ca_file)
        assert await grpc_health_status(stack.auth_grpc, 2, tls=ca_only) is None

        assert stack.redis_url.startswith("rediss://")
        plaintext_redis = stack.redis_url.replace("rediss://", "redis://")
        assert not await redis_answers(plaintext_redis, tls), "a plaintext Redis client got in"
        assert await redis_answers(stack.redis_url, tls)

        assert not await nats_connects(stack.nats_urls[0].replace("tls://", "nats://"), None)

        # The replicas read the auth service's metadata over HTTPS (they are SERVING); plaintext HTTP is gone.
        assert stack.auth_url == f"https://{stack.auth_http}"
        assert stack.client_env()["AUTHMESH_AUTH_URL"] == stack.auth_url
        context = client_ssl_context(tls)
        assert context is not None
        assert await http_status(f"{stack.auth_url}/.well-known/jwks.json", context) == 200
        assert await http_status(f"https://{stack.replicas[0].http}/healthz", context) == 200
        assert await http_status(f"http://{stack.auth_http}/.well-known/jwks.json", False) is None
        metadata = await fetch_json(f"{stack.auth_url}{METADATA_PATH}", context)
        assert metadata["jwks_uri"] == f"{stack.auth_url}/.well-known/jwks.json"

        description = json.dumps(stack.describe())
        assert stack.secrets is not None
        assert stack.secrets.redis_password not in description
        assert stack.client_env()["AUTHMESH_TLS_CA_FILE"].endswith("ca.pem")
        assert stack.client_env()["AUTHMESH_TLS_CERT_FILE"].endswith("client.pem")

        # The replica serves, so it logged in: by its certificate, holding no password.
        assert stack.auth is not None
        assert _certificate_logins(stack.auth.log_path.read_text()) >= 1
        assert stack.secrets.service_account.password not in stack.replica_processes[0].log_path.read_text()

        # The plaintext calls above failed their TLS handshakes without a line outside the log format.
        for process in (stack.auth, *stack.replica_processes):
            core_lines = [
                line for line in process.log_path.read_text().splitlines() if GRPC_CORE_LINE.match(line)
            ]
            assert not core_lines, f"{process.name}: gRPC's C core wrote {core_lines[:2]}"

        # A service of one's own joins with `authmesh up --env-file`'s settings (by password, over mTLS).
        values = {key.removeprefix("AUTHMESH_").lower(): value for key, value in stack.service_env().items()}
        own = ResourceSettings.model_validate(
            values
            | {
                "grpc_listen": "127.0.0.1:0",
                "http_listen": "127.0.0.1:0",
                "instance": "own",
                "shutdown_grace": 0.2,
            }
        )
        async with ResourceApp(own) as replica:
            await eventually(lambda: _ready(replica), within=20, what="a service of one's own serving")


async def test_a_tls_stack_may_keep_password_logins_for_its_replicas(tmp_path: Path) -> None:
    async with LocalStack(
        replicas=1, base_dir=tmp_path, env=FAST_ENV, tls=True, service_login=ServiceLogin.PASSWORD
    ) as stack:
        assert await grpc_health_status(stack.replicas[0].grpc, 5, tls=stack.client_tls) == "SERVING"
        # Without certificate logins the auth service does not demand client certificates.
        ca_only = TlsFiles(ca_file=stack.client_tls.ca_file)
        assert await grpc_health_status(stack.auth_grpc, 5, tls=ca_only) == "SERVING"
        assert stack.auth is not None
        assert _certificate_logins(stack.auth.log_path.read_text()) == 0


async def _ready(replica: ResourceApp) -> bool:
    return replica.ready


def _certificate_logins(log: str) -> int:
    return sum(1 for line in log.splitlines() if "login_succeeded" in line and "method=certificate" in line)


@pytest.mark.slow
async def test_every_act_of_the_demo_behaves_on_a_tls_stack() -> None:
    report = await run_local_demo(2, staleness_bound=1.0, tls=True)

    assert_every_act_as_expected(report)


async def test_the_rpc_bench_runs_every_call_on_tls() -> None:
    result = await rpc.measure(concurrency=(2,), slices=2, slice_s=0.1, tls=True)

    assert result["config"]["tls"] is True
    for kind in ("health", "whoami"):
        assert result["levels"][0][kind]["errors"] == {}
        assert result["levels"][0][kind]["per_second"] > 0
