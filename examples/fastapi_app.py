"""A FastAPI app protected by authmesh (``pip install authmesh[asgi] fastapi uvicorn``).

Run it against a stack (``authmesh up --env-file authmesh.env``)::

    set -a; . ./authmesh.env; set +a
    python examples/fastapi_app.py 127.0.0.1:8071

A missing or bad token is answered ``401`` with ``WWW-Authenticate: Bearer error="invalid_token"``, a
token without the scope ``403`` (``error="insufficient_scope"``), and ``503`` while the revocation state
is stale and the auth service cannot be asked instead.
"""

import sys
from contextlib import asynccontextmanager
from typing import Annotated

import uvicorn
from fastapi import Depends, FastAPI

from authmesh import AccessClaims, ResourceGuard
from authmesh.asgi import BearerAuth

guard = ResourceGuard.from_env()
bearer = BearerAuth(guard)
SignedIn = Annotated[AccessClaims, Depends(bearer.require())]
Reader = Annotated[AccessClaims, Depends(bearer.require(all_of={"docs:read"}))]


@asynccontextmanager
async def lifespan(app: FastAPI):
    async with guard:  # waits until the revocation state has caught up
        yield


app = FastAPI(lifespan=lifespan)


@app.get("/whoami")
async def whoami(claims: SignedIn) -> dict[str, str]:
    return {"subject": claims.sub, "session_id": claims.sid}


@app.get("/documents/{document_id}")
async def document(document_id: str, claims: Reader) -> dict[str, str]:
    return {"id": document_id, "owner": claims.sub, "body": "hello from FastAPI"}


if __name__ == "__main__":
    host, _, port = sys.argv[1].rpartition(":")
    uvicorn.run(app, host=host, port=int(port), log_level="warning")
