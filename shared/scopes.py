"""What a call needs beyond a valid token: a scope requirement per method, and the policy that lists them.

A policy is a map from full gRPC method name (``/pkg.Service/Method``) to a :class:`ScopeRequirement`.
It fails closed twice over: a method the policy does not list is refused (``PERMISSION_DENIED``,
``METHOD_NOT_IN_POLICY``), and a policy that names a method no registered protobuf service has is a
:class:`~authmesh._shared.errors.ConfigurationError` when the interceptor is built, so a misspelt name
can never mean "any valid token".
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from google.protobuf import descriptor_pool

from authmesh._shared.claims import AccessClaims
from authmesh._shared.errors import ConfigurationError, InsufficientScope, PermissionDenied

METHOD_NOT_IN_POLICY = "METHOD_NOT_IN_POLICY"
# Methods of these services never need a token: load balancers and tools call them unauthenticated.
OPEN_SERVICE_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


@dataclass(frozen=True, slots=True)
class ScopeRequirement:
    """The scopes a token must hold: every one of ``all_of`` and at least one of ``any_of`` (when given).

    ``ScopeRequirement()`` asks for a valid token and nothing more.

    Attributes:
        all_of: Scopes the token must all hold.
        any_of: Scopes of which the token must hold at least one; empty means no such condition.
    """

    all_of: frozenset[str] = frozenset()
    any_of: frozenset[str] = frozenset()

    def __init__(self, *, all_of: Iterable[str] = (), any_of: Iterable[str] = ()) -> None:
        object.__setattr__(self, "all_of", frozenset(all_of))
        object.__setattr__(self, "any_of", frozenset(any_of))

    def check(self, claims: AccessClaims) -> None:
        """Raise unless ``claims`` meet the requirement.

        Raises:
            InsufficientScope: Naming the scope (or the choice of scopes) that was missing.
        """
        granted = claims.scopes
        for scope in self.all_of:
            if scope not in granted:
                raise InsufficientScope(scope)
        if self.any_of and not any(scope in granted for scope in self.any_of):
            raise InsufficientScope(" or ".join(sorted(self.any_of)))


AUTHENTICATED = ScopeRequirement()
"""Any valid token."""


class AccessPolicy:
    """Which methods are open, and what each of the others needs.

    Args:
        methods: Full method name (``/pkg.Service/Method``) → what it needs. When given, a method it does
            not list is refused, and every method it names must exist (checked here). None: every
            method that is not open needs a valid token and no particular scope.
        open_methods: Full method names that need no token.
        open_prefixes: Method-name prefixes that need no token (health and reflection by default).

    Raises:
        ConfigurationError: ``methods`` names a method no loaded service has.
    """

    def __init__(
        self,
        methods: Mapping[str, ScopeRequirement] | None = None,
        *,
        open_methods: Collection[str] = (),
        open_prefixes: tuple[str, ...] = OPEN_SERVICE_PREFIXES,
    ) -> None:
        if methods is not None:
            check_policy_methods(methods)
        self._methods = dict(methods) if methods is not None else None
        self._open = frozenset(open_methods)
        self._open_prefixes = open_prefixes

    def is_open(self, method: str) -> bool:
        """Whether ``method`` needs no token at all."""
        return method in self._open or method.startswith(self._open_prefixes)

    def requirement(self, method: str) -> ScopeRequirement:
        """What ``method`` needs.

        Raises:
            PermissionDenied: Methods are listed and ``method`` is not among them.
        """
        if self._methods is None:
            return AUTHENTICATED
        requirement = self._methods.get(method)
        if requirement is None:
            raise PermissionDenied(f"method {method} is not in the access policy", code=METHOD_NOT_IN_POLICY)
        return requirement


def check_policy_methods(policy: Mapping[str, ScopeRequirement]) -> None:
    """Make sure every method a policy names exists in a protobuf service this process has loaded.

    Raises:
        ConfigurationError: A name is not ``/package.Service/Method``, or no loaded service has it.
    """
    pool = descriptor_pool.Default()
    for method in policy:
        service_name, _, method_name = method.removeprefix("/").partition("/")
        if not method.startswith("/") or not service_name or not method_name or "/" in method_name:
            raise ConfigurationError(
                f"policy key {method!r} is not a full method name (/package.Service/Method)"
            )
        try:
            service = pool.FindServiceByName(service_name)
        except KeyError:
            raise ConfigurationError(
                f"the policy names {method}, but no service {service_name} is loaded "
                "(import its generated _pb2 module first)"
            ) from None
        if method_name not in service.methods_by_name:
            known = ", ".join(sorted(service.methods_by_name))
            raise ConfigurationError(
                f"the policy names {method}, but {service_name} has no method {method_name} (it has: {known})"
            )
