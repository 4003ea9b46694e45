"""The propagation benchmark's worker process: a prober and a floor subscriber, driven by JSON commands.

Started by the benchmark as ``python -m authmesh.bench.propagation_worker --worker``.
"""

from __future__ import annotations

import sys

from authmesh.bench.common import JsonDict, serve_worker
from authmesh.bench.propagation_floor import FloorSubscriber
from authmesh.bench.propagation_prober import Prober


def worker_main() -> None:
    """The worker process's entry point: serves the prober's and the floor subscriber's commands."""
    prober = Prober()
    subscriber = FloorSubscriber()

    async def unsubscribe(command: JsonDict) -> JsonDict:
        await subscriber.aclose()
        return {"closed": True}

    serve_worker(
        {
            "setup": prober.setup,
            "arm": prober.arm,
            "report": prober.report,
            "prime": prober.prime,
            "ask": prober.ask,
            "subscribe": subscriber.subscribe,
            "collect": subscriber.collect,
            "unsubscribe": unsubscribe,
        }
    )


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    worker_main()
