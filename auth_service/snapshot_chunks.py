"""The revocation snapshot cut into ``RevocationSnapshotChunk`` messages of bounded size.

A gRPC client refuses a message over its receive limit (4 MiB by default) with ``RESOURCE_EXHAUSTED``,
so every chunk is kept under :data:`SNAPSHOT_CHUNK_BYTES`, whatever kind of entry fills it: tokens, then
sessions, then users, then retired keys, then revoked DPoP key bindings, each kind carried over into as
many chunks as it needs.

A chunk's size is counted from its entries' strings (their UTF-8 bytes) plus an upper bound on the
tags, lengths and varints around them, so the count never falls short of the encoded size. Chunks are
built one at a time and handed out as soon as they are full, so the first one is on the wire while the
next is being filled.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from authmesh._auth_service.store import RevocationSnapshot
from authmesh.auth.v1 import auth_pb2

# A sixteenth of gRPC's default receive limit: far below any client's, and small enough (about 5,000
# tokens) that the first chunk is on the wire while the next ones are built.
SNAPSHOT_CHUNK_BYTES = 256 * 1024
# Encoded bytes beyond the strings' own, at most: a tag and a length (up to 3 bytes, for anything
# under 2 MiB) for an entry and for each string; a tag and a 10-byte varint for an integer.
_LENGTH_DELIMITED = 4
_INTEGER = 11
_TOKEN_OVERHEAD = 2 * _LENGTH_DELIMITED + _INTEGER
_SESSION_OVERHEAD = 3 * _LENGTH_DELIMITED + _INTEGER
_USER_OVERHEAD = 2 * _LENGTH_DELIMITED + _INTEGER
_KID_OVERHEAD = _LENGTH_DELIMITED
_KEY_BINDING_OVERHEAD = 2 * _LENGTH_DELIMITED + _INTEGER


_Chunk = auth_pb2.RevocationSnapshotChunk
_Entry = TypeVar("_Entry")


class _Chunks:
    """Chunks filled one after another up to a byte budget."""

    def __init__(self, sequence: int, max_bytes: int) -> None:
        self._sequence = sequence
        self._max_bytes = max_bytes
        self._used = 0
        self._current = _Chunk(stream_sequence=sequence)

    def fill(
        self, entries: Sequence[_Entry], sizes: list[int], add: Callable[[_Chunk, Sequence[_Entry]], None]
    ) -> Iterator[_Chunk]:
        """Add ``entries`` (of these encoded ``sizes``) with ``add``, handing out each chunk they fill.

        A chunk is full when the next entry would take it over the budget; an entry larger than the
        budget gets a chunk alone.
        """
        # Running totals and a binary search per chunk: no Python-level step per entry.
        ends = list(itertools.accumulate(sizes))
        start, before = 0, 0
        while start < len(ends):
            stop = bisect.bisect_right(ends, before + self._max_bytes - self._used, lo=start)
            if stop == start and self._used:
                yield self._next_chunk()
                continue
            stop = max(stop, start + 1)
            add(self._current, entries[start:stop])
            self._used += ends[stop - 1] - before
            start, before = stop, ends[stop - 1]
            if start < len(ends):
                yield self._next_chunk()

    def last(self) -> _Chunk:
        """The chunk being filled (the only one when there is nothing to send)."""
        return self._current

    def _next_chunk(self) -> _Chunk:
        full, self._current, self._used = self._current, _Chunk(stream_sequence=self._sequence), 0
        return full


# Added in place: building the messages first and copying them into the chunk costs three times as
# much, for up to hundreds of thousands of entries.


def _add_tokens(chunk: _Chunk, tokens: Sequence[tuple[str, int]]) -> None:
    add = chunk.tokens.add
    for jti, exp in tokens:
        add(jti=jti, exp=exp)


def _add_sessions(chunk: _Chunk, sessions: Sequence[tuple[str, str, int]]) -> None:
    add = chunk.sessions.add
    for sid, sub, revoked_ms in sessions:
        add(sid=sid, sub=sub, revoked_at_unix_ms=revoked_ms)


def _add_users(chunk: _Chunk, users: Sequence[tuple[str, int]]) -> None:
    add = chunk.users.add
    for sub, not_before_ms in users:
        add(sub=sub, not_before_ms=not_before_ms)


def _add_kids(chunk: _Chunk, kids: Sequence[str]) -> None:
    chunk.retired_key_ids.extend(kids)


def _add_key_bindings(chunk: _Chunk, bindings: Sequence[tuple[str, int]]) -> None:
    add = chunk.key_bindings.add
    for jkt, revoked_ms in bindings:
        add(jkt=jkt, revoked_at_unix_ms=revoked_ms)


def snapshot_chunks(
    snapshot: RevocationSnapshot, sequence: int, max_bytes: int = SNAPSHOT_CHUNK_BYTES
) -> Iterator[auth_pb2.RevocationSnapshotChunk]:
    """The snapshot as chunks of at most ``max_bytes`` encoded bytes each (at least one chunk).

    Args:
        snapshot: Every revocation in force.
        sequence: The stream sequence the snapshot reflects; every chunk carries it.
        max_bytes: Size bound of one chunk (an entry larger than it travels alone).

    Yields:
        The chunks, in order: tokens, sessions, users, retired keys, key bindings.
    """
    chunks = _Chunks(sequence, max_bytes)
    tokens, sessions, users, kids = (
        snapshot.tokens,
        snapshot.sessions,
        snapshot.users,
        snapshot.retired_key_ids,
    )
    yield from chunks.fill(tokens, [_TOKEN_OVERHEAD + len(jti.encode()) for jti, _ in tokens], _add_tokens)
    sizes = [_SESSION_OVERHEAD + len(sid.encode()) + len(sub.encode()) for sid, sub, _ in sessions]
    yield from chunks.fill(sessions, sizes, _add_sessions)
    yield from chunks.fill(users, [_USER_OVERHEAD + len(sub.encode()) for sub, _ in users], _add_users)
    yield from chunks.fill(kids, [_KID_OVERHEAD + len(kid.encode()) for kid in kids], _add_kids)
    bindings = snapshot.key_bindings
    sizes = [_KEY_BINDING_OVERHEAD + len(jkt.encode()) for jkt, _ in bindings]
    yield from chunks.fill(bindings, sizes, _add_key_bindings)
    yield chunks.last()
