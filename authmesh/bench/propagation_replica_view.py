"""The replicas' own view of propagation, with no probe involved: their propagation histograms.

Read from ``authmesh_revocation_propagation_lag_seconds`` (event time to applied) on each replica's
``/metrics``, before and after a run of revocations.
"""

from __future__ import annotations

from collections.abc import Sequence

import aiohttp

# Bucket bounds of the replicas' propagation histogram the report reads (seconds).
REPLICA_VIEW_BOUNDS = (0.0025, 0.005, 0.01, 0.025)
_PROPAGATION_BUCKETS_METRIC = "authmesh_revocation_propagation_lag_seconds_bucket"


async def replica_histograms(http_addresses: Sequence[str]) -> list[dict[float, float]]:
    """Each replica's own propagation histogram (``le`` → cumulative count, token revocations)."""
    histograms = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for address in http_addresses:
            async with session.get(f"http://{address}/metrics") as response:
                text = await response.text()
            buckets: dict[float, float] = {}
            for line in text.splitlines():
                if line.startswith(_PROPAGATION_BUCKETS_METRIC) and 'type="revoked.token"' in line:
                    le = line.split('le="', 1)[1].split('"', 1)[0]
                    buckets[float(le)] = float(line.rsplit(" ", 1)[1])
            histograms.append(buckets)
    return histograms


def share_within(
    before: Sequence[dict[float, float]], after: Sequence[dict[float, float]], bound: float
) -> float | None:
    """The share of revocations each replica applied within ``bound`` seconds (the worst replica)."""
    shares = []
    for old, new in zip(before, after, strict=True):
        total = new.get(float("inf"), 0.0) - old.get(float("inf"), 0.0)
        if total <= 0:
            continue
        within = new.get(bound, 0.0) - old.get(bound, 0.0)
        shares.append(within / total)
    return min(shares) if shares else None
