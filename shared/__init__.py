"""authmesh's shared library: what a Python gRPC service imports to verify authmesh tokens locally.

A service builds a :class:`KeyCache` (public keys from the auth service), a :class:`Denylist` fed by a
:class:`RevocationConsumer` (signed events from NATS JetStream), a :class:`TokenVerifier` over both, and
adds an :class:`AuthInterceptor` to its ``grpc.aio`` server; handlers read :func:`current_claims`.
``resource_service/app.py`` is the worked example. Everything not listed in ``__all__`` is private.
"""

from shared.auth_client import AuthClient
from shared.claims import AccessClaims
from shared.consumer import RevocationConsumer
from shared.denylist import Denylist, SnapshotChunk
from shared.errors import (
    AuthError,
    BadSignature,
    ConfigurationError,
    EventRejected,
    InsufficientScope,
    InvalidClaim,
    InvalidRequest,
    KeyRevoked,
    MalformedToken,
    PermissionDenied,
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
from shared.events import EventType, SecurityEvent, decode_event, encode_event
from shared.grpc_errors import bearer_token, error_reason, to_grpc_status
from shared.interceptor import Authenticator, AuthInterceptor, current_claims
from shared.key_cache import KeyCache
from shared.metrics import ServiceMetrics
from shared.settings import AuthSettings, CommonSettings, ResourceSettings
from shared.staleness import IntrospectionFallback, StalenessMonitor
from shared.verifier import KeySource, NoRevocations, RevocationCheck, TokenVerifier, VerifierPolicy

__all__ = [
    "AccessClaims",
    "AuthClient",
    "AuthError",
    "AuthInterceptor",
    "AuthSettings",
    "Authenticator",
    "BadSignature",
    "CommonSettings",
    "ConfigurationError",
    "Denylist",
    "EventRejected",
    "EventType",
    "InsufficientScope",
    "IntrospectionFallback",
    "InvalidClaim",
    "InvalidRequest",
    "KeyCache",
    "KeyRevoked",
    "KeySource",
    "MalformedToken",
    "NoRevocations",
    "PermissionDenied",
    "ResourceSettings",
    "RevocationCheck",
    "RevocationConsumer",
    "SecurityEvent",
    "ServiceMetrics",
    "SnapshotChunk",
    "StalenessMonitor",
    "TokenExpired",
    "TokenMissing",
    "TokenNotYetValid",
    "TokenRejected",
    "TokenRevoked",
    "TokenTooLarge",
    "TokenVerifier",
    "Unavailable",
    "UnknownKey",
    "UnsupportedAlgorithm",
    "VerifierPolicy",
    "WrongAudience",
    "WrongIssuer",
    "WrongTokenType",
    "bearer_token",
    "current_claims",
    "decode_event",
    "encode_event",
    "error_reason",
    "to_grpc_status",
]
