"""The auth service's own Prometheus metrics (the gRPC ones come from ``authmesh._shared.metrics``)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter


@dataclass(frozen=True, slots=True)
class AuthMetrics:
    """Counters of what the auth service did."""

    logins: Counter
    refreshes: Counter
    revocations: Counter
    events_published: Counter

    @classmethod
    def register(cls, registry: CollectorRegistry) -> AuthMetrics:
        """Create the metrics in ``registry``."""
        return cls(
            logins=Counter(
                "authmesh_logins_total", "Login attempts by result.", ["result"], registry=registry
            ),
            refreshes=Counter(
                "authmesh_refreshes_total",
                "Refresh attempts by result (ok, invalid, revoked, reused).",
                ["result"],
                registry=registry,
            ),
            revocations=Counter(
                "authmesh_revocations_total",
                "Revocations by kind (token, session, user, key).",
                ["kind"],
                registry=registry,
            ),
            events_published=Counter(
                "authmesh_events_published_total",
                "Events acknowledged by JetStream, by type.",
                ["type"],
                registry=registry,
            ),
        )
