"""docker-compose.yml, proved without a Docker engine.

The compose v2 binary and the compose-spec schema accept the file; every secret reaches a service as a
file through ``secrets:`` (never an environment variable, a command line or ``.env``); every hop is on
TLS; published ports bind loopback only; the services take only the contract's settings and those pass
the services' own validation with the files ``authmesh compose-env`` writes; the real nats-server accepts
a node's configuration with the secrets it mounts; the sentinel profile hands the auth service the
Sentinels. ``make compose-e2e`` runs the same file in real containers.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import typer
from ruamel.yaml import YAML

from authmesh._shared.settings import AuthSettings, CommonSettings, ResourceSettings
from authmesh.compose_secrets import (
    MIN_REPLICAS_VARIABLE,
    REDIS_URL_VARIABLE,
    SECRETS_DIR_VARIABLE,
    dotenv_lines,
    sentinel_redis_url,
    write_compose_secrets,
)
from authmesh.envoy_gateway import ext_authz_filter
from authmesh.processes import find_nats_server
from scripts.check_compose import compose_command, compose_env

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
NATS_CONF = ROOT / "deploy" / "nats" / "nats.conf"
REDIS_CONF = ROOT / "deploy" / "redis" / "redis.conf"
ENVOY_CONFIG = ROOT / "deploy" / "envoy" / "envoy.yaml"
NATS_MONITOR_PORT = 8222
RESOURCE_GRPC_PORT = 50061
SECRETS_MOUNT = "/run/secrets/"
AUTHMESH_SERVICES = ("auth", "resource-1", "resource-2", "resource-3")
_COMPOSE_TIMEOUT_SECONDS = 60


def compose_config(environment: Mapping[str, str], profiles: Sequence[str] = ()) -> dict[str, Any]:
    """``compose config --format json``: the file as compose resolves it (anchors, variables, paths)."""
    result = subprocess.run(
        compose_command(COMPOSE_FILE, "config", "--format", "json", profiles=profiles),
        env=compose_env(environment),
        capture_output=True,
        text=True,
        check=False,
        timeout=_COMPOSE_TIMEOUT_SECONDS,
    )
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)
    assert isinstance(model, dict)
    return model


def dotenv(lines: Sequence[str]) -> dict[str, str]:
    """The variables of ``.env`` lines."""
    pairs = (line.partition("=") for line in lines if line and not line.startswith("#"))
    return {name: value for name, _, value in pairs}


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory ``authmesh compose-env`` wrote."""
    directory = tmp_path_factory.mktemp("compose") / "secrets"
    write_compose_secrets(directory)
    return directory


@pytest.fixture(scope="module")
def environment(secrets_dir: Path) -> dict[str, str]:
    """What ``authmesh compose-env`` prints into ``.env``."""
    return dotenv(dotenv_lines(secrets_dir))


@pytest.fixture(scope="module")
def services(environment: dict[str, str]) -> dict[str, Any]:
    """Every service of every profile, resolved."""
    resolved = compose_config(environment, profiles=("*",))["services"]
    assert isinstance(resolved, dict)
    return resolved


def mounted_secrets(service: Mapping[str, Any], secrets_dir: Path) -> dict[str, Path]:
    """A service's ``/run/secrets/<target>`` paths → the files in the secrets directory."""
    mounted = {}
    for entry in service.get("secrets") or []:
        # compose resolves a relative target (or none) to a path under /run/secrets.
        target = entry.get("target") or entry["source"]
        mounted[target if target.startswith("/") else f"{SECRETS_MOUNT}{target}"] = (
            secrets_dir / entry["source"]
        )
    return mounted


def secret_values(secrets_dir: Path) -> list[str]:
    """Every password-like value in the secrets directory (each credential's password too)."""
    values = []
    for path in secrets_dir.iterdir():
        if path.suffix in (".pem", ".conf"):
            continue
        value = path.read_text().strip()
        values += [value, value.rpartition(":")[2]]
    return [value for value in values if len(value) >= 16]


def test_the_compose_binary_and_the_compose_spec_accept_the_file() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_compose.py")],
        capture_output=True,
        text=True,
        check=False,
        timeout=_COMPOSE_TIMEOUT_SECONDS,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_binary_rejects_a_broken_file(tmp_path: Path, environment: dict[str, str]) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        COMPOSE_FILE.read_text().replace("condition: service_healthy", "condition: when_ready", 1)
    )

    result = subprocess.run(
        compose_command(broken, "config", "--quiet"),
        env=compose_env(environment),
        capture_output=True,
        text=True,
        check=False,
        timeout=_COMPOSE_TIMEOUT_SECONDS,
    )

    assert result.returncode != 0
    assert "condition" in result.stderr


def test_the_compose_file_refuses_to_run_without_its_secrets_directory() -> None:
    result = subprocess.run(
        compose_command(COMPOSE_FILE, "config", "--quiet"),
        env=compose_env({SECRETS_DIR_VARIABLE: ""}),
        capture_output=True,
        text=True,
        check=False,
        timeout=_COMPOSE_TIMEOUT_SECONDS,
    )

    assert result.returncode != 0
    assert "authmesh compose-env > .env" in result.stderr


def test_every_secret_reaches_its_services_as_a_file_and_nowhere_else(
    services: dict[str, Any], secrets_dir: Path
) -> None:
    top_level = compose_config(dotenv(dotenv_lines(secrets_dir)), profiles=("*",))["secrets"]
    values = secret_values(secrets_dir)
    resolved = json.dumps(services)

    # Every file compose-env writes is a compose secret, read from the secrets directory.
    assert {Path(secret["file"]) for secret in top_level.values()} == set(secrets_dir.iterdir())
    # No secret value anywhere in what compose resolves: environment, commands, healthchecks.
    assert values
    assert not [value for value in values if value in resolved]
    for name, service in services.items():
        mounted = mounted_secrets(service, secrets_dir)
        for variable, value in (service.get("environment") or {}).items():
            assert not re.search(r"PASSWORD$|_KEY$|ADMIN$|ACCOUNT$", variable), (name, variable)
            if variable.endswith("_FILE"):
                assert value in mounted, (name, variable)
        if name in AUTHMESH_SERVICES:
            assert f"{SECRETS_MOUNT}ca.pem" in mounted, name


def test_every_hop_is_on_tls(services: dict[str, Any]) -> None:
    nats_conf = NATS_CONF.read_text()
    redis_conf = REDIS_CONF.read_text()

    for name in AUTHMESH_SERVICES:
        environment = services[name]["environment"]
        assert {"AUTHMESH_TLS_CA_FILE", "AUTHMESH_TLS_CERT_FILE", "AUTHMESH_TLS_KEY_FILE"} <= set(environment)
        assert all(url.startswith("tls://") for url in environment["AUTHMESH_NATS_URLS"].split(","))
        assert all(
            origin.startswith("https://") for origin in environment["AUTHMESH_DPOP_ORIGINS"].split(",")
        )
        assert "--tls-ca-file" in services[name]["healthcheck"]["test"]
    assert services["auth"]["environment"]["AUTHMESH_REDIS_URL"].startswith("rediss://")
    assert services["auth"]["environment"]["AUTHMESH_PUBLIC_URL"].startswith("https://")
    assert {services[f"resource-{n}"]["environment"]["AUTHMESH_AUTH_URL"] for n in (1, 2, 3)} == {
        "https://auth:8081"
    }
    # NATS: clients TLS first with a client certificate; routes verify each other.
    assert nats_conf.count("verify: true") == 2
    assert "handshake_first: true" in nats_conf
    # Redis: no plaintext port, client certificates, replication on TLS.
    assert {"port 0", "tls-port 6379", "tls-auth-clients yes", "tls-replication yes"} <= set(
        redis_conf.splitlines()
    )
    for name in ("redis", "redis-replica", "sentinel-1"):
        assert "--tls" in " ".join(services[name]["healthcheck"]["test"]), name
    demo = services["demo"]["command"]
    assert "--tls-ca-file" in demo
    assert demo[demo.index("--target-gateway") + 1].startswith("https://")


def test_the_sentinel_configuration_serves_tls_and_follows_names(secrets_dir: Path) -> None:
    lines = set((secrets_dir / "sentinel.conf").read_text().splitlines())

    assert {"port 0", "tls-port 26379", "tls-auth-clients yes", "tls-replication yes"} <= lines
    assert {"sentinel resolve-hostnames yes", "sentinel announce-hostnames yes"} <= lines
    assert "sentinel monitor authmesh redis 6379 2" in lines
    # The files each Sentinel's secrets mount (its own certificate as tls.pem).
    assert {"tls-cert-file /run/secrets/tls.pem", "tls-key-file /run/secrets/tls-key.pem"} <= lines


def test_published_ports_bind_loopback_only(services: dict[str, Any]) -> None:
    published = [port for service in services.values() for port in service.get("ports") or []]

    assert published
    assert {port["host_ip"] for port in published} == {"127.0.0.1"}


def test_the_sentinel_profile_gives_the_auth_service_the_sentinels(secrets_dir: Path) -> None:
    plain = compose_config(dotenv(dotenv_lines(secrets_dir)))["services"]
    with_sentinels = dotenv(dotenv_lines(secrets_dir, sentinel=True))
    profiled = compose_config(with_sentinels)["services"]

    assert with_sentinels["COMPOSE_PROFILES"] == "sentinel"
    assert with_sentinels[REDIS_URL_VARIABLE] == sentinel_redis_url()
    assert with_sentinels[MIN_REPLICAS_VARIABLE] == "1"
    assert "sentinel-1" not in plain
    assert plain["auth"]["environment"]["AUTHMESH_REDIS_URL"] == "rediss://redis:6379/0"
    assert plain["auth"]["environment"]["AUTHMESH_REDIS_MIN_REPLICAS_ACKED"] == "0"
    assert {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"} <= set(profiled)
    assert profiled["auth"]["environment"]["AUTHMESH_REDIS_URL"].startswith("rediss+sentinel://sentinel-1:")
    assert profiled["auth"]["environment"]["AUTHMESH_REDIS_MIN_REPLICAS_ACKED"] == "1"
    # Each Redis node's name belongs to a holder that outlives the node (a killed primary's name still
    # resolves, so Sentinels and the replica are never stuck on DNS).
    for node in ("redis", "redis-replica"):
        assert profiled[node]["network_mode"] == f"service:{node}-host"
        assert node in profiled[f"{node}-host"]["networks"]["redis"]["aliases"]


def test_the_services_take_only_the_contracts_settings(services: dict[str, Any], secrets_dir: Path) -> None:
    known: dict[str, type[CommonSettings]] = {
        "auth-server": AuthSettings,
        "resource-server": ResourceSettings,
    }

    for name, service in services.items():
        if "build" not in service or service["command"][0] not in known:
            continue
        settings = known[service["command"][0]]
        names = {f"AUTHMESH_{field.upper()}" for field in settings.model_fields}
        assert set(service["environment"]) <= names, name
        # Every value passes the service's own validation, with the files its secrets mount.
        mounted = mounted_secrets(service, secrets_dir)
        values: dict[str, Any] = {
            key.removeprefix("AUTHMESH_").lower(): str(mounted.get(value, value))
            for key, value in service["environment"].items()
        }
        assert settings(**values)


def test_every_service_waits_for_healthy_dependencies_and_has_a_healthcheck(services: dict[str, Any]) -> None:
    for name, service in services.items():
        conditions = {dependency["condition"] for dependency in (service.get("depends_on") or {}).values()}
        assert conditions <= {"service_healthy"}, name
        assert "healthcheck" in service or "demo" in service.get("profiles", []), name
    assert {services[f"resource-{n}"]["environment"]["AUTHMESH_INSTANCE"] for n in (1, 2, 3)} == {
        "resource-1",
        "resource-2",
        "resource-3",
    }
    assert {
        services[name]["environment"].get("AUTHMESH_STREAM_REPLICAS") for name in ("auth", "resource-1")
    } == {"3"}


def test_the_demo_service_runs_the_demo_command_with_flags_it_accepts(services: dict[str, Any]) -> None:
    from authmesh.cli import app

    demo = services["demo"]
    assert demo["profiles"] == ["demo"]
    name, *arguments = demo["command"]
    # typer carries its own copy of click: look the command up by its interface, not its class.
    command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]

    # Parsing fails (a usage error) on any flag the command does not have.
    context = command.make_context(name, list(arguments))

    assert name == "demo"
    assert context.params["target_auth"] == "auth:50051"
    assert context.params["target_replicas"] == "resource-1:50061,resource-2:50061,resource-3:50061"
    assert context.params["target_gateway"] == "https://gateway:8080"
    assert str(context.params["admin_file"]) == f"{SECRETS_MOUNT}bootstrap-admin"
    assert str(context.params["tls_ca_file"]) == f"{SECRETS_MOUNT}ca.pem"
    assert context.params["admin"] is None


def test_the_image_runs_authmesh_as_an_unprivileged_user_without_dev_extras() -> None:
    instructions = [
        line.strip()
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    assert instructions[0] == "FROM python:3.11-slim"
    assert 'ENTRYPOINT ["authmesh"]' in instructions
    user = next(line for line in instructions if line.startswith("USER "))
    assert user.split()[1].split(":")[0] not in {"0", "root"}
    assert not any("[dev]" in line for line in instructions)
    # The build context starts empty and admits the sources by name: no .env or secrets get in.
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if not line.startswith("#")]
    assert ignored[0] == "*"
    assert not any(".env" in line or "secrets" in line for line in ignored)


def test_the_gateway_configuration_asks_authmesh_over_tls_and_fails_closed() -> None:
    config = YAML(typ="safe").load(ENVOY_CONFIG.read_text())
    chain = config["static_resources"]["listeners"][0]["filter_chains"][0]
    manager = chain["filters"][0]["typed_config"]
    authz = manager["http_filters"][0]
    clusters = {cluster["name"]: cluster for cluster in config["static_resources"]["clusters"]}
    endpoints = clusters["authmesh_authz"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    upstream_tls = clusters["authmesh_authz"]["transport_socket"]["typed_config"]["common_tls_context"]

    assert authz == ext_authz_filter()
    assert {
        (endpoint["endpoint"]["address"]["socket_address"]["address"],
         endpoint["endpoint"]["address"]["socket_address"]["port_value"])
        for endpoint in endpoints
    } == {(f"resource-{n}", RESOURCE_GRPC_PORT) for n in (1, 2, 3)}  # fmt: skip
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    assert chain["transport_socket"]["typed_config"]["@type"].endswith("DownstreamTlsContext")
    assert upstream_tls["validation_context"]["trusted_ca"] == {"filename": f"{SECRETS_MOUNT}ca.pem"}
    assert {
        match["matcher"]["exact"]
        for match in upstream_tls["validation_context"]["match_typed_subject_alt_names"]
    } == {
        "resource-1",
        "resource-2",
        "resource-3",
    }


def test_the_nats_monitoring_port_is_reachable_only_inside_its_container(services: dict[str, Any]) -> None:
    nats_services = {name: service for name, service in services.items() if name.startswith("nats-")}

    assert len(nats_services) == 3
    for name, service in nats_services.items():
        published = {int(port["target"]) for port in service.get("ports") or []}
        exposed = {int(port) for port in service.get("expose") or []}
        assert NATS_MONITOR_PORT not in published | exposed, name
    listen = re.findall(r"^http:\s*\"?([^\"\s]+)\"?\s*$", NATS_CONF.read_text(), flags=re.MULTILINE)
    assert listen == [f"127.0.0.1:{NATS_MONITOR_PORT}"]


def test_a_nats_node_accepts_its_configuration_with_the_secrets_it_mounts(
    services: dict[str, Any], secrets_dir: Path, tmp_path: Path
) -> None:
    # The container's /etc/nats and /run/secrets, side by side under tmp_path as they are under /: the
    # includes reach the secrets by a path relative to nats.conf.
    etc, run = tmp_path / "etc" / "nats", tmp_path / "run" / "secrets"
    etc.mkdir(parents=True)
    run.mkdir(parents=True)
    (etc / "nats.conf").write_text(NATS_CONF.read_text().replace(f'"{SECRETS_MOUNT}', f'"{run}/'))
    for target, source in mounted_secrets(services["nats-1"], secrets_dir).items():
        (run / Path(target).name).write_bytes(source.read_bytes())

    result = subprocess.run(
        [str(find_nats_server()), "-t", "-c", str(etc / "nats.conf"), "--server_name", "nats-1"],
        capture_output=True,
        text=True,
        check=False,
        timeout=_COMPOSE_TIMEOUT_SECONDS,
    )

    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stdout + result.stderr
