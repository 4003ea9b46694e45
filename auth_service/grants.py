"""Which audience a token is for, what it may hold, and what a caller's token allows.

Two audiences keep administrative power away from resource services: ``admin`` and ``service`` exist only
in tokens for the auth service's own audience (``AUTHMESH_AUTH_AUDIENCE``), which no resource service
accepts, and resource scopes only in tokens for the resource audience (``AUTHMESH_AUDIENCE``). A
resource service that receives a token can therefore never replay it against the administrative API.
"""

from __future__ import annotations

from dataclasses import dataclass

from authmesh._shared.claims import AccessClaims
from authmesh._shared.errors import InsufficientScope, InvalidRequest, NotOwner, WrongAudience

ADMIN_SCOPE = "admin"
SERVICE_SCOPE = "service"
AUTH_SCOPES = frozenset({ADMIN_SCOPE, SERVICE_SCOPE})


@dataclass(frozen=True, slots=True)
class Grant:
    """The audience and scopes of the tokens of one session."""

    audience: str
    scopes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Audiences:
    """The two audiences an auth service mints for.

    Attributes:
        auth: The auth service's own API (scopes ``admin`` and ``service``).
        resource: Every resource service.
    """

    auth: str
    resource: str

    def grant(self, requested: tuple[str, ...], held: tuple[str, ...]) -> Grant:
        """What a Login gets: the requested scopes (all of them held), for one audience.

        Asking for no scope gets the user's resource scopes only: least privilege, never ``admin``.

        Raises:
            InvalidRequest: ``INVALID_SCOPE``: a scope the user does not hold, or auth and resource
                scopes asked for at once.
        """
        if not set(requested) <= set(held):
            raise InvalidRequest("a requested scope is not granted to this user", code="INVALID_SCOPE")
        auth = tuple(scope for scope in requested if scope in AUTH_SCOPES)
        if auth and len(auth) != len(requested):
            raise InvalidRequest(
                "admin and service scopes are for the auth audience: ask for them in a login of their own",
                code="INVALID_SCOPE",
            )
        if auth:
            return Grant(self.auth, auth)
        return Grant(self.resource, requested or tuple(s for s in held if s not in AUTH_SCOPES))

    def of_session(self, scopes: tuple[str, ...]) -> Grant:
        """The audience a session's tokens are for, from the scopes it was opened with."""
        auth = tuple(scope for scope in scopes if scope in AUTH_SCOPES)
        if auth:
            # A session opened before the audiences were split may mix both kinds: it keeps only the
            # auth scopes, never resource scopes in an auth token or admin in a resource token.
            return Grant(self.auth, auth)
        return Grant(self.resource, scopes)

    def require_auth_scope(self, caller: AccessClaims, *scopes: str) -> None:
        """The caller's token is for the auth audience and holds one of ``scopes``.

        Raises:
            WrongAudience: A resource token (whatever scopes it claims).
            InsufficientScope: None of ``scopes``.
        """
        if self.auth not in caller.aud:
            raise WrongAudience("this call needs a token for the auth audience")
        if not any(caller.has_scope(scope) for scope in scopes):
            raise InsufficientScope(" or ".join(scopes))

    def require_owner(self, caller: AccessClaims, owner_sub: str) -> None:
        """The caller acts on its own subject's token or session, or is an admin of the auth audience.

        Raises:
            NotOwner: Someone else's, and the caller is not such an admin.
        """
        if caller.sub == owner_sub:
            return
        if self.auth in caller.aud and caller.has_scope(ADMIN_SCOPE):
            return
        raise NotOwner()
