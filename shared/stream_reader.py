"""Reads ``AUTH_EVENTS`` without creating anything on the server: batched direct gets and stream info.

A resource replica holds no consumer-writing JetStream API (a consumer of one replica could be rewritten
by another). It follows the live copy the stream republishes (core NATS, each message carrying its stream
sequence in headers) and reads history with ``$JS.API.DIRECT.GET.AUTH_EVENTS`` in batches (nats-server
2.11+): catch-up at start, after a reconnect, and to fill a gap in the live sequence. Replies come to the
connection's own inbox prefix, which its NATS user alone may subscribe to.
"""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from authmesh._shared.errors import Unavailable
from authmesh._shared.events import STREAM_NAME

DIRECT_GET_SUBJECT = f"$JS.API.DIRECT.GET.{STREAM_NAME}"
STREAM_INFO_SUBJECT = f"$JS.API.STREAM.INFO.{STREAM_NAME}"
# One batch: enough to keep round trips rare, small enough that the server never buffers more than
# a few MiB for us (a slow reader beyond its pending limit is cut off as a slow consumer).
BATCH_MESSAGES = 4096
BATCH_MAX_BYTES = 8 * 1024 * 1024
# How long a batch may go without a message before the read is given up (and retried by the caller).
_QUIET_SECONDS = 2.0
_REQUEST_SECONDS = 2.0
_STATUS = "Status"
_END_OF_BATCH = "204"
_NOT_FOUND = "404"
_SEQUENCE = "Nats-Sequence"
_SUBJECT = "Nats-Subject"
_TIME_STAMP = "Nats-Time-Stamp"
_NUM_PENDING = "Nats-Num-Pending"
_LAST_SEQUENCE = "Nats-Last-Sequence"
# A stream holds at most 2**64 messages; this many batches would read 2**64 and more.
_MAX_BATCHES = 2**52
_PENDING_MESSAGES = 4 * BATCH_MESSAGES
_PENDING_BYTES = 4 * BATCH_MAX_BYTES


@dataclass(frozen=True, slots=True)
class StreamMessage:
    """One message of the stream, as a direct get or the live copy delivers it.

    Attributes:
        sequence: Its stream sequence.
        subject: The subject it was published on (``auth.events.…``).
        data: The payload (a signed event).
        stored_at: When the stream stored it, Unix seconds (the server's clock).
        pending: Messages after it in the stream when it was read; None on the live path.
    """

    sequence: int
    subject: str
    data: bytes
    stored_at: float
    pending: int | None = None


@dataclass(frozen=True, slots=True)
class StreamBounds:
    """The stream's first and last sequence (first is last + 1 when it is empty)."""

    first: int
    last: int


def live_message(message: Msg) -> StreamMessage:
    """The stream message behind one republished (live) message.

    Raises:
        Unavailable: The message lacks the republish headers (it did not come from the stream).
    """
    return _stream_message(message.headers or {}, message.data, pending=None)


def _stream_message(headers: Mapping[str, str], data: bytes, *, pending: int | None) -> StreamMessage:
    try:
        return StreamMessage(
            sequence=int(headers[_SEQUENCE]),
            subject=headers[_SUBJECT],
            data=data,
            stored_at=_unix_seconds(headers[_TIME_STAMP]),
            pending=pending,
        )
    except (KeyError, ValueError) as error:
        raise Unavailable(f"stream message without its stream headers ({error})") from None


def _unix_seconds(stamp: str) -> float:
    """RFC 3339 with nanoseconds (``2026-12-04T15:27:51.856098889Z``) as Unix seconds."""
    whole, _, fraction = stamp.removesuffix("Z").partition(".")
    moment = datetime.datetime.fromisoformat(whole).replace(tzinfo=datetime.UTC)
    return moment.timestamp() + (float(f"0.{fraction}") if fraction else 0.0)


class StreamReader:
    """Direct gets and stream info on ``AUTH_EVENTS`` over one connection.

    Args:
        client: A connected client whose user may publish the two read APIs and subscribe to its inbox.
    """

    def __init__(self, client: NatsClient) -> None:
        self._client = client

    async def bounds(self) -> StreamBounds:
        """The stream's first and last sequence.

        Raises:
            Unavailable: The stream does not answer, or does not exist.
        """
        try:
            reply = await self._client.request(STREAM_INFO_SUBJECT, b"", timeout=_REQUEST_SECONDS)
            document = json.loads(reply.data)
            state = document["state"]
            return StreamBounds(first=int(state["first_seq"]), last=int(state["last_seq"]))
        except (KeyError, TypeError, ValueError) as error:
            raise Unavailable(f"{STREAM_NAME} info unreadable: {error}") from None
        except Exception as error:  # nats-py raises its own timeouts and no-responders errors
            raise Unavailable(f"{STREAM_NAME} info unavailable: {type(error).__name__}") from error

    async def read(self, *, after: int | None, since: float) -> AsyncIterator[StreamMessage]:
        """Every message after sequence ``after`` (or stored since ``since`` when None), in order, to the end.

        Sequences may jump: the messages in between are no longer in the stream (deleted, or expired),
        since the server that answered holds later ones.

        Args:
            after: The last sequence already held, or None.
            since: Unix seconds, used when ``after`` is None.

        Raises:
            Unavailable: The stream did not answer, or answered with an error.
        """
        prefix = self._client.new_inbox()
        replies: asyncio.Queue[Msg] = asyncio.Queue()

        async def collect(message: Msg) -> None:
            replies.put_nowait(message)

        subscription = await self._client.subscribe(
            f"{prefix}.*",
            cb=collect,
            pending_msgs_limit=_PENDING_MESSAGES,
            pending_bytes_limit=_PENDING_BYTES,
        )
        try:
            request: dict[str, object] = {"batch": BATCH_MESSAGES, "max_bytes": BATCH_MAX_BYTES}
            if after is None:
                request["start_time"] = _rfc3339(since)
            else:
                request["seq"] = after + 1
            for batch in range(_MAX_BATCHES):  # each batch moves forward; the last says nothing is pending
                inbox = f"{prefix}.{batch}"
                await self._client.publish(DIRECT_GET_SUBJECT, json.dumps(request).encode(), reply=inbox)
                end: Mapping[str, str] | None = None
                async for message in _batch(replies, inbox):
                    if isinstance(message, StreamMessage):
                        yield message
                    else:
                        end = message
                if end is None or end.get(_STATUS) == _NOT_FOUND or int(end.get(_NUM_PENDING, "0")) == 0:
                    return
                request = {
                    "batch": BATCH_MESSAGES,
                    "max_bytes": BATCH_MAX_BYTES,
                    "seq": int(end[_LAST_SEQUENCE]) + 1,
                }
            raise Unavailable(f"{STREAM_NAME} direct get did not reach the end of the stream")
        finally:
            await subscription.unsubscribe()


async def _batch(replies: asyncio.Queue[Msg], inbox: str) -> AsyncIterator[StreamMessage | Mapping[str, str]]:
    """The messages of one batch, then its closing status headers (end of batch, or not found)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(_QUIET_SECONDS) as quiet:
            while True:
                message = await replies.get()
                if message.subject != inbox:
                    continue  # a late reply to an earlier batch
                quiet.reschedule(loop.time() + _QUIET_SECONDS)
                headers = message.headers or {}
                status = headers.get(_STATUS)
                if status is None:
                    pending = headers.get(_NUM_PENDING)
                    yield _stream_message(headers, message.data, pending=int(pending) if pending else None)
                elif status in (_END_OF_BATCH, _NOT_FOUND):
                    yield headers
                    return
                else:
                    raise Unavailable(
                        f"{STREAM_NAME} direct get failed: {status} {headers.get('Description', '')}"
                    )
    except TimeoutError:
        raise Unavailable(f"{STREAM_NAME} direct get: no answer within {_QUIET_SECONDS:g} s") from None


def _rfc3339(unix_seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(unix_seconds, tz=datetime.UTC)
    return moment.isoformat().replace("+00:00", "Z")
