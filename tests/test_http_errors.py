"""The HTTP answers for refused DPoP proofs (RFC 9449 §7.1), as the Envoy ext_authz server sends them."""

from __future__ import annotations

from authmesh._shared.errors import DpopKeyMismatch, DpopNonceRequired, TokenRevoked
from authmesh._shared.http_errors import http_refusal


def test_a_refused_proof_gets_a_dpop_challenge_and_a_bearer_refusal_keeps_its_own() -> None:
    refusal = http_refusal(DpopKeyMismatch("DPoP proof key is not the token's key"))
    bearer = http_refusal(TokenRevoked("token revoked"))

    assert refusal.status == 401
    assert dict(refusal.headers)["www-authenticate"].startswith('DPoP error="invalid_dpop_proof"')
    assert refusal.body()["reason"] == "DPOP_KEY_MISMATCH"
    assert dict(bearer.headers)["www-authenticate"].startswith('Bearer error="invalid_token"')


def test_a_wanted_nonce_is_sent_with_use_dpop_nonce() -> None:
    refusal = http_refusal(DpopNonceRequired("n-123"))

    headers = dict(refusal.headers)
    assert refusal.status == 401
    assert headers["www-authenticate"].startswith('DPoP error="use_dpop_nonce"')
    assert headers["dpop-nonce"] == "n-123"
