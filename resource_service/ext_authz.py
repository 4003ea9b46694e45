"""Envoy's external authorization (``envoy.service.auth.v3.Authorization/Check``) over a replica's verifier.

Envoy's ``ext_authz`` filter asks before every request it guards. The answer comes from the same
:class:`~authmesh._shared.interceptor.Authenticator` a replica's interceptor uses (local signature check
from the verified-token cache, denylist, staleness and the ``Introspect`` fallback), so a revoked token
is refused at the gateway as fast as at any replica:

- allowed: gRPC status OK, and the upstream request gets the verified identity as
  ``x-authmesh-subject``, ``x-authmesh-scopes`` (space-separated), ``x-authmesh-session-id`` and
  ``x-authmesh-token-id``, each overwriting whatever the client sent under that name;
- a DPoP-bound token (RFC 9449) comes as ``authorization: DPoP …`` with a ``dpop`` proof header whose
  ``htm`` is the request's method and whose ``htu`` is one of the server's ``AUTHMESH_DPOP_ORIGINS``
  (the gateway's public origin) followed by the request's path without the query; a refused proof
  answers 401 with ``WWW-Authenticate: DPoP error="invalid_dpop_proof"``;
- refused: 401 with ``WWW-Authenticate: Bearer error="invalid_token"``, 403 with
  ``error="insufficient_scope"``, 503 when the revocation state is stale and the fallback fails
  (:mod:`authmesh._shared.http_errors`).

A route's required scopes come from the filter's ``context_extensions`` key ``authmesh_scopes``
(space-separated, all required), so one server answers for many routes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import grpc
from google.rpc import code_pb2

from authmesh._shared.claims import AccessClaims
from authmesh._shared.errors import AuthError, InsufficientScope
from authmesh._shared.grpc_errors import status_code_for
from authmesh._shared.grpc_handlers import BoundedCache
from authmesh._shared.http_errors import http_refusal
from authmesh._shared.interceptor import TokenAuthenticator, presented_credentials
from authmesh.envoy.auth.v3 import external_auth_pb2 as ext_authz

# Envoy's names, served by a generic handler: no descriptor in this process claims them, so Envoy's own
# definitions (the ``xds-protos`` wheel) can be loaded beside authmesh.
SERVICE_NAME = "envoy.service.auth.v3.Authorization"
CHECK_METHOD = f"/{SERVICE_NAME}/Check"
SCOPES_CONTEXT_KEY = "authmesh_scopes"
SUBJECT_HEADER = "x-authmesh-subject"
SCOPES_HEADER = "x-authmesh-scopes"
SESSION_HEADER = "x-authmesh-session-id"
TOKEN_ID_HEADER = "x-authmesh-token-id"
IDENTITY_HEADERS = (SUBJECT_HEADER, SCOPES_HEADER, SESSION_HEADER, TOKEN_ID_HEADER)

_OVERWRITE = ext_authz.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_OK_STATUS = ext_authz.Status(code=code_pb2.OK)


def required_scopes(request: ext_authz.CheckRequest) -> tuple[str, ...]:
    """The scopes the route demands (``context_extensions["authmesh_scopes"]``)."""
    return tuple(request.attributes.context_extensions.get(SCOPES_CONTEXT_KEY, "").split())


def request_path(path: str) -> str:
    """The path a proof's ``htu`` names: Envoy's ``:path`` without its query or fragment."""
    return path.partition("?")[0].partition("#")[0]


def allowed(claims: AccessClaims) -> ext_authz.CheckResponse:
    """The OK answer: the verified identity as headers that replace any the client sent."""
    values = (claims.sub, claims.scope, claims.sid, claims.jti)
    return ext_authz.CheckResponse(
        status=_OK_STATUS,
        ok_response=ext_authz.OkHttpResponse(
            headers=_overwriting(zip(IDENTITY_HEADERS, values, strict=True))
        ),
    )


def refused(error: AuthError) -> ext_authz.CheckResponse:
    """The refusal Envoy sends to the client: status, ``WWW-Authenticate`` and a JSON body."""
    refusal = http_refusal(error)
    headers = [*refusal.headers, ("content-type", "application/json")]
    return ext_authz.CheckResponse(
        status=ext_authz.Status(code=status_code_for(error).value[0], message=error.message),
        denied_response=ext_authz.DeniedHttpResponse(
            status=ext_authz.HttpStatus(code=refusal.status),
            headers=_overwriting(headers),
            body=json.dumps(refusal.body()),
        ),
    )


def _overwriting(headers: Iterable[tuple[str, str]]) -> list[ext_authz.HeaderValueOption]:
    """Header options that replace any header of the same name (a client's forgery included)."""
    return [
        ext_authz.HeaderValueOption(
            header=ext_authz.HeaderValue(key=name, value=value), append_action=_OVERWRITE
        )
        for name, value in headers
    ]


class ExtAuthzServicer:
    """Answers Envoy's ``Check`` from the local verifier.

    Args:
        authenticator: The replica's decision about a bearer token.
    """

    def __init__(self, authenticator: TokenAuthenticator) -> None:
        self._authenticator = authenticator
        # A refusal depends only on the error's class, code and message: built once each, since a
        # refused token is the path an attacker can drive at will.
        self._refusals: BoundedCache[tuple[type[AuthError], str, str], ext_authz.CheckResponse] = (
            BoundedCache()
        )

    async def Check(
        self, request: ext_authz.CheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ext_authz.CheckResponse:
        """Allow or refuse one request Envoy is about to forward."""
        http = request.attributes.request.http
        try:
            token, dpop_scheme, proof = presented_credentials(
                [(name, value) for name, value in http.headers.items() if name in ("authorization", "dpop")]
            )
            claims = await self._authenticator.authenticate(
                token, dpop_scheme=dpop_scheme, proof=proof, method=request_path(http.path), htm=http.method
            )
            for scope in required_scopes(request):
                if not claims.has_scope(scope):
                    raise InsufficientScope(scope)
        except AuthError as error:
            return self._refused(error)
        return allowed(claims)

    def _refused(self, error: AuthError) -> ext_authz.CheckResponse:
        key = (type(error), error.code, error.message)
        answer = self._refusals.get(key)
        if answer is None:
            answer = self._refusals.keep(key, refused(error))
        return answer


def add_ext_authz_to_server(servicer: ExtAuthzServicer, server: grpc.aio.Server) -> None:
    """Serve ``servicer.Check`` at Envoy's method path."""
    check = grpc.unary_unary_rpc_method_handler(
        servicer.Check,
        request_deserializer=ext_authz.CheckRequest.FromString,
        response_serializer=ext_authz.CheckResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {"Check": check}),))
