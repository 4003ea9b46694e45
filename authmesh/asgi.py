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

See ``docs/integration.md``.
"""

from authmesh._shared.asgi import BearerAuth, http_error

__all__ = ["BearerAuth", "http_error"]
