"""The one backoff of the background loops: retries what it is told to, and nothing else."""

from __future__ import annotations

import pytest

from authmesh._shared.backoff import backoff
from authmesh._shared.errors import ConfigurationError, Unavailable


class Flaky:
    """Fails with the given errors, one per call, then succeeds."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


async def attempt_until_done(flaky: Flaky, unless: tuple[type[BaseException], ...] = ()) -> str:
    result = ""
    async for attempt in backoff(Unavailable, what="test", unless=unless, initial=0.0):
        with attempt:
            result = await flaky()
    return result


async def test_the_named_errors_are_retried_until_the_call_succeeds() -> None:
    flaky = Flaky(Unavailable(), Unavailable(), Unavailable())

    assert await attempt_until_done(flaky) == "done"
    assert flaky.calls == 4


async def test_an_error_not_named_propagates_at_once() -> None:
    flaky = Flaky(ConfigurationError("bad"))

    with pytest.raises(ConfigurationError):
        await attempt_until_done(flaky)
    assert flaky.calls == 1


async def test_an_excepted_subclass_propagates_at_once() -> None:
    class Special(Unavailable):
        pass

    flaky = Flaky(Special())

    with pytest.raises(Special):
        await attempt_until_done(flaky, unless=(Special,))
    assert flaky.calls == 1


async def test_an_error_that_says_how_long_to_wait_is_waited_out_in_full_with_jitter() -> None:
    flaky = Flaky(Unavailable(retry_after=30.0), Unavailable())
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    async for attempt in backoff(Unavailable, what="test", initial=0.5, sleep=record):
        with attempt:
            await flaky()

    assert flaky.calls == 3
    assert 30.0 <= waits[0] <= 30.5, waits
    assert waits[1] <= 1.0 + 0.5, waits  # the next plain failure backs off as usual
