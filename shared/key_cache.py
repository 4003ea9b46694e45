"""The auth service's public keys, cached by ``kid``: a :class:`authmesh._shared.verifier.KeySource`.

Lookups are synchronous and never do I/O, so the verifier's hot path stays pure. Fetching is async
and deliberately scarce:

* **single flight**: every caller that needs fresh keys joins one fetch that starts after it asked
  (a fetch already on the wire may have been answered before the key it is looking for existed);
* **cooldown**: fetches start at least ``cooldown`` seconds apart, so a flood of tokens with made-up
  ``kid`` values costs one fetch per cooldown, not one per token;
* **negative cache**: a ``kid`` still unknown after a fresh fetch is remembered as unknown for
  ``negative_ttl`` seconds and answered without fetching at all;
* **retirement**: a retired key is evicted at once and refused from then on, even if a later fetch
  still lists it.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable

import structlog
from cryptography.hazmat.primitives.asymmetric import ec

from authmesh._shared.errors import KeyRevoked, Unavailable, UnknownKey
from authmesh._shared.keys import parse_jwks

JwksFetcher = Callable[[], Awaitable[str]]
"""Returns the auth service's JWK Set as JSON text."""

KEYS_UNAVAILABLE = "KEYS_UNAVAILABLE"
_MAX_NEGATIVE_ENTRIES = 4096
_MAX_RETIRED = 4096
_log = structlog.get_logger(__name__)


class KeyCache:
    """Public keys by ``kid``, fetched from the auth service.

    Args:
        fetch: Returns the JWK Set as JSON text.
        cooldown: Minimum seconds between the starts of two fetches.
        negative_ttl: Seconds a ``kid`` missing from a fresh JWK Set is answered as unknown without a fetch.
        fetch_timeout: Deadline of one fetch, seconds.
        clock: Monotonic seconds.
    """

    def __init__(
        self,
        fetch: JwksFetcher,
        *,
        cooldown: float = 1.0,
        negative_ttl: float = 10.0,
        fetch_timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._cooldown = cooldown
        self._negative_ttl = negative_ttl
        self._fetch_timeout = fetch_timeout
        self._clock = clock
        self._keys: dict[str, ec.EllipticCurvePublicKey] = {}
        self._retired: set[str] = set()
        self._unknown: OrderedDict[str, float] = OrderedDict()
        self._lock = asyncio.Lock()
        self._queued: asyncio.Task[None] | None = None
        self._rounds: set[asyncio.Task[None]] = set()
        self._last_fetch_started = -float("inf")
        self._fetches = 0
        self._failures = 0

    @property
    def fetches(self) -> int:
        """Fetches started so far."""
        return self._fetches

    @property
    def failures(self) -> int:
        """Fetches that failed so far."""
        return self._failures

    @property
    def retired(self) -> frozenset[str]:
        """The key ids retired so far (refused for the life of the process)."""
        return frozenset(self._retired)

    @property
    def kids(self) -> frozenset[str]:
        """The key ids currently usable."""
        return frozenset(self._keys)

    def public_key(self, kid: str) -> ec.EllipticCurvePublicKey:
        """The public key for ``kid``.

        Raises:
            KeyRevoked: The key was retired.
            UnknownKey: No such key is known (yet).
        """
        if kid in self._retired:
            raise KeyRevoked()
        key = self._keys.get(kid)
        if key is None:
            raise UnknownKey(kid)
        return key

    def retire(self, kid: str) -> None:
        """Evict ``kid`` at once and refuse it from now on."""
        self._keys.pop(kid, None)
        if len(self._retired) < _MAX_RETIRED:
            self._retired.add(kid)

    def retire_all(self, kids: Iterable[str]) -> None:
        """Retire several keys."""
        for kid in kids:
            self.retire(kid)

    def is_known(self, kid: str) -> bool:
        """Whether ``kid`` is usable now."""
        return kid in self._keys and kid not in self._retired

    async def refresh(self) -> None:
        """Fetch the JWK Set anew (after a key rotation), sharing the fetch with concurrent callers.

        Raises:
            Unavailable: With code ``KEYS_UNAVAILABLE`` when the fetch failed.
        """
        await self._fresh_fetch()

    async def refresh_for(self, kid: str) -> bool:
        """Make sure ``kid`` is known if the auth service knows it, fetching at most once per cooldown.

        Args:
            kid: The key id a token or event named.

        Returns:
            Whether ``kid`` is usable now. False for a retired key, or one the auth service did not
            list in a fetch less than ``negative_ttl`` ago.

        Raises:
            Unavailable: With code ``KEYS_UNAVAILABLE`` when the fetch this call needed failed.
        """
        if kid in self._retired:
            return False
        if kid in self._keys:
            return True
        if self._recently_unknown(kid):
            return False
        await self._fresh_fetch()
        if kid in self._keys:
            return True
        self._remember_unknown(kid)
        return False

    async def aclose(self) -> None:
        """Cancel every fetch that is waiting or running."""
        self._queued = None
        rounds = list(self._rounds)
        for task in rounds:
            task.cancel()
        # return_exceptions: the rounds' own cancellation and failures are expected here.
        await asyncio.gather(*rounds, return_exceptions=True)

    async def _fresh_fetch(self) -> None:
        """Wait for a fetch that starts after this call (joining one that has not started yet)."""
        task = self._queued
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._fetch_round(), name="jwks-fetch")
            self._rounds.add(task)
            task.add_done_callback(self._round_done)
            self._queued = task
        # One waiter's cancellation must not cancel the fetch the others wait for.
        await asyncio.shield(task)

    async def _fetch_round(self) -> None:
        async with self._lock:
            delay = self._last_fetch_started + self._cooldown - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)
            # From here on the fetch is on the wire: later callers queue the next round.
            if self._queued is asyncio.current_task():
                self._queued = None
            self._last_fetch_started = self._clock()
            self._fetches += 1
            try:
                async with asyncio.timeout(self._fetch_timeout):
                    text = await self._fetch()
                keys = parse_jwks(text)
            except Exception as error:  # whatever broke, the keys could not be had: fail closed
                self._failures += 1
                _log.warning("jwks fetch failed", error=type(error).__name__)
                raise Unavailable("signing keys unavailable", code=KEYS_UNAVAILABLE) from error
            # The auth service drops a key from its JWK Set only when it is retired or its last token
            # has expired: a key that disappears is refused as revoked from now on, not re-fetched as
            # unknown (tokens cached before keep being checked against this).
            for kid in self._keys.keys() - keys.keys():
                self.retire(kid)
            # Negative entries stay: a kid listed now is found in _keys before they are consulted.
            self._keys = {kid: key for kid, key in keys.items() if kid not in self._retired}

    def _round_done(self, task: asyncio.Task[None]) -> None:
        self._rounds.discard(task)
        if not task.cancelled():
            task.exception()  # a round nobody waits for any more must not log "never retrieved"

    def _recently_unknown(self, kid: str) -> bool:
        until = self._unknown.get(kid)
        if until is None:
            return False
        if until > self._clock():
            return True
        del self._unknown[kid]
        return False

    def _remember_unknown(self, kid: str) -> None:
        self._unknown[kid] = self._clock() + self._negative_ttl
        self._unknown.move_to_end(kid)
        while len(self._unknown) > _MAX_NEGATIVE_ENTRIES:
            self._unknown.popitem(last=False)
