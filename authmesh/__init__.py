"""authmesh: verify authmesh tokens locally in any Python gRPC service, and learn of every revocation.

A service builds one :class:`ResourceGuard` (``ResourceGuard.from_env()``), adds
``guard.aio_interceptor(policy)`` to its ``grpc.aio`` server (or ``guard.sync_interceptor(policy)`` to a
sync ``grpc.server``), and enters the guard; handlers read :func:`current_claims`. The parts the guard
is built from (:class:`KeyCache`, :class:`Denylist`, :class:`RevocationConsumer`, :class:`TokenVerifier`,
:class:`Authenticator`) stay public for services that compose them differently. FastAPI and Starlette
apps use :mod:`authmesh.asgi` (the ``authmesh[asgi]`` extra).

A client logs in with a :class:`TokenSession` (``grpc.aio``) or a :class:`SyncTokenSession` (``grpc``),
whose channels attach and renew the access token; :func:`forward_token` passes a caller's token on
downstream; an :class:`AdminClient` makes the auth service's administrative calls.

Everything not listed in ``__all__`` is private: the modules under ``authmesh._shared``,
``authmesh._auth_service`` and ``authmesh._resource_service`` may change without notice.
"""

from authmesh._shared.admin_client import AdminClient
from authmesh._shared.auth_api import KeyRotation, Revocation, Tokens, TokenStatus, User
from authmesh._shared.auth_client import AuthClient
from authmesh._shared.claims import AccessClaims
from authmesh._shared.consumer import RevocationConsumer
from authmesh._shared.denylist import Denylist, SnapshotChunk
from authmesh._shared.dpop import DpopMode, NonceSource, ProofGate, ProofPolicy, ProofSigner, ProofVerifier
from authmesh._shared.errors import (
    AuthError,
    BadSignature,
    ConfigurationError,
    DpopKeyMismatch,
    DpopNonceRequired,
    DpopProofMissing,
    DpopProofReplayed,
    DpopRejected,
    EventRejected,
    InsufficientScope,
    InvalidClaim,
    InvalidRequest,
    KeyRevoked,
    MalformedToken,
    PermissionDenied,
    SessionEnded,
    TokenExpired,
    TokenMissing,
    TokenNotYetValid,
    TokenRejected,
    TokenRevoked,
    TokenTooLarge,
    Unavailable,
    UnknownKey,
    UnsupportedAlgorithm,
    WrongAudience,
    WrongIssuer,
    WrongTokenType,
)
from authmesh._shared.events import EventType, SecurityEvent, decode_event, encode_event
from authmesh._shared.forwarding import forward_token
from authmesh._shared.grpc_errors import bearer_token, error_reason, to_grpc_status
from authmesh._shared.guard import ResourceGuard
from authmesh._shared.interceptor import Authenticator, AuthInterceptor, SyncAuthInterceptor, current_claims
from authmesh._shared.key_cache import KeyCache
from authmesh._shared.metrics import ServiceMetrics
from authmesh._shared.scopes import AUTHENTICATED, ScopeRequirement
from authmesh._shared.session_rules import SessionOptions
from authmesh._shared.settings import AuthSettings, CommonSettings, ResourceSettings
from authmesh._shared.staleness import IntrospectionFallback, StalenessMonitor
from authmesh._shared.sync_token_session import SyncTokenSession
from authmesh._shared.token_session import TokenSession
from authmesh._shared.verifier import KeySource, NoRevocations, RevocationCheck, TokenVerifier, VerifierPolicy

__all__ = [
    "AUTHENTICATED",
    "AccessClaims",
    "AdminClient",
    "AuthClient",
    "AuthError",
    "AuthInterceptor",
    "AuthSettings",
    "Authenticator",
    "BadSignature",
    "CommonSettings",
    "ConfigurationError",
    "Denylist",
    "DpopKeyMismatch",
    "DpopMode",
    "DpopNonceRequired",
    "DpopProofMissing",
    "DpopProofReplayed",
    "DpopRejected",
    "EventRejected",
    "EventType",
    "InsufficientScope",
    "IntrospectionFallback",
    "InvalidClaim",
    "InvalidRequest",
    "KeyCache",
    "KeyRevoked",
    "KeyRotation",
    "KeySource",
    "MalformedToken",
    "NoRevocations",
    "NonceSource",
    "PermissionDenied",
    "ProofGate",
    "ProofPolicy",
    "ProofSigner",
    "ProofVerifier",
    "ResourceGuard",
    "ResourceSettings",
    "Revocation",
    "RevocationCheck",
    "RevocationConsumer",
    "ScopeRequirement",
    "SecurityEvent",
    "ServiceMetrics",
    "SessionEnded",
    "SessionOptions",
    "SnapshotChunk",
    "StalenessMonitor",
    "SyncAuthInterceptor",
    "SyncTokenSession",
    "TokenExpired",
    "TokenMissing",
    "TokenNotYetValid",
    "TokenRejected",
    "TokenRevoked",
    "TokenSession",
    "TokenStatus",
    "TokenTooLarge",
    "TokenVerifier",
    "Tokens",
    "Unavailable",
    "UnknownKey",
    "UnsupportedAlgorithm",
    "User",
    "VerifierPolicy",
    "WrongAudience",
    "WrongIssuer",
    "WrongTokenType",
    "bearer_token",
    "current_claims",
    "decode_event",
    "encode_event",
    "error_reason",
    "forward_token",
    "to_grpc_status",
]
