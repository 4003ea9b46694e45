"""The ``authmesh.auth.v1.AuthService`` gRPC edge: protobuf ↔ :class:`AuthCore`, errors → status codes."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import structlog

from authmesh._auth_service.core import AuthCore, IssuedTokens
from authmesh._auth_service.snapshot_chunks import snapshot_chunks
from authmesh._auth_service.store import RevocationResult
from authmesh._shared.certificate_identity import CertificateAccounts, peer_certificate_names
from authmesh._shared.dpop import LOGIN_METHOD, REFRESH_METHOD, DpopMode, ProofGate, proof_from_metadata
from authmesh._shared.errors import AuthError
from authmesh._shared.grpc_errors import abort_with_error, bearer_token
from authmesh.auth.v1 import auth_pb2, auth_pb2_grpc

Request = TypeVar("Request")
Response = TypeVar("Response")
Context = grpc.aio.ServicerContext[Any, Any]
_log = structlog.get_logger(__name__)


def unary(
    handler: Callable[[Any, Request, Context], Awaitable[Response]],
) -> Callable[[Any, Request, Context], Awaitable[Response]]:
    """Map our errors to their status codes; anything else is a bug, logged.

    Store and broker failures arrive here already translated (and logged) where they happen.
    """

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Request, context: Context) -> Response:
        try:
            return await handler(self, request, context)
        except AuthError as error:
            await abort_with_error(context, error)
        except Exception:
            _log.exception("unexpected error", method=handler.__name__)
            raise

    return wrapper


def _pair(tokens: IssuedTokens) -> auth_pb2.TokenPair:
    return auth_pb2.TokenPair(
        access_token=tokens.access_token,
        refresh_token=tokens.refresh_token,
        token_type="DPoP" if tokens.jkt is not None else "Bearer",
        expires_in=tokens.expires_in,
        refresh_expires_in=tokens.refresh_expires_in,
        session_id=tokens.session_id,
        scope=" ".join(tokens.scopes),
    )


def _revoked(result: RevocationResult) -> auth_pb2.RevokeResponse:
    return auth_pb2.RevokeResponse(revoked_at_unix_ms=result.revoked_at_ms, event_id=result.event_id)


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    """gRPC handlers.

    Args:
        core: The service's behaviour.
        dpop: Which DPoP proofs Login and Refresh take (bearer only when None).
        certificate_accounts: Which accounts may log in by verified client certificate (none when
            None or empty: a ``Login`` without a password is then a malformed request, as ever).
    """

    def __init__(
        self,
        core: AuthCore,
        dpop: ProofGate | None = None,
        certificate_accounts: CertificateAccounts | None = None,
    ) -> None:
        self._core = core
        self._dpop = dpop if dpop is not None else ProofGate(DpopMode.OFF, None)
        self._certificate_accounts = certificate_accounts or CertificateAccounts()

    def _proven_key(self, context: Context, method: str) -> str | None:
        proof = proof_from_metadata(context.invocation_metadata())
        return self._dpop.proven_key(proof, method, dpop_scheme=proof is not None)

    async def _caller(self, context: Context) -> Any:
        return await self._core.authenticate(bearer_token(context.invocation_metadata()))

    @unary
    async def Login(self, request: auth_pb2.LoginRequest, context: Context) -> auth_pb2.TokenPair:
        """Check a password, or with none the connection's client certificate, and open a session
        (bound to the key of a DPoP proof, when one comes)."""
        jkt = self._proven_key(context, LOGIN_METHOD)
        scopes = list(request.scopes)
        if not request.password and self._certificate_accounts.by_name:
            names = peer_certificate_names(context.auth_context(), context.peer_identities())
            certified = self._certificate_accounts.allows(request.username, names)
            return _pair(
                await self._core.certificate_login(request.username, scopes, certified=certified, jkt=jkt)
            )
        return _pair(await self._core.login(request.username, request.password, scopes, jkt=jkt))

    @unary
    async def Refresh(self, request: auth_pb2.RefreshRequest, context: Context) -> auth_pb2.TokenPair:
        """Rotate a refresh token (a bound session's needs a proof of its key)."""
        jkt = self._proven_key(context, REFRESH_METHOD)
        return _pair(await self._core.refresh(request.refresh_token, jkt=jkt))

    @unary
    async def Logout(self, request: auth_pb2.LogoutRequest, context: Context) -> auth_pb2.RevokeResponse:
        """Revoke the refresh token's session."""
        return _revoked(await self._core.logout(request.refresh_token))

    @unary
    async def RevokeToken(
        self, request: auth_pb2.RevokeTokenRequest, context: Context
    ) -> auth_pb2.RevokeResponse:
        """Revoke an access token or a refresh token's session."""
        caller = await self._caller(context)
        return _revoked(await self._core.revoke_token(caller, request.token, request.reason))

    @unary
    async def RevokeSession(
        self, request: auth_pb2.RevokeSessionRequest, context: Context
    ) -> auth_pb2.RevokeResponse:
        """Revoke a session."""
        caller = await self._caller(context)
        return _revoked(await self._core.revoke_session(caller, request.session_id, request.reason))

    @unary
    async def RevokeUser(
        self, request: auth_pb2.RevokeUserRequest, context: Context
    ) -> auth_pb2.RevokeResponse:
        """Revoke a user."""
        caller = await self._caller(context)
        return _revoked(await self._core.revoke_user(caller, request.subject, request.reason))

    @unary
    async def RevokeKeyBinding(
        self, request: auth_pb2.RevokeKeyBindingRequest, context: Context
    ) -> auth_pb2.RevokeResponse:
        """Revoke a DPoP key binding (admin)."""
        caller = await self._caller(context)
        return _revoked(await self._core.revoke_key_binding(caller, request.jkt, request.reason))

    @unary
    async def DisableUser(
        self, request: auth_pb2.DisableUserRequest, context: Context
    ) -> auth_pb2.RevokeResponse:
        """Disable an account and revoke every session of it."""
        caller = await self._caller(context)
        return _revoked(await self._core.disable_user(caller, request.subject, request.reason))

    @unary
    async def EnableUser(
        self, request: auth_pb2.EnableUserRequest, context: Context
    ) -> auth_pb2.EnableUserResponse:
        """Let a disabled account log in again."""
        caller = await self._caller(context)
        await self._core.enable_user(caller, request.subject)
        return auth_pb2.EnableUserResponse()

    @unary
    async def RotateSigningKey(
        self, request: auth_pb2.RotateSigningKeyRequest, context: Context
    ) -> auth_pb2.RotateSigningKeyResponse:
        """Rotate the signing key."""
        caller = await self._caller(context)
        kid, previous_kid = await self._core.rotate_signing_key(
            caller, request.retire_previous, request.request_id
        )
        return auth_pb2.RotateSigningKeyResponse(kid=kid, previous_kid=previous_kid)

    @unary
    async def GetJwks(self, request: auth_pb2.GetJwksRequest, context: Context) -> auth_pb2.GetJwksResponse:
        """The public keys."""
        return auth_pb2.GetJwksResponse(jwks_json=await self._core.jwks())

    @unary
    async def Introspect(
        self, request: auth_pb2.IntrospectRequest, context: Context
    ) -> auth_pb2.IntrospectResponse:
        """RFC 7662-style introspection."""
        caller = await self._caller(context)
        answer = await self._core.introspect(caller, request.token)
        if not answer.active or answer.claims is None:
            return auth_pb2.IntrospectResponse(active=False, inactive_reason=answer.inactive_reason)
        claims = answer.claims
        return auth_pb2.IntrospectResponse(
            active=True,
            subject=claims.sub,
            scope=claims.scope,
            session_id=claims.sid,
            token_id=claims.jti,
            expires_at=claims.exp,
            issued_at=claims.iat,
        )

    @unary
    async def CreateUser(
        self, request: auth_pb2.CreateUserRequest, context: Context
    ) -> auth_pb2.CreateUserResponse:
        """Add a user."""
        caller = await self._caller(context)
        subject = await self._core.create_user(
            caller, request.username, request.password, list(request.scopes)
        )
        return auth_pb2.CreateUserResponse(subject=subject)

    @unary
    async def ListUsers(
        self, request: auth_pb2.ListUsersRequest, context: Context
    ) -> auth_pb2.ListUsersResponse:
        """One page of users."""
        caller = await self._caller(context)
        users, next_page_token = await self._core.list_users(
            caller, request.page_size, request.page_token, request.username_prefix
        )
        return auth_pb2.ListUsersResponse(
            users=[
                auth_pb2.User(
                    username=user.username,
                    subject=user.sub,
                    scopes=list(user.scopes),
                    created_at_unix_ms=user.created_ms,
                    disabled=disabled,
                )
                for user, disabled in users
            ],
            next_page_token=next_page_token,
        )

    async def SnapshotRevocations(
        self, request: auth_pb2.SnapshotRevocationsRequest, context: Context
    ) -> AsyncIterator[auth_pb2.RevocationSnapshotChunk]:
        """Every revocation in force, in chunks of bounded size; each carries the stream sequence."""
        try:
            caller = await self._caller(context)
            snapshot, sequence = await self._core.snapshot(caller)
        except AuthError as error:
            await abort_with_error(context, error)
        except Exception:
            _log.exception("unexpected error", method="SnapshotRevocations")
            raise
        for chunk in snapshot_chunks(snapshot, sequence):
            yield chunk
