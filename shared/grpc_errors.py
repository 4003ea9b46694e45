"""The gRPC edge of the error hierarchy: one table from error class to status code, ErrorInfo details."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from authmesh._shared.errors import (
    AlreadyExists,
    AuthError,
    ConfigurationError,
    DpopNonceRequired,
    EventRejected,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RateLimited,
    StoreError,
    TokenRejected,
    Unavailable,
)

ERROR_DOMAIN = "authmesh"
# RFC 9449 §8: the nonce a client must put in its next proof (HTTP's DPoP-Nonce header).
DPOP_NONCE_METADATA_KEY = "dpop-nonce"
# A longer wait than this in a RATE_LIMITED answer is taken as a garbled one.
_MAX_RETRY_AFTER_SECONDS = 3600.0

# Most specific first: the first class an error is an instance of decides.
STATUS_BY_ERROR: tuple[tuple[type[AuthError], grpc.StatusCode], ...] = (
    (TokenRejected, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (RateLimited, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (StoreError, grpc.StatusCode.INTERNAL),
    (EventRejected, grpc.StatusCode.INTERNAL),
    (ConfigurationError, grpc.StatusCode.INTERNAL),
)


def status_code_for(error: AuthError) -> grpc.StatusCode:
    """The gRPC status code for an error."""
    for kind, code in STATUS_BY_ERROR:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def to_grpc_status(error: AuthError) -> grpc.Status:
    """A gRPC status carrying ``google.rpc.Status`` with ``ErrorInfo{reason, domain}``."""
    code = status_code_for(error)
    metadata: dict[str, str] = {}
    if isinstance(error, RateLimited):
        metadata["retry_after_seconds"] = f"{error.retry_after:.0f}"
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=error.code, domain=ERROR_DOMAIN, metadata=metadata))
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=error.message, details=[detail])
    grpc_status: grpc.Status = rpc_status.to_status(status)
    if isinstance(error, DpopNonceRequired):
        return _with_trailer(grpc_status, (DPOP_NONCE_METADATA_KEY, error.nonce))
    return grpc_status


def _with_trailer(status: grpc.Status, entry: tuple[str, str]) -> grpc.Status:
    # rpc_status's Status is a namedtuple: the same status with one more trailing entry.
    extended: grpc.Status = status._replace(  # type: ignore[attr-defined]
        trailing_metadata=(*status.trailing_metadata, entry)
    )
    return extended


async def abort_with_error(context: grpc.aio.ServicerContext[object, object], error: AuthError) -> NoReturn:
    """End the call with the error's status and details."""
    status = to_grpc_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


def error_reason(call_error: grpc.aio.AioRpcError | grpc.RpcError) -> str | None:
    """The ``ErrorInfo.reason`` a failed call carried, if any (for clients and tests)."""
    info = _error_info(call_error)
    return None if info is None else str(info.reason)


def retry_after(call_error: grpc.aio.AioRpcError | grpc.RpcError) -> float | None:
    """The seconds a ``RATE_LIMITED`` answer asks the caller to wait, if it says (1 s to an hour)."""
    info = _error_info(call_error)
    if info is None or "retry_after_seconds" not in info.metadata:
        return None
    try:
        seconds = float(info.metadata["retry_after_seconds"])
    except ValueError:
        return None
    # A garbled value (NaN, inf, negative) must neither hammer nor wait forever.
    return min(max(seconds, 1.0), _MAX_RETRY_AFTER_SECONDS) if seconds == seconds else None


def _error_info(call_error: grpc.aio.AioRpcError | grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    status = rpc_status.from_call(call_error)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the first ``authorization: Bearer …`` metadata entry, or None."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def presented_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[str, bool] | None:
    """The token of the first ``authorization: Bearer …`` or ``authorization: DPoP …`` entry, or None.

    Returns:
        The token, and whether it came under the DPoP scheme (RFC 9449 §7.1).
    """
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            scheme = scheme.lower()
            if scheme in ("bearer", "dpop") and token.strip():
                return token.strip(), scheme == "dpop"
    return None
