"""docker-compose.yml, proved without a Docker engine.

The compose v2 binary and the compose-spec schema accept the file; its NATS users are the ones
``authmesh up`` runs with; its services take only the contract's settings. Then the file's own services
run as local processes, with the commands and environment ``compose config`` resolves, every container
port remapped to a free loopback port and every service name to 127.0.0.1, the bind mounts (the NATS
configuration in ``deploy/nats``) used as they are, and the Envoy configuration in ``deploy/envoy`` with
its addresses moved the same way: a login works on every replica and a revoked session is rejected by all
three, and by the gateway in front of the service with no authmesh code.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
import pytest_asyncio
import redis.asyncio as redis
import typer
from ruamel.yaml import YAML

from authmesh._shared.events import STREAM_NAME
from authmesh._shared.nats_wiring import inbox_prefix
from authmesh._shared.settings import AuthSettings, CommonSettings, ResourceSettings
from authmesh.envoy_gateway import ext_authz_filter, find_envoy
from authmesh.processes import find_nats_server, find_redis_server, free_ports
from authmesh.stack import (
    AUTH_NATS_USER,
    ChildProcess,
    Probe,
    authmesh_command,
    compose_password_variable,
    grpc_health_status,
    nats_authorization,
    replica_names,
)
from authmesh.stack_commands import COMPOSE_REPLICAS, compose_environment
from scripts.check_compose import compose_command, compose_env
from tests.nats_routes import intruder_joins, route_count
from tests.test_stack import USER_PASSWORD, StackClient
from tests.waiting import eventually

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
AUTHORIZATION_CONF = ROOT / "deploy" / "nats" / "authorization.conf"
NATS_CONF = ROOT / "deploy" / "nats" / "nats.conf"
# What the images listen on and keep their data in, as docker-compose.yml uses them.
NATS_CLIENT_PORT, NATS_ROUTE_PORT, NATS_MONITOR_PORT = 4222, 6222, 8222
REDIS_PORT, REDIS_DATA = 6379, "/data"
AUTH_GRPC_PORT, RESOURCE_GRPC_PORT = 50051, 50061
GATEWAY_PORT = 8080
ENVOY_CONFIG = ROOT / "deploy" / "envoy" / "envoy.yaml"
# Inside a container these name the container itself.
OWN_HOSTS = frozenset({"0.0.0.0", "127.0.0.1", "localhost"})  # noqa: S104  # names, not a bind
_ADDRESS = re.compile(r"(?<![\w.-])(?P<host>[A-Za-z0-9_.-]+):(?P<port>\d{1,5})(?!\d)")
START_TIMEOUT_SECONDS = 45.0
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


def depends_on(service: Mapping[str, Any]) -> set[str]:
    """The services ``service`` waits for."""
    return set(service.get("depends_on") or {})


def start_order(services: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """The services in levels: each level depends only on earlier ones."""
    levels: list[list[str]] = []
    placed: set[str] = set()
    for _ in range(len(services)):
        ready = sorted(
            name for name in services if name not in placed and depends_on(services[name]) <= placed
        )
        if not ready:
            break
        levels.append(ready)
        placed.update(ready)
    assert placed == set(services), f"depends_on has a cycle or an unknown service: {set(services) - placed}"
    return levels


@dataclass(frozen=True, slots=True)
class LocalNetwork:
    """Container ports mapped to free loopback ports, and volumes mapped to directories."""

    ports: Mapping[tuple[str, int], int]
    volumes_dir: Path

    @classmethod
    def for_services(cls, services: Mapping[str, Mapping[str, Any]], volumes_dir: Path) -> LocalNetwork:
        """Give every port a service publishes or exposes a free loopback port."""
        wanted = sorted(
            {
                (name, int(port["target"]))
                for name, service in services.items()
                for port in service.get("ports") or []
            }
            | {
                (name, int(port))
                for name, service in services.items()
                for port in service.get("expose") or []
            }
            # NATS's monitoring port, which nats.conf keeps on the container's own loopback.
            | {
                (name, NATS_MONITOR_PORT)
                for name, service in services.items()
                if str(service.get("image", "")).startswith("nats:")
            }
        )
        return cls(dict(zip(wanted, free_ports(len(wanted)), strict=True)), volumes_dir)

    def port(self, service: str, container_port: int) -> int:
        """The loopback port standing for ``service:container_port``."""
        return self.ports[(service, container_port)]

    def address(self, service: str, container_port: int) -> str:
        """``127.0.0.1:PORT`` standing for ``service:container_port``."""
        return f"127.0.0.1:{self.port(service, container_port)}"

    def rewrite(self, text: str, service: str) -> str:
        """``text`` with every ``host:port`` of the compose network replaced by its loopback address."""

        def replace(match: re.Match[str]) -> str:
            owner = service if match["host"] in OWN_HOSTS else match["host"]
            mapped = self.ports.get((owner, int(match["port"])))
            return match[0] if mapped is None else f"127.0.0.1:{mapped}"

        return _ADDRESS.sub(replace, text)

    def paths(self, service: Mapping[str, Any]) -> dict[str, Path]:
        """Container path → local directory, for each of the service's mounts."""
        mounts: dict[str, Path] = {}
        for volume in service.get("volumes") or []:
            if volume["type"] == "bind":
                mounts[volume["target"]] = Path(volume["source"])
            else:
                local = self.volumes_dir / volume["source"]
                local.mkdir(parents=True, exist_ok=True)
                mounts[volume["target"]] = local
        return mounts


def local_path(argument: str, mounts: Mapping[str, Path]) -> str:
    """``argument`` with a leading container path replaced by the directory mounted there."""
    for target, source in mounts.items():
        if argument == target or argument.startswith(target.rstrip("/") + "/"):
            return str(source) + argument[len(target.rstrip("/")) :]
    return argument


def healthcheck_argument(service: Mapping[str, Any], flag: str | None = None, prefix: str = "") -> str:
    """One argument of the service's healthcheck: the one after ``flag``, or the first with ``prefix``."""
    test = list(service["healthcheck"]["test"])
    if flag is not None:
        return str(test[test.index(flag) + 1])
    return next(str(argument) for argument in test if str(argument).startswith(prefix))


async def http_ok(url: str, timeout: float) -> bool:  # noqa: ASYNC109  # a probe's own short deadline
    """Whether ``url`` answers 200."""
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as reply,
        ):
            return reply.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


class ComposeRun:
    """The compose file's services as local processes.

    Args:
        services: ``compose config`` services.
        work_dir: Where each service gets a directory (and each named volume).
    """

    def __init__(self, services: Mapping[str, Mapping[str, Any]], work_dir: Path) -> None:
        self.services = services
        self.work_dir = work_dir
        self.network = LocalNetwork.for_services(services, work_dir / "volumes")
        self.processes: dict[str, ChildProcess] = {}

    def child(self, name: str) -> ChildProcess:
        """The local process standing for service ``name``."""
        service = self.services[name]
        mounts = self.network.paths(service)
        arguments = [local_path(self.network.rewrite(str(part), name), mounts) for part in service["command"]]
        environment = {
            key: self.network.rewrite(str(value), name)
            for key, value in (service.get("environment") or {}).items()
        }
        environment |= {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONUNBUFFERED": "1"}
        image = str(service.get("image", ""))
        probe: Probe
        if image.startswith("nats:"):
            command = [str(find_nats_server()), *arguments]
            # The ports nats.conf sets, moved to free loopback ports.
            command += ["--addr", "127.0.0.1", "--port", str(self.network.port(name, NATS_CLIENT_PORT))]
            command += ["--http_port", str(self.network.port(name, NATS_MONITOR_PORT))]
            probe = self._http_probe(
                self.network.rewrite(healthcheck_argument(service, prefix="http://"), name)
            )
        elif image.startswith("redis:"):
            assert arguments[0] == "redis-server"
            command = [str(find_redis_server()), *arguments[1:]]
            command += ["--port", str(self.network.port(name, REDIS_PORT)), "--bind", "127.0.0.1"]
            command += ["--dir", str(mounts[REDIS_DATA])]
            probe = self._redis_probe(self.network.port(name, REDIS_PORT), environment["REDISCLI_AUTH"])
        elif image.startswith("envoyproxy/envoy:"):
            command, probe = self._envoy(name, arguments)
        elif image.startswith("python:"):
            # python -I SCRIPT --host H --port P: the service binds loopback on its own free port.
            assert arguments[0] == "python"
            command = [sys.executable, *arguments[1:]]
            port = self.network.port(name, int(command[command.index("--port") + 1]))
            command[command.index("--host") + 1] = "127.0.0.1"
            command[command.index("--port") + 1] = str(port)
            probe = self._http_probe(f"http://127.0.0.1:{port}/healthz")
        else:
            assert "build" in service, f"{name}: an image this test cannot run locally: {image}"
            command = authmesh_command(*arguments)
            target = self.network.rewrite(healthcheck_argument(service, flag="--target"), name)
            probe = self._grpc_probe(target)
        return ChildProcess(name, self.work_dir / name, command, environment, probe)

    def _envoy(self, name: str, arguments: list[str]) -> tuple[list[str], Probe]:
        """Envoy with the mounted configuration, every socket address moved to a loopback port."""
        assert arguments[0] == "envoy"
        source = Path(arguments[arguments.index("-c") + 1])
        config = YAML(typ="safe").load(source.read_text())
        admin = free_ports(1)[0]
        pending = [config]
        while pending:
            node = pending.pop()
            children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
            pending += [child for child in children if isinstance(child, dict | list)]
            address = node.get("socket_address") if isinstance(node, dict) else None
            if address is None:
                continue
            owner = name if address["address"] in OWN_HOSTS else address["address"]
            mapped = self.network.ports.get((owner, int(address["port_value"])))
            # Only the admin interface has no port of the compose network.
            address["address"], address["port_value"] = "127.0.0.1", mapped or admin
        local = self.work_dir / name / "envoy.json"
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(json.dumps(config))
        command = [str(find_envoy()), *arguments[1:]]
        command[command.index("-c") + 1] = str(local)
        # Several Envoys on one machine would share hot-restart memory; a container has its own.
        command.append("--disable-hot-restart")
        return command, self._http_probe(f"http://127.0.0.1:{admin}/ready")

    @staticmethod
    def _http_probe(url: str) -> Probe:
        async def ok(timeout: float) -> bool:  # noqa: ASYNC109
            return await http_ok(url, timeout)

        return ok

    @staticmethod
    def _grpc_probe(target: str) -> Probe:
        async def serving(timeout: float) -> bool:  # noqa: ASYNC109
            return await grpc_health_status(target, timeout) == "SERVING"

        return serving

    @staticmethod
    def _redis_probe(port: int, password: str) -> Probe:
        async def pong(timeout: float) -> bool:  # noqa: ASYNC109
            client = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=timeout)
            try:
                return bool(await client.ping())
            except (redis.RedisError, OSError):
                return False
            finally:
                await client.aclose()

        return pong

    async def start(self) -> None:
        """Start every service once the services it depends on are healthy."""
        for level in start_order(self.services):
            children = [self.child(name) for name in level]
            self.processes.update((child.name, child) for child in children)
            outcomes = await asyncio.gather(
                *(child.start(START_TIMEOUT_SECONDS) for child in children), return_exceptions=True
            )
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome

    async def stop(self) -> None:
        """Stop every service, dependents first."""
        for level in reversed(start_order(self.services)):
            await asyncio.gather(*(self.processes[name].stop() for name in level if name in self.processes))


@pytest.fixture(scope="module")
def secrets() -> dict[str, str]:
    """What ``authmesh compose-env`` would write to ``.env``."""
    return compose_environment()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def compose_run(
    secrets: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ComposeRun]:
    """The compose file's services (without the demo profile), running locally."""
    run = ComposeRun(compose_config(secrets)["services"], tmp_path_factory.mktemp("compose"))
    try:
        await run.start()
        yield run
    finally:
        await run.stop()


def test_the_compose_binary_and_the_compose_spec_accept_the_file() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_compose.py")],
        capture_output=True,
        text=True,
        check=False,
        timeout=_COMPOSE_TIMEOUT_SECONDS,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_binary_rejects_a_broken_file(tmp_path: Path, secrets: dict[str, str]) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        COMPOSE_FILE.read_text().replace("condition: service_healthy", "condition: when_ready", 1)
    )

    result = subprocess.run(
        compose_command(broken, "config", "--quiet"),
        env=compose_env(secrets),
        capture_output=True,
        text=True,
        check=False,
        timeout=_COMPOSE_TIMEOUT_SECONDS,
    )

    assert result.returncode != 0
    assert "condition" in result.stderr


def test_the_compose_file_refuses_to_run_without_its_secrets() -> None:
    result = subprocess.run(
        compose_command(COMPOSE_FILE, "config", "--quiet"),
        env=compose_env({}) | dict.fromkeys(compose_environment(), ""),
        capture_output=True,
        text=True,
        check=False,
        timeout=_COMPOSE_TIMEOUT_SECONDS,
    )

    assert result.returncode != 0
    assert "authmesh compose-env > .env" in result.stderr


def test_the_compose_nats_users_are_the_ones_authmesh_up_runs_with() -> None:
    lines = AUTHORIZATION_CONF.read_text().splitlines(keepends=True)
    body = "".join(line for line in lines if not line.startswith("#")).lstrip("\n")

    replicas = [(name, f"${compose_password_variable(name)}") for name in replica_names(COMPOSE_REPLICAS)]
    assert body == nats_authorization(f"${compose_password_variable(AUTH_NATS_USER)}", replicas)


def test_the_services_take_only_the_contracts_settings(secrets: dict[str, str]) -> None:
    services = compose_config(secrets, profiles=("*",))["services"]
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
        # Every value passes the service's own validation.
        assert settings(
            **{key.removeprefix("AUTHMESH_").lower(): value for key, value in service["environment"].items()}
        )


def test_every_service_waits_for_healthy_dependencies_and_has_a_healthcheck(secrets: dict[str, str]) -> None:
    services = compose_config(secrets, profiles=("*",))["services"]

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


def test_the_demo_service_runs_the_demo_command_with_flags_it_accepts(secrets: dict[str, str]) -> None:
    from authmesh.cli import app

    demo = compose_config(secrets, profiles=("demo",))["services"]["demo"]
    assert demo["profiles"] == ["demo"]
    name, *arguments = demo["command"]
    # typer carries its own copy of click: look the command up by its interface, not its class.
    command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]

    # Parsing fails (a usage error) on any flag the command does not have.
    context = command.make_context(name, list(arguments))

    assert name == "demo"
    assert context.params["target_auth"] == "auth:50051"
    assert context.params["target_replicas"] == "resource-1:50061,resource-2:50061,resource-3:50061"
    assert context.params["target_gateway"] == "http://gateway:8080"
    assert context.params["admin"] == secrets["AUTHMESH_BOOTSTRAP_ADMIN"]


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
    # The build context starts empty and admits the sources by name: a .env never gets in.
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if not line.startswith("#")]
    assert ignored[0] == "*"
    assert not any(".env" in line for line in ignored)


def stack_client(compose_run: ComposeRun, secrets: dict[str, str]) -> StackClient:
    """A client of the locally running auth service and replicas, as the bootstrap admin."""
    network = compose_run.network
    replicas = [network.address(f"resource-{n}", RESOURCE_GRPC_PORT) for n in (1, 2, 3)]
    username, _, password = secrets["AUTHMESH_BOOTSTRAP_ADMIN"].partition(":")
    return StackClient(network.address("auth", AUTH_GRPC_PORT), replicas, (username, password))


async def test_the_compose_services_serve_a_login_and_reject_a_revoked_session_everywhere(
    compose_run: ComposeRun, secrets: dict[str, str]
) -> None:
    client = stack_client(compose_run, secrets)
    try:
        await client.create_user("carol")
        pair = await client.login("carol", USER_PASSWORD)
        answers = [await client.whoami(index, pair.access_token) for index in range(3)]

        await client.revoke_session(pair.session_id)

        async def rejected_everywhere() -> bool:
            return all(
                [await client.rejects(index, pair.access_token, "SESSION_REVOKED") for index in range(3)]
            )

        await eventually(rejected_everywhere, within=10, what="every replica to reject the revoked session")
    finally:
        await client.aclose()

    assert [answer.instance for answer in answers] == ["resource-1", "resource-2", "resource-3"]


async def test_the_compose_gateway_passes_a_token_to_the_upstream_and_refuses_it_once_revoked(
    compose_run: ComposeRun, secrets: dict[str, str]
) -> None:
    network = compose_run.network
    client = stack_client(compose_run, secrets)
    gateway = f"http://{network.address('gateway', GATEWAY_PORT)}/docs/1"

    async def through_the_gateway(token: str) -> tuple[int, dict[str, Any]]:
        headers = {"authorization": f"Bearer {token}", "x-authmesh-subject": "forged-by-the-client"}
        async with aiohttp.ClientSession() as session, session.get(gateway, headers=headers) as reply:
            text = await reply.text()
            return reply.status, json.loads(text) if text.startswith("{") else {}

    try:
        subject = await client.create_user("heidi")
        pair = await client.login("heidi", USER_PASSWORD)
        status, passed = await through_the_gateway(pair.access_token)

        await client.revoke_session(pair.session_id)

        async def refused() -> bool:
            return (await through_the_gateway(pair.access_token))[0] == 401

        await eventually(refused, within=10, what="the gateway to refuse the revoked session")
        _, body = await through_the_gateway(pair.access_token)
    finally:
        await client.aclose()

    assert status == 200
    assert passed["headers"]["x-authmesh-subject"] == [subject]
    assert body["reason"] == "SESSION_REVOKED"


def test_the_gateway_configuration_asks_authmesh_and_fails_closed() -> None:
    config = YAML(typ="safe").load(ENVOY_CONFIG.read_text())
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    authz = manager["http_filters"][0]
    clusters = {cluster["name"]: cluster for cluster in config["static_resources"]["clusters"]}
    endpoints = clusters["authmesh_authz"]["load_assignment"]["endpoints"][0]["lb_endpoints"]

    assert authz == ext_authz_filter()
    assert {
        (endpoint["endpoint"]["address"]["socket_address"]["address"],
         endpoint["endpoint"]["address"]["socket_address"]["port_value"])
        for endpoint in endpoints
    } == {(f"resource-{n}", RESOURCE_GRPC_PORT) for n in (1, 2, 3)}  # fmt: skip
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


async def test_the_event_stream_is_replicated_on_the_three_nats_nodes(
    compose_run: ComposeRun, secrets: dict[str, str]
) -> None:
    servers = [f"nats://{compose_run.network.address(f'nats-{n}', NATS_CLIENT_PORT)}" for n in (1, 2, 3)]
    connection = await nats.connect(
        servers=servers,
        user=AUTH_NATS_USER,
        password=secrets[compose_password_variable(AUTH_NATS_USER)],
        inbox_prefix=inbox_prefix(AUTH_NATS_USER),
        connect_timeout=2,
        max_reconnect_attempts=0,
    )
    try:
        info = await connection.jetstream(timeout=2).stream_info(STREAM_NAME)
    finally:
        await connection.close()

    assert info.config.num_replicas == 3
    assert info.cluster is not None
    assert len(info.cluster.replicas or []) == 2


async def test_the_healthcheck_commands_of_the_compose_file_pass(compose_run: ComposeRun) -> None:
    for name, service in compose_run.services.items():
        test = [str(part) for part in service["healthcheck"]["test"]]
        if test[:3] != ["CMD", "authmesh", "healthcheck"]:
            continue
        arguments = [compose_run.network.rewrite(part, name) for part in test[2:]]
        process = await asyncio.create_subprocess_exec(
            *authmesh_command(*arguments), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        async with asyncio.timeout(30):
            stdout, stderr = await process.communicate()

        assert process.returncode == 0, (name, stderr.decode())
        assert stdout.decode().strip() == "SERVING"


def test_the_nats_monitoring_port_is_reachable_only_inside_its_container(secrets: dict[str, str]) -> None:
    services = compose_config(secrets)["services"]
    nats_services = {name: service for name, service in services.items() if name.startswith("nats-")}

    assert len(nats_services) == 3
    for name, service in nats_services.items():
        published = {int(port["target"]) for port in service.get("ports") or []}
        exposed = {int(port) for port in service.get("expose") or []}
        assert NATS_MONITOR_PORT not in published | exposed, name
    listen = re.findall(r"^http:\s*\"?([^\"\s]+)\"?\s*$", NATS_CONF.read_text(), flags=re.MULTILINE)
    assert listen == [f"127.0.0.1:{NATS_MONITOR_PORT}"]


async def test_a_nats_server_without_the_route_password_cannot_join_the_compose_cluster(
    compose_run: ComposeRun, tmp_path: Path
) -> None:
    monitors = [f"http://{compose_run.network.address(f'nats-{n}', NATS_MONITOR_PORT)}" for n in (1, 2, 3)]
    before = [await route_count(monitor) for monitor in monitors]

    joined = await intruder_joins(
        tmp_path / "intruder", f"nats://{compose_run.network.address('nats-1', NATS_ROUTE_PORT)}"
    )

    assert not joined
    assert [await route_count(monitor) for monitor in monitors] == before
