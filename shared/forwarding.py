"""Passing a caller's bearer token on to a downstream call, from inside a protected handler."""

from __future__ import annotations

from typing import Any

import grpc

from authmesh._shared.errors import TokenMissing
from authmesh._shared.grpc_errors import bearer_token
from authmesh._shared.session_rules import AUTHORIZATION


def forward_token(
    context: grpc.ServicerContext | grpc.aio.ServicerContext[Any, Any],
) -> tuple[tuple[str, str]]:
    """The caller's bearer token as metadata for a downstream call, from inside a protected handler.

    The downstream service must accept the same audience (it is the caller's token, unchanged); its
    own verification and revocation checks apply as they did here.

    Args:
        context: The handler's servicer context (sync or ``grpc.aio``).

    Returns:
        Metadata to pass as ``metadata=`` to the downstream call.

    Raises:
        TokenMissing: The call carried no bearer token (an open method, say).
    """
    token = bearer_token(context.invocation_metadata())
    if token is None:
        raise TokenMissing("no bearer token to forward")
    return ((AUTHORIZATION, f"Bearer {token}"),)
