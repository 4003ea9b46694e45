"""Connecting to NATS and declaring the ``AUTH_EVENTS`` stream, the same way in every service."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RePublish, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError

from authmesh._shared.connecting import StartupConnection, address_of
from authmesh._shared.events import LIVE_SUBJECTS, STREAM_NAME, STREAM_SUBJECTS
from authmesh._shared.settings import CommonSettings
from authmesh._shared.tls import client_ssl_context

Callback = Callable[[], Awaitable[None]]
ErrorCallback = Callable[[Exception], Awaitable[None]]

# Reconnect for ever, quickly: a resource service cut off from NATS is degraded until it is back,
# and the auth service answers UNAVAILABLE meanwhile; neither should give up.
RECONNECT_WAIT_SECONDS = 0.25
CONNECT_TIMEOUT_SECONDS = 2
# Publishes while disconnected fail at once instead of piling up in the client's buffer, so a
# revocation RPC answers UNAVAILABLE rather than "OK" for an event that may never leave.
PENDING_BYTES_WHILE_DISCONNECTED = 0
# Nobody needs a consumer on AUTH_EVENTS (replicas read with direct gets and the republished copy):
# this bounds what an account whose permissions were widened by mistake could pile up.
STREAM_MAX_CONSUMERS = 16
DUPLICATE_WINDOW_SECONDS = 120.0
DEFAULT_INBOX_PREFIX = "_INBOX"


def inbox_prefix(user: str | None) -> str:
    """Where a connection's replies arrive: ``_INBOX.<user>``, the only inboxes that user may read.

    NATS permissions cannot tell one connection's inbox from another's, so each replica has a user of
    its own and its replies go under that user's name.
    """
    return f"{DEFAULT_INBOX_PREFIX}.{user}" if user else DEFAULT_INBOX_PREFIX


async def _ignore_error(_: Exception) -> None:
    """nats-py logs errors through the callback; the connection state is watched elsewhere."""


async def connect_nats(
    settings: CommonSettings,
    *,
    name: str,
    disconnected: Callback | None = None,
    reconnected: Callback | None = None,
    error: ErrorCallback | None = None,
) -> NatsClient:
    """Connect to the configured NATS servers, then reconnect for ever with a short wait.

    The first connection is tried for ``settings.connect_timeout`` seconds (nats-py retries every
    ``RECONNECT_WAIT_SECONDS``); each failure is logged with the address and its cause, and a
    cancellation (SIGTERM while starting) ends the attempts at once.

    Args:
        settings: Where NATS is and how to authenticate.
        name: Connection name shown by the server (service and instance).
        disconnected: Called when the connection drops.
        reconnected: Called when it is back.
        error: Called with asynchronous errors (slow consumer, permissions).

    Returns:
        A connected client.

    Raises:
        Unavailable: ``BROKER_UNAVAILABLE`` when no server answered within the connect timeout.
    """
    options: dict[str, Any] = {"inbox_prefix": inbox_prefix(settings.nats_user)}
    if settings.nats_user:
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password.get_secret_value() if settings.nats_password else ""
    tls = client_ssl_context(settings.tls)
    if tls is not None:
        # TLS before the first byte, whatever the URL's scheme: nats-py upgrades an INFO-first connection
        # only when the server's INFO says tls_required, so a plaintext server (or anyone in between)
        # would otherwise get the password in the clear, even for a tls:// URL.
        options["tls"] = tls
        options["tls_handshake_first"] = True
    if disconnected is not None:
        options["disconnected_cb"] = disconnected
    if reconnected is not None:
        options["reconnected_cb"] = reconnected
    attempts = StartupConnection(
        "NATS",
        ",".join(address_of(url) for url in settings.nats_urls),
        settings.connect_timeout,
        "BROKER_UNAVAILABLE",
    )
    connected = False
    later_errors = error or _ignore_error

    async def on_error(problem: Exception) -> None:
        if connected:
            await later_errors(problem)
        else:
            attempts.failed(problem)

    client = NatsClient()
    try:
        async with asyncio.timeout(settings.connect_timeout):
            await client.connect(
                servers=list(settings.nats_urls),
                name=name,
                connect_timeout=CONNECT_TIMEOUT_SECONDS,
                # Annotated int by nats-py, which only hands it to asyncio.sleep.
                reconnect_time_wait=RECONNECT_WAIT_SECONDS,  # type: ignore[arg-type]
                max_reconnect_attempts=-1,
                allow_reconnect=True,
                error_cb=on_error,
                pending_size=PENDING_BYTES_WHILE_DISCONNECTED,
                **options,
            )
    except TimeoutError as timed_out:
        abandon(client)
        raise attempts.gave_up() from timed_out
    except BaseException:
        abandon(client)
        raise
    connected = True
    return client


def abandon(client: NatsClient) -> None:
    """Close the socket of a client whose first connection never completed.

    nats-py's ``connect()`` closes an attempt's socket only on the errors it retries: an attempt cut
    short (our deadline, a cancellation while a TLS-first handshake waits) or any failure with
    ``allow_reconnect=False`` keeps it open until garbage collection (a ``ResourceWarning``). Its
    ``close()`` does not help there: after a failed TLS handshake it waits for ever on the plaintext
    stream, whose protocol the TLS layer had replaced. So the transport is closed directly (nats-py
    offers no public way).
    """
    transport = getattr(client, "_transport", None)
    if transport:
        transport.close()


DUPLICATE_WINDOW_SECONDS = 120.0


def stream_config(settings: CommonSettings) -> StreamConfig:
    """The ``AUTH_EVENTS`` stream as the contract describes it."""
    return StreamConfig(
        name=STREAM_NAME,
        subjects=list(STREAM_SUBJECTS),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=settings.stream_max_age,
        discard=DiscardPolicy.OLD,
        num_replicas=settings.stream_replicas,
        # JetStream refuses a window longer than the stream keeps messages (short token lifetimes).
        duplicate_window=min(DUPLICATE_WINDOW_SECONDS, settings.stream_max_age),
        allow_direct=True,
        republish=RePublish(src=STREAM_SUBJECTS[0], dest=LIVE_SUBJECTS[0]),
        max_consumers=STREAM_MAX_CONSUMERS,
    )


async def ensure_stream(js: JetStreamContext, settings: CommonSettings) -> None:
    """Create ``AUTH_EVENTS``, or update it to the configured limits when it exists."""
    config = stream_config(settings)
    try:
        await js.stream_info(STREAM_NAME)
    except NotFoundError:
        try:
            await js.add_stream(config)
            return
        except BadRequestError:
            pass  # another replica created it between our look and our add
    await js.update_stream(config)
