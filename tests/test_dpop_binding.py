"""Binding at issue (RFC 9449 §5): Login and Refresh with a DPoP proof, against a real auth service."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest_asyncio

from authmesh._auth_service.app import AuthApp
from authmesh._shared.claims import AccessClaims
from authmesh._shared.dpop import LOGIN_METHOD, REFRESH_METHOD, ProofSigner
from authmesh._shared.jose import decode_compact
from authmesh.auth.v1 import auth_pb2
from authmesh.processes import free_port
from tests.auth_support import AuthClient, auth_settings, bearer, expect_error, running_auth

USER = ("dana", "dana-password-1")


@pytest_asyncio.fixture(loop_scope="session")
async def auth(redis_url: str, nats_url: str) -> AsyncIterator[tuple[AuthApp, AuthClient, str]]:
    """An auth service that takes DPoP proofs at its own address, with one user."""
    listen = f"127.0.0.1:{free_port()}"
    settings = auth_settings(redis_url, [nats_url], grpc_listen=listen)
    async with running_auth(settings) as (app, client):
        await client.create_user(*USER)
        yield app, client, f"http://{listen}"


def claims_of(token: str) -> AccessClaims:
    jws = decode_compact(token)
    return AccessClaims.from_payload(jws.unverified_payload, jws.kid)


async def login(client: AuthClient, signer: ProofSigner | None, origin: str) -> auth_pb2.TokenPair:
    metadata = () if signer is None else (("dpop", signer.proof(origin, LOGIN_METHOD)),)
    return await client.stub.Login(
        auth_pb2.LoginRequest(username=USER[0], password=USER[1]), metadata=metadata, timeout=10
    )


def refresh(
    client: AuthClient, refresh_token: str, signer: ProofSigner | None, origin: str
) -> grpc.aio.UnaryUnaryCall[auth_pb2.RefreshRequest, auth_pb2.TokenPair]:
    metadata = () if signer is None else (("dpop", signer.proof(origin, REFRESH_METHOD)),)
    return client.stub.Refresh(
        auth_pb2.RefreshRequest(refresh_token=refresh_token), metadata=metadata, timeout=10
    )


async def test_a_login_with_a_proof_binds_the_access_token_and_the_session(
    auth: tuple[AuthApp, AuthClient, str],
) -> None:
    _, client, origin = auth
    signer = ProofSigner()
    pair = await login(client, signer, origin)
    assert pair.token_type == "DPoP"
    assert claims_of(pair.access_token).jkt == signer.jkt
    renewed = await refresh(client, pair.refresh_token, signer, origin)
    assert claims_of(renewed.access_token).jkt == signer.jkt


async def test_a_bound_refresh_token_needs_a_proof_of_its_key(auth: tuple[AuthApp, AuthClient, str]) -> None:
    _, client, origin = auth
    signer = ProofSigner()
    pair = await login(client, signer, origin)
    await expect_error(
        refresh(client, pair.refresh_token, None, origin),
        grpc.StatusCode.UNAUTHENTICATED,
        "DPOP_PROOF_MISSING",
    )
    await expect_error(
        refresh(client, pair.refresh_token, ProofSigner(), origin),
        grpc.StatusCode.UNAUTHENTICATED,
        "DPOP_KEY_MISMATCH",
    )
    # Neither refusal spent the token: the holder of the key goes on.
    renewed = await refresh(client, pair.refresh_token, signer, origin)
    assert claims_of(renewed.access_token).jkt == signer.jkt


async def test_a_login_without_a_proof_stays_a_bearer_session(auth: tuple[AuthApp, AuthClient, str]) -> None:
    _, client, origin = auth
    pair = await login(client, None, origin)
    assert pair.token_type == "Bearer"
    assert claims_of(pair.access_token).jkt is None
    # A proof cannot bind a bearer session afterwards.
    await expect_error(
        refresh(client, pair.refresh_token, ProofSigner(), origin),
        grpc.StatusCode.UNAUTHENTICATED,
        "DPOP_KEY_MISMATCH",
    )
    assert claims_of((await refresh(client, pair.refresh_token, None, origin)).access_token).jkt is None


async def test_a_proof_for_another_method_or_origin_or_a_replayed_one_is_refused(
    auth: tuple[AuthApp, AuthClient, str],
) -> None:
    _, client, origin = auth
    signer = ProofSigner()
    request = auth_pb2.LoginRequest(username=USER[0], password=USER[1])
    for proof in (signer.proof(origin, REFRESH_METHOD), signer.proof("http://127.0.0.1:1", LOGIN_METHOD)):
        await expect_error(
            client.stub.Login(request, metadata=(("dpop", proof),), timeout=10),
            grpc.StatusCode.UNAUTHENTICATED,
            "DPOP_PROOF_INVALID",
        )
    proof = signer.proof(origin, LOGIN_METHOD)
    await client.stub.Login(request, metadata=(("dpop", proof),), timeout=10)
    await expect_error(
        client.stub.Login(request, metadata=(("dpop", proof),), timeout=10),
        grpc.StatusCode.UNAUTHENTICATED,
        "DPOP_PROOF_REPLAYED",
    )


async def test_a_bound_token_is_no_bearer_credential_but_can_be_introspected(
    auth: tuple[AuthApp, AuthClient, str],
) -> None:
    _, client, origin = auth
    pair = await login(client, ProofSigner(), origin)
    # As the caller's credential it is refused (it would need a proof) ...
    await expect_error(
        client.stub.Introspect(
            auth_pb2.IntrospectRequest(token=pair.access_token),
            metadata=bearer(pair.access_token),
            timeout=10,
        ),
        grpc.StatusCode.UNAUTHENTICATED,
        "DPOP_PROOF_MISSING",
    )
    # ... but as the subject of an introspection it is active.
    assert (await client.introspect(pair.access_token)).active
