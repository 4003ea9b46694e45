"""Connecting to NATS and declaring the ``AUTH_EVENTS`` stream, the same way in every service."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError

from authmesh._shared.events import STREAM_NAME, STREAM_SUBJECTS
from authmesh._shared.settings import CommonSettings

Callback = Callable[[], Awaitable[None]]
ErrorCallback = Callable[[Exception], Awaitable[None]]

# Reconnect for ever, quickly: a resource service cut off from NATS is degraded until it is back,
# and the auth service answers UNAVAILABLE meanwhile; neither should give up.
RECONNECT_WAIT_SECONDS = 0.25
CONNECT_TIMEOUT_SECONDS = 2
# Publishes while disconnected fail at once instead of piling up in the client's buffer, so a
# revocation RPC answers UNAVAILABLE rather than "OK" for an event that may never leave.
PENDING_BYTES_WHILE_DISCONNECTED = 0


async def _ignore_error(_: Exception) -> None:
    """nats-py logs errors through the callback; the connection state is watched elsewhere."""


def describe_nats_urls(urls: list[str]) -> str:
    """The NATS servers without any credentials in their URLs: what logs and connection errors name."""
    return ",".join(url.rpartition("@")[2] if "://" not in url else _without_userinfo(url) for url in urls)


def _without_userinfo(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


async def connect_nats(
    settings: CommonSettings,
    *,
    name: str,
    disconnected: Callback | None = None,
    reconnected: Callback | None = None,
    error: ErrorCallback | None = None,
) -> NatsClient:
    """Connect to the configured NATS servers, reconnecting for ever with a short wait.

    Args:
        settings: Where NATS is and how to authenticate.
        name: Connection name shown by the server (service and instance).
        disconnected: Called when the connection drops.
        reconnected: Called when it is back.
        error: Called with asynchronous errors (slow consumer, permissions).

    Returns:
        A connected client.

    Raises:
        OSError, nats.errors.NoServersError: When no server answers at first connect.
    """
    options: dict[str, object] = {}
    if settings.nats_user:
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password.get_secret_value() if settings.nats_password else ""
    if disconnected is not None:
        options["disconnected_cb"] = disconnected
    if reconnected is not None:
        options["reconnected_cb"] = reconnected
    return await nats.connect(
        servers=list(settings.nats_urls),
        name=name,
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        reconnect_time_wait=RECONNECT_WAIT_SECONDS,
        max_reconnect_attempts=-1,
        allow_reconnect=True,
        error_cb=error or _ignore_error,
        pending_size=PENDING_BYTES_WHILE_DISCONNECTED,
        **options,
    )


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
        duplicate_window=120.0,
        allow_direct=True,
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
