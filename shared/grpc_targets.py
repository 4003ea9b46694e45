"""Several auth-service processes as one gRPC target, balanced by the client (``round_robin``).

``AUTHMESH_AUTH_TARGET`` may name several ``host:port`` addresses separated by commas. gRPC's own
``ipv4:``/``ipv6:`` resolvers take such a list of literal addresses; a channel with the
``round_robin`` policy keeps a connection to each, spreads calls over those that are up, and stops
sending to one whose connection fails. One DNS name that resolves to several addresses (a headless
Kubernetes service) is balanced the same way.

On TLS, a list of addresses is verified against the first address's host (every process's certificate
must name it); a DNS name is verified against itself.
"""

from __future__ import annotations

import ipaddress
import json

from authmesh._shared.errors import ConfigurationError

AUTH_SERVICE = "authmesh.auth.v1.AuthService"
# Reads a resource service may safely send again to another process when the first could not be reached.
RETRIED_METHODS = ("GetJwks", "Introspect", "SnapshotRevocations")
SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": AUTH_SERVICE, "method": method} for method in RETRIED_METHODS],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)


def balanced_target(targets: str) -> str:
    """The gRPC target for one address or a comma-separated list of them.

    Args:
        targets: ``host:port`` or ``ip:port,ip:port,...`` (IPv6 as ``[addr]:port``).

    Raises:
        ConfigurationError: An empty list, a malformed address, or several addresses that are not all
            IP literals of one family (gRPC resolves a list only of literal addresses).
    """
    parts = _parts(targets)
    if not parts:
        raise ConfigurationError("the auth target names no address")
    if len(parts) == 1:
        return parts[0]
    families = {_family(part) for part in parts}
    if len(families) != 1 or None in families:
        raise ConfigurationError(
            "several auth targets must all be IPv4 or all be IPv6 literal host:port addresses, "
            f"not {targets!r} (or give one DNS name that resolves to every process)"
        )
    return f"{families.pop()}:{','.join(parts)}"


def _family(address: str) -> str | None:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigurationError(f"an auth target must be host:port, not {address!r}")
    try:
        parsed = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    return "ipv4" if parsed.version == 4 else "ipv6"


def client_channel_options(targets: str) -> list[tuple[str, str | int]]:
    """Channel options for a client of ``targets``: balanced when there are several addresses.

    One address keeps gRPC's default ``pick_first``, which reconnects at once when a call finds the
    server back after a restart; ``round_robin`` would fail calls fast until its reconnect backoff ends.
    """
    return balanced_channel_options(targets) if len(_parts(targets)) > 1 else []


def _parts(targets: str) -> list[str]:
    return [part.strip() for part in targets.split(",") if part.strip()]


def balanced_channel_options(targets: str = "") -> list[tuple[str, str | int]]:
    """Channel options that balance calls over every resolved address and retry reads once more.

    Args:
        targets: The addresses given to :func:`balanced_target`. When there are several, a TLS channel
            checks every server's certificate against the first address's host: the channel's own
            name is the whole list, which no certificate carries. (One DNS name for every process is
            checked against that name, as usual.)
    """
    options: list[tuple[str, str | int]] = [
        ("grpc.service_config", SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
    ]
    parts = _parts(targets)
    if len(parts) > 1:
        host = parts[0].rpartition(":")[0].strip("[]")
        options.append(("grpc.ssl_target_name_override", host))
    return options
