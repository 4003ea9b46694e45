"""authmesh.asgi: a FastAPI app under uvicorn, protected by a ResourceGuard against the real auth service.

No ``from __future__ import annotations`` here: FastAPI reads the handlers' annotations at run time, and
they name aliases local to the app's factory.
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import aiohttp
import uvicorn
from fastapi import Depends, FastAPI

from authmesh import (
    AccessClaims,
    DpopMode,
    ProofGate,
    ProofPolicy,
    ProofSigner,
    ProofVerifier,
    ResourceGuard,
    ScopeRequirement,
    current_claims,
)
from authmesh._shared.dpop import LOGIN_METHOD
from authmesh.asgi import BearerAuth, BearerAuthMiddleware
from authmesh.auth.v1 import auth_pb2
from authmesh.processes import free_ports
from tests.auth_support import SERVICE, AuthClient, auth_settings, bearer, running_auth
from tests.waiting import eventually

START_SECONDS = 10.0


def protected_app(guard: ResourceGuard) -> FastAPI:
    protect = BearerAuth(guard)
    signed_in = Annotated[AccessClaims, Depends(protect.require())]
    reader = Annotated[AccessClaims, Depends(protect.require(any_of={"docs:read", "docs:admin"}))]
    app = FastAPI()

    @app.get("/whoami")
    async def whoami(claims: signed_in) -> dict[str, str]:
        assert current_claims() is claims  # the handler's task sees them too
        return {"subject": claims.sub, "session": claims.sid}

    @app.get("/documents/{document_id}")
    def document(document_id: str, claims: reader) -> dict[str, str]:
        return {"id": document_id, "reader": claims.sub}

    return app


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[str]:
    (port,) = free_ports(1)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.get_running_loop().create_task(server.serve())
    try:
        async with asyncio.timeout(START_SECONDS):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def get(
    url: str, token: str | None = None, *, scheme: str = "Bearer", proof: str | None = None
) -> tuple[int, dict[str, str], Any]:
    headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
    if proof is not None:
        headers["DPoP"] = proof
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        text = await response.text()
        body = json.loads(text) if response.content_type == "application/json" else text
        return response.status, {name.lower(): value for name, value in response.headers.items()}, body


async def login_user(client: AuthClient, scopes: tuple[str, ...]) -> Any:
    name = f"web-{time.monotonic_ns()}"
    await client.create_user(name, "password-of-a-user-1", scopes)
    return await client.login(name, "password-of-a-user-1")


async def test_a_fastapi_app_answers_401_403_and_hears_a_revocation(redis_url: str, nats_url: str) -> None:
    async with running_auth(auth_settings(redis_url, [nats_url])) as (auth, client):
        guard = ResourceGuard(
            auth_target=auth.grpc_address,
            auth_url=f"http://{auth.http_address}",
            nats_urls=[nats_url],
            service_account=SERVICE,
        )
        async with guard, serving(protected_app(guard)) as base:
            reader, other = await login_user(client, ("docs:read",)), await login_user(client, ())

            status, headers, body = await get(f"{base}/whoami", reader.access_token)
            assert (status, body["session"]) == (200, reader.session_id)
            status, headers, _ = await get(f"{base}/whoami")
            assert (status, headers["www-authenticate"]) == (401, "Bearer")
            status, headers, _ = await get(f"{base}/whoami", "not-a-token")
            assert status == 401
            assert headers["www-authenticate"].startswith('Bearer error="invalid_token", error_description=')
            status, headers, _ = await get(f"{base}/documents/doc-1", other.access_token)
            assert status == 403
            assert 'error="insufficient_scope"' in headers["www-authenticate"]
            assert (await get(f"{base}/documents/doc-1", reader.access_token))[0] == 200

            await client.stub.RevokeSession(
                auth_pb2.RevokeSessionRequest(session_id=reader.session_id),
                metadata=bearer(reader.access_token),
                timeout=10,
            )

            async def refused() -> bool:
                status, _, body = await get(f"{base}/whoami", reader.access_token)
                return status == 401 and "SESSION_REVOKED" in str(body)

            await eventually(refused, within=10, what="the revocation to reach the FastAPI app")


async def test_a_fastapi_app_answers_503_while_stale_without_a_fallback(
    redis_url: str, nats_url: str
) -> None:
    async with running_auth(auth_settings(redis_url, [nats_url])) as (auth, client):
        # No service account, so no Introspect; a bound far below the heartbeat period keeps it stale.
        guard = ResourceGuard(
            auth_target=auth.grpc_address,
            auth_url=f"http://{auth.http_address}",
            nats_urls=[nats_url],
            staleness_bound=0.01,
        )
        async with guard, serving(protected_app(guard)) as base:
            token = (await login_user(client, ())).access_token

            async def unavailable() -> bool:
                status, headers, body = await get(f"{base}/whoami", token)
                return (
                    status == 503
                    and headers.get("retry-after") == "1"
                    and "REVOCATION_STATE_STALE" in str(body)
                )

            await eventually(unavailable, within=10, what="a 503 while the revocation state is stale")


def middleware_app(guard: ResourceGuard) -> FastAPI:
    app = FastAPI()
    app.add_middleware(
        BearerAuthMiddleware,
        guard=guard,
        requirement=ScopeRequirement(any_of={"docs:read", "docs:admin"}),
        open_paths={"/healthz"},
    )
    protect = BearerAuth(guard)
    writer = Annotated[AccessClaims, Depends(protect.require(all_of={"docs:write"}))]

    @app.get("/whoami")
    async def whoami() -> dict[str, str]:
        return {"subject": current_claims().sub}

    @app.get("/write")
    async def write(claims: writer) -> dict[str, str]:
        return {"subject": claims.sub}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "serving"}

    return app


async def test_the_middleware_protects_every_path_but_the_open_ones(redis_url: str, nats_url: str) -> None:
    async with running_auth(auth_settings(redis_url, [nats_url])) as (auth, client):
        guard = ResourceGuard(
            auth_target=auth.grpc_address,
            auth_url=f"http://{auth.http_address}",
            nats_urls=[nats_url],
            service_account=SERVICE,
        )
        async with guard, serving(middleware_app(guard)) as base:
            reader, other = await login_user(client, ("docs:read",)), await login_user(client, ())
            assert (await get(f"{base}/healthz"))[0] == 200
            status, headers, _ = await get(f"{base}/whoami")
            assert (status, headers["www-authenticate"]) == (401, "Bearer")
            status, headers, body = await get(f"{base}/whoami", "not-a-token")
            assert status == 401
            assert headers["www-authenticate"].startswith('Bearer error="invalid_token"')
            assert (await get(f"{base}/whoami", other.access_token))[0] == 403
            status, _, body = await get(f"{base}/whoami", reader.access_token)
            assert status == 200
            assert body["subject"]
            # A route's own requirement is checked on the claims the middleware verified.
            status, headers, _ = await get(f"{base}/write", reader.access_token)
            assert (status, 'scope="docs:write"' in headers["www-authenticate"]) == (403, True)


async def test_dpop_proofs_name_the_request_method_and_url(redis_url: str, nats_url: str) -> None:
    (port,) = free_ports(1)
    auth_origin = f"http://127.0.0.1:{port}"
    async with running_auth(auth_settings(redis_url, [nats_url], grpc_listen=f"127.0.0.1:{port}")) as (
        auth,
        client,
    ):
        await client.create_user("web-dpop", "password-of-a-user-1", ("docs:read",))
        signer = ProofSigner()
        pair = await client.stub.Login(
            auth_pb2.LoginRequest(username="web-dpop", password="password-of-a-user-1"),
            metadata=(("dpop", signer.proof(auth_origin, LOGIN_METHOD)),),
            timeout=10,
        )
        token, origin = pair.access_token, "http://docs.test"  # the name the service is configured with
        guard = ResourceGuard(
            auth_target=auth.grpc_address,
            auth_url=f"http://{auth.http_address}",
            nats_urls=[nats_url],
            service_account=SERVICE,
            dpop=ProofGate(DpopMode.ACCEPT, ProofVerifier(ProofPolicy(origins=(origin,)))),
        )
        async with (
            guard,
            serving(protected_app(guard)) as dependency,
            serving(middleware_app(guard)) as middleware,
        ):
            for base in (dependency, middleware):
                proof = signer.proof(origin, "/whoami", access_token=token, htm="GET")
                # The query is not part of htu.
                status, _, body = await get(f"{base}/whoami?page=2", token, scheme="DPoP", proof=proof)
                assert status == 200
                assert body["subject"]
                status, headers, body = await get(f"{base}/whoami", token, scheme="DPoP", proof=proof)
                assert (status, "DPOP_PROOF_REPLAYED" in str(body)) == (401, True)
                assert headers["www-authenticate"].startswith('DPoP error="invalid_dpop_proof"')
                for wrong in (
                    signer.proof(origin, "/whoami", access_token=token),  # htm POST
                    signer.proof(origin, "/documents/doc-1", access_token=token, htm="GET"),
                    signer.proof("http://elsewhere.test", "/whoami", access_token=token, htm="GET"),
                ):
                    status, _, body = await get(f"{base}/whoami", token, scheme="DPoP", proof=wrong)
                    assert (status, "DPOP_PROOF_INVALID" in str(body)) == (401, True), body
                stolen = ProofSigner().proof(origin, "/whoami", access_token=token, htm="GET")
                status, _, body = await get(f"{base}/whoami", token, scheme="DPoP", proof=stolen)
                assert (status, "DPOP_KEY_MISMATCH" in str(body)) == (401, True)
                status, _, body = await get(f"{base}/whoami", token)  # a bound token as a bearer token
                assert (status, "DPOP_PROOF_MISSING" in str(body)) == (401, True)
