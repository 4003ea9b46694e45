"""The local stack's NATS configuration: each user's permissions, the authorization block, the cluster."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from authmesh._shared.events import LIVE_SUBJECTS, STREAM_NAME, STREAM_SUBJECTS
from authmesh._shared.nats_wiring import inbox_prefix
from authmesh._shared.tls import TlsFiles
from authmesh.processes import NatsCluster
from authmesh.stack_secrets import AUTH_NATS_USER, READER_NATS_USER, StackSecrets

# What each NATS user may do. Anything not allowed is refused, and the explicit denials keep the
# refusals visible even if an allow pattern is widened later (NATS: deny wins).
_STREAM = STREAM_NAME
AUTH_PUBLISH_ALLOW = (
    *STREAM_SUBJECTS,
    "$JS.API.INFO",
    "$JS.API.STREAM.NAMES",
    f"$JS.API.STREAM.INFO.{_STREAM}",
    f"$JS.API.STREAM.MSG.GET.{_STREAM}",
    f"$JS.API.DIRECT.GET.{_STREAM}",
    f"$JS.API.DIRECT.GET.{_STREAM}.>",
    # CREATE, UPDATE, DELETE and PURGE of this one stream.
    f"$JS.API.STREAM.*.{_STREAM}",
)
# A replica reads the stream's live copy (core NATS) and its history (direct gets): nothing it may send
# creates or changes anything on the server, so it cannot steer what another replica receives.
REPLICA_PUBLISH_ALLOW = (
    f"$JS.API.STREAM.INFO.{_STREAM}",
    f"$JS.API.DIRECT.GET.{_STREAM}",
)
REPLICA_PUBLISH_DENY = (
    *STREAM_SUBJECTS,
    *LIVE_SUBJECTS,
    "$JS.API.CONSUMER.>",
    "$JS.API.STREAM.CREATE.>",
    "$JS.API.STREAM.UPDATE.>",
    "$JS.API.STREAM.DELETE.>",
    "$JS.API.STREAM.PURGE.>",
    "$JS.API.STREAM.MSG.DELETE.>",
)


def own_inboxes(user: str) -> str:
    """The inboxes ``user`` alone may subscribe to: replies to its requests (see ``inbox_prefix``)."""
    return f"{inbox_prefix(user)}.>"


def _conf_list(values: Sequence[str], indent: int) -> str:
    pad = " " * indent
    return "[\n" + ",\n".join(f"{pad}  {json.dumps(value)}" for value in values) + f"\n{pad}]"


def _conf_user(
    name: str, password: str, allow: Sequence[str], deny: Sequence[str], subscribe: Sequence[str]
) -> str:
    publish = f"          allow: {_conf_list(allow, 10)}\n"
    if deny:
        publish += f"          deny: {_conf_list(deny, 10)}\n"
    return (
        "    {\n"
        f"      user: {json.dumps(name)}\n"
        f"      password: {password}\n"
        "      permissions: {\n"
        f"        publish: {{\n{publish}        }}\n"
        f"        subscribe: {{\n          allow: {_conf_list(subscribe, 10)}\n        }}\n"
        "      }\n"
        "    }\n"
    )


def nats_authorization(auth_password: str, replicas: Sequence[tuple[str, str]]) -> str:
    """The NATS ``authorization`` block: the ``auth`` user and one user per replica, with permissions.

    ``authmesh compose-env`` writes the same block, with its own passwords, for ``docker-compose.yml``.

    Args:
        auth_password: The ``auth`` user's password as a NATS configuration value (a quoted string).
        replicas: Each replica's user name (one subject token) and password, likewise.

    Returns:
        Configuration text.
    """
    users = _conf_user(AUTH_NATS_USER, auth_password, AUTH_PUBLISH_ALLOW, (), (own_inboxes(AUTH_NATS_USER),))
    for name, password in replicas:
        subscribe = (*LIVE_SUBJECTS, own_inboxes(name))
        users += _conf_user(name, password, REPLICA_PUBLISH_ALLOW, REPLICA_PUBLISH_DENY, subscribe)
    return "authorization {\n  users: [\n" + users + "  ]\n}\n"


def replica_names(count: int) -> list[str]:
    """The names of a stack's replicas, which are also their NATS users."""
    return [f"resource-{index + 1}" for index in range(count)]


def stack_nats_config(stack_secrets: StackSecrets, replicas: Sequence[str]) -> str:
    """The NATS configuration ``authmesh up`` runs with: the ``auth`` user, one per replica, ``reader``."""
    readers = [stack_secrets.nats_replica(name) for name in (*replicas, READER_NATS_USER)]
    return nats_authorization(
        json.dumps(stack_secrets.nats_auth.password),
        [(reader.username, json.dumps(reader.password)) for reader in readers],
    )


def stack_nats_cluster(
    data_dir: Path, stack_secrets: StackSecrets, config: str, *, size: int, tls: TlsFiles | None = None
) -> NatsCluster:
    """The stack's NATS cluster (not started): routes only for servers that know the route password.

    Args:
        data_dir: Where the nodes keep their files.
        stack_secrets: The route password's source.
        config: Configuration every node gets (users and permissions).
        size: How many nodes.
        tls: Clients and routes on TLS with this certificate and CA.
    """
    route = stack_secrets.nats_route
    return NatsCluster(
        data_dir,
        size=size,
        config_text=config,
        route_user=route.username,
        route_password=route.password,
        # Servers advertise their peers' client URLs, and a client reconnecting after a cut link would
        # reach a peer directly, around its link proxy.
        no_advertise=True,
        tls=tls,
    )
