"""FastAPI and Starlette apps protected by a :class:`authmesh.ResourceGuard` (``pip install authmesh[asgi]``).

::

    from fastapi import Depends, FastAPI
    from authmesh import AccessClaims, ResourceGuard
    from authmesh.asgi import BearerAuth

    guard = ResourceGuard.from_env()
    bearer = BearerAuth(guard)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with guard:
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/whoami")
    async def whoami(claims: AccessClaims = Depends(bearer.require())) -> dict[str, str]:
        return {"subject": claims.sub}

Or, for every request but the open paths, as middleware (handlers read ``current_claims()``)::

    app.add_middleware(BearerAuthMiddleware, guard=guard, open_paths={"/healthz"})

See ``docs/integration.md``.
"""

from authmesh._shared.asgi import CLAIMS_SCOPE_KEY, BearerAuth, BearerAuthMiddleware, http_error

__all__ = ["CLAIMS_SCOPE_KEY", "BearerAuth", "BearerAuthMiddleware", "http_error"]
