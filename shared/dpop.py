"""DPoP proofs (RFC 9449) for gRPC: strict verification, the replay cache and stateless server nonces.

A proof is a compact ES256 JWS in the ``dpop`` metadata entry, signed by a key the client holds and
carrying that key's public half as ``jwk`` in its header. :class:`ProofVerifier` checks it as RFC 9449
§4.3 says, and no more leniently: compact serialisation under a size cap; canonical base64url; JSON
without duplicate keys; ``typ`` exactly ``dpop+jwt``; ``alg`` exactly ES256; exactly one key, a public
EC P-256 ``jwk`` (no ``d`` or any other member than the public ones); the signature; ``jti``; ``htm``
``POST`` (every gRPC call is one); ``htu`` the call's origin (one of the service's configured names)
followed by the gRPC method path, exactly; ``iat`` within the window; ``ath`` the SHA-256 of the access
token where one is presented; the ``nonce`` where the service asks for one.

Replay: every accepted ``jti`` stays in a bounded per-replica cache until its proof is too old to pass
the ``iat`` check, so a proof is accepted at most once per replica. When the cache is full of live
entries a proof is refused rather than an entry forgotten (fail closed). Across N replicas a captured
proof can thus be used at most N times within its window, and only by whoever holds the matching
access token; services that want once in total ask for nonces.

Nonces (:class:`NonceSource`) need no shared state: a nonce is a time bucket and an HMAC of it under a
key every replica of the service derives from the same configured secret, so any replica can check a
nonce another one gave out, without a round trip.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from authmesh._shared.errors import (
    AuthError,
    ConfigurationError,
    DpopKeyMismatch,
    DpopNonceRequired,
    DpopProofMissing,
    DpopProofReplayed,
    DpopRejected,
    Unavailable,
)
from authmesh._shared.jose import (
    ALGORITHM,
    b64url_decode,
    b64url_encode,
    check_signature_shape,
    parse_json_object,
    sign_compact,
    verify_signature,
)
from authmesh._shared.keys import ec_public_jwk
from authmesh._shared.settings import CommonSettings

Clock = Callable[[], float]
DPOP_METADATA_KEY = "dpop"
DPOP_SCHEME = "DPoP"
PROOF_TYPE = "dpop+jwt"
HTTP_METHOD = "POST"
MAX_PROOF_BYTES = 2048
# The auth service's methods that take a proof (their htu is the auth service's origin and this path).
LOGIN_METHOD = "/authmesh.auth.v1.AuthService/Login"
REFRESH_METHOD = "/authmesh.auth.v1.AuthService/Refresh"
MIN_JTI_LENGTH = 16
MAX_JTI_LENGTH = 256
MAX_NONCE_LENGTH = 256
REPLAY_CACHE_FULL = "DPOP_REPLAY_CACHE_FULL"
_COORDINATE_BYTES = 32
_PUBLIC_JWK_MEMBERS = frozenset({"kty", "crv", "x", "y"})
# Members a public JWK may carry besides the key itself (RFC 7517 §4); anything else, ``d`` first of
# all, is refused.
_OPTIONAL_JWK_MEMBERS = frozenset({"kid", "alg", "use"})
_HEADER_MEMBERS = frozenset({"typ", "alg", "jwk"})
_DEFAULT_PORTS = {"https": "443", "http": "80"}
_ORIGIN = re.compile(
    r"(?P<scheme>https?)://(?P<host>[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(?::(?P<port>[0-9]{1,5}))?"
)
_KEY_CACHE_SIZE = 1024


def jwk_thumbprint(jwk: dict[str, str]) -> str:
    """The RFC 7638 SHA-256 thumbprint of a public EC JWK, base64url (the ``jkt``)."""
    canonical = json.dumps(
        {"crv": jwk["crv"], "kty": jwk["kty"], "x": jwk["x"], "y": jwk["y"]}, separators=(",", ":")
    )
    return b64url_encode(hashlib.sha256(canonical.encode("ascii")).digest())


def access_token_hash(access_token: str) -> str:
    """``ath``: base64url of the SHA-256 of the access token's ASCII bytes."""
    return b64url_encode(hashlib.sha256(access_token.encode("ascii")).digest())


def method_uri(origin: str, method: str) -> str:
    """``htu`` for a gRPC call: the origin (``https://host:port``) and the method path."""
    return origin.rstrip("/") + method


def origin_spellings(origin: str) -> frozenset[str]:
    """The spellings of one configured origin a proof may use: lower-case, with or without its default port.

    Raises:
        ConfigurationError: Not ``http(s)://host[:port]``.
    """
    match = _ORIGIN.fullmatch(origin)
    if match is None:
        raise ConfigurationError(f"DPoP origin {origin!r} is not scheme://host[:port]")
    scheme, host, port = match["scheme"].lower(), match["host"].lower(), match["port"]
    default = _DEFAULT_PORTS[scheme]
    if port is None or port == default:
        return frozenset({f"{scheme}://{host}", f"{scheme}://{host}:{default}"})
    return frozenset({f"{scheme}://{host}:{port}"})


@dataclass(frozen=True, slots=True)
class DpopProof:
    """A verified proof.

    Attributes:
        jkt: The RFC 7638 thumbprint of the proof's key.
        jti: The proof's id.
        iat: When the client made it.
    """

    jkt: str
    jti: str
    iat: int


@dataclass(frozen=True, slots=True)
class ProofPolicy:
    """What a valid proof must say.

    Attributes:
        origins: The service's names, as ``scheme://host[:port]``; ``htu`` must start with one.
        max_age: Seconds a proof stays acceptable after its ``iat``.
        leeway: Seconds of clock skew tolerated either side.
        max_proof_bytes: Size cap checked before decoding.
        replay_capacity: How many live ``jti`` s one replica remembers; when full, proofs are refused.
    """

    origins: tuple[str, ...]
    max_age: float = 60.0
    leeway: float = 5.0
    max_proof_bytes: int = MAX_PROOF_BYTES
    replay_capacity: int = 100_000


class ReplayCache:
    """The ``jti`` s of accepted proofs, each kept until its proof is too old to be accepted again.

    Args:
        capacity: Live entries at most; a proof that would need one more is refused.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._expiry: dict[str, float] = {}
        self._by_expiry: list[tuple[float, str]] = []
        # A sync grpc.server checks proofs in its worker threads: the check and the record are one step.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._expiry)

    def claim(self, key: str, expires_at: float, now: float) -> None:
        """Record ``key`` until ``expires_at``.

        Raises:
            DpopProofReplayed: ``key`` is recorded and has not expired.
            Unavailable: Full of live entries (``DPOP_REPLAY_CACHE_FULL``); refusing is safe,
                forgetting is not.
        """
        with self._lock:
            self._purge(now)
            if key in self._expiry:
                raise DpopProofReplayed()
            if len(self._expiry) >= self._capacity:
                raise Unavailable("DPoP replay cache full", code=REPLAY_CACHE_FULL)
            self._expiry[key] = expires_at
            heapq.heappush(self._by_expiry, (expires_at, key))

    def _purge(self, now: float) -> None:
        heap = self._by_expiry
        expiry = self._expiry
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            expiry.pop(key, None)


class NonceSource:
    """Server nonces every replica of a service can make and check without talking to the others.

    A nonce is ``base64url(bucket ‖ HMAC-SHA256(key, bucket)[:16])`` where ``bucket`` is the current
    ``period``-second interval; a nonce of the current or the previous bucket is accepted. The key is
    derived (HKDF-SHA256) from a secret every replica of the service is configured with
    (``AUTHMESH_DPOP_NONCE_SECRET``), bound to the service's audience so two services never accept each
    other's nonces.

    Args:
        secret: The shared secret, at least 32 bytes.
        audience: The service's audience.
        period: Seconds per bucket.
        clock: Current Unix time.

    Raises:
        ConfigurationError: A secret under 32 bytes or a period under one second.
    """

    def __init__(
        self, secret: bytes, audience: str, *, period: float = 60.0, clock: Clock = time.time
    ) -> None:
        if len(secret) < 32:
            raise ConfigurationError("the DPoP nonce secret must be at least 32 bytes")
        if period < 1:
            raise ConfigurationError("the DPoP nonce period must be at least one second")
        hkdf = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"authmesh dpop nonce " + audience.encode()
        )
        self._key = hkdf.derive(secret)
        self._period = period
        self._clock = clock

    def current(self) -> str:
        """The nonce for now."""
        return self._make(int(self._clock() // self._period))

    def check(self, nonce: object) -> None:
        """Accept a nonce of the current or the previous bucket.

        Raises:
            DpopNonceRequired: Missing, forged or stale (carrying a fresh one).
        """
        bucket = int(self._clock() // self._period)
        if type(nonce) is str and len(nonce) <= MAX_NONCE_LENGTH:
            for candidate in (bucket, bucket - 1):
                if hmac.compare_digest(nonce, self._make(candidate)):
                    return
        raise DpopNonceRequired(self._make(bucket))

    def _make(self, bucket: int) -> str:
        raw = bucket.to_bytes(8, "big", signed=True)
        return b64url_encode(raw + hmac.new(self._key, raw, hashlib.sha256).digest()[:16])


class ProofVerifier:
    """Verifies DPoP proofs for one service (one per replica: the replay cache is its state).

    Args:
        policy: Origins, window and limits.
        nonces: Where nonces come from; None when the service does not ask for them.
        clock: Current Unix time.
    """

    def __init__(
        self, policy: ProofPolicy, *, nonces: NonceSource | None = None, clock: Clock = time.time
    ) -> None:
        if not policy.origins:
            raise ConfigurationError("DPoP needs at least one origin (the service's scheme://host:port)")
        self._policy = policy
        self._origins = frozenset().union(*(origin_spellings(origin) for origin in policy.origins))
        self._nonces = nonces
        self._clock = clock
        self._replays = ReplayCache(policy.replay_capacity)
        # Building a public key from its coordinates checks the point is on the curve, which costs more
        # than the lookup: a client sends the same jwk on every call.
        self._keys: OrderedDict[str, tuple[ec.EllipticCurvePublicKey, str]] = OrderedDict()
        self._keys_lock = threading.Lock()  # proofs are checked in a sync server's worker threads too

    @property
    def policy(self) -> ProofPolicy:
        """The policy this verifier enforces."""
        return self._policy

    def verify(
        self, proof: str | None, method: str, *, access_token: str | None = None, htm: str = HTTP_METHOD
    ) -> DpopProof:
        """Verify a proof for a call and record its ``jti``.

        Args:
            proof: The ``dpop`` metadata value.
            method: The gRPC method path, ``/package.Service/Method`` (an HTTP request's path).
            access_token: The access token the call presents (its hash must be the proof's ``ath``).
            htm: The HTTP method the proof must name (``POST`` for every gRPC call).

        Returns:
            The proof's key thumbprint, ``jti`` and ``iat``.

        Raises:
            DpopRejected: Invalid in any way (``DpopProofReplayed``, ``DpopNonceRequired``, ...).
            Unavailable: The replay cache is full of live proofs.
        """
        if proof is None:
            raise DpopProofMissing()
        header, payload, signing_input, signature = self._decode(proof)
        key, jkt = self._public_key(header["jwk"])
        try:
            verify_signature(key, signing_input, signature)
        except AuthError as error:
            raise DpopRejected("DPoP proof signature does not verify") from error
        now = self._clock()
        jti, iat = self._check_claims(payload, htm, method, access_token, now)
        if self._nonces is not None:
            self._nonces.check(payload.get("nonce"))
        self._replays.claim(jkt + "." + jti, iat + self._policy.max_age + self._policy.leeway, now)
        return DpopProof(jkt=jkt, jti=jti, iat=iat)

    def challenge(self) -> DpopNonceRequired | None:
        """The nonce refusal for a call that came without any proof, when nonces are in use."""
        return None if self._nonces is None else DpopNonceRequired(self._nonces.current())

    def _decode(self, proof: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
        if len(proof) > self._policy.max_proof_bytes:
            raise DpopRejected("DPoP proof too large")
        try:
            raw = proof.encode("ascii")
            parts = raw.split(b".")
            if len(parts) != 3:
                raise DpopRejected("DPoP proof is not a compact JWS")
            header = parse_json_object(b64url_decode(parts[0]))
            payload = parse_json_object(b64url_decode(parts[1]))
            signature = b64url_decode(parts[2])
            check_signature_shape(signature)
        except UnicodeEncodeError as error:
            raise DpopRejected("DPoP proof is not ASCII") from error
        except DpopRejected:
            raise
        except AuthError as error:
            raise DpopRejected(f"DPoP proof malformed: {error.message}") from error
        if header.get("typ") != PROOF_TYPE:
            raise DpopRejected("DPoP proof typ is not dpop+jwt")
        if header.get("alg") != ALGORITHM:
            raise DpopRejected("DPoP proof algorithm not accepted")
        # Exactly one key, carried as jwk: a kid, x5c or jku would let the proof point elsewhere, and
        # crit would change how it is processed.
        if not set(header) <= _HEADER_MEMBERS or type(header.get("jwk")) is not dict:
            raise DpopRejected("DPoP proof header must be exactly typ, alg and jwk")
        return header, payload, parts[0] + b"." + parts[1], signature

    def _public_key(self, jwk: dict[str, Any]) -> tuple[ec.EllipticCurvePublicKey, str]:
        members = set(jwk)
        if not members >= _PUBLIC_JWK_MEMBERS or not members <= _PUBLIC_JWK_MEMBERS | _OPTIONAL_JWK_MEMBERS:
            # ``d`` (or any other private or unknown member) lands here.
            raise DpopRejected("DPoP jwk must be a public EC key")
        if jwk["kty"] != "EC" or jwk["crv"] != "P-256":
            raise DpopRejected("DPoP jwk must be an EC P-256 key")
        if not all(type(jwk[name]) is str for name in members):
            raise DpopRejected("DPoP jwk members must be strings")
        cache_key = jwk["x"] + "." + jwk["y"]
        with self._keys_lock:
            cached = self._keys.get(cache_key)
            if cached is not None:
                self._keys.move_to_end(cache_key)
                return cached
        try:
            x = b64url_decode(jwk["x"].encode("ascii"))
            y = b64url_decode(jwk["y"].encode("ascii"))
            if len(x) != _COORDINATE_BYTES or len(y) != _COORDINATE_BYTES:
                raise DpopRejected("DPoP jwk coordinates must be 32 bytes")
            key = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
            ).public_key()
        except DpopRejected:
            raise
        except (AuthError, ValueError, UnicodeEncodeError) as error:
            raise DpopRejected("DPoP jwk is not a P-256 public key") from error
        entry = (key, jwk_thumbprint(jwk))
        with self._keys_lock:
            self._keys[cache_key] = entry
            if len(self._keys) > _KEY_CACHE_SIZE:
                self._keys.popitem(last=False)
        return entry

    def _check_claims(
        self, payload: dict[str, Any], htm: str, method: str, access_token: str | None, now: float
    ) -> tuple[str, int]:
        jti = payload.get("jti")
        if type(jti) is not str or not MIN_JTI_LENGTH <= len(jti) <= MAX_JTI_LENGTH:
            raise DpopRejected("DPoP proof jti missing or invalid")
        if payload.get("htm") != htm:
            raise DpopRejected(f"DPoP proof htm is not {htm}")
        htu = payload.get("htu")
        if type(htu) is not str or not self._htu_matches(htu, method):
            raise DpopRejected("DPoP proof htu is not this call's URI")
        iat = payload.get("iat")
        if type(iat) is not int:
            raise DpopRejected("DPoP proof iat missing or invalid")
        policy = self._policy
        if iat > now + policy.leeway or iat < now - policy.max_age - policy.leeway:
            raise DpopRejected("DPoP proof iat outside the accepted window")
        if access_token is not None:
            ath = payload.get("ath")
            if type(ath) is not str or not hmac.compare_digest(ath, access_token_hash(access_token)):
                raise DpopRejected("DPoP proof ath missing or not the access token's hash")
        return jti, iat

    def _htu_matches(self, htu: str, method: str) -> bool:
        # The path exactly; scheme and host compared without case (RFC 3986 §6.2.2.1).
        if not htu.endswith(method) or not method.startswith("/"):
            return False
        return htu[: len(htu) - len(method)].lower() in self._origins


def require_binding(proof: DpopProof, bound_jkt: str | None) -> None:
    """Refuse a proof whose key is not the one a token or session is bound to.

    Raises:
        DpopKeyMismatch: ``bound_jkt`` is another key, or nothing is bound.
    """
    if bound_jkt is None or not hmac.compare_digest(proof.jkt, bound_jkt):
        raise DpopKeyMismatch()


class ProofSigner:
    """Makes DPoP proofs with one P-256 key (the client side).

    Args:
        private_key: The key the tokens are bound to; a new one when None.
        clock: Current Unix time.
    """

    def __init__(
        self, private_key: ec.EllipticCurvePrivateKey | None = None, *, clock: Clock = time.time
    ) -> None:
        self._key = private_key if private_key is not None else ec.generate_private_key(ec.SECP256R1())
        self._jwk = ec_public_jwk(self._key.public_key())
        self._jkt = jwk_thumbprint(self._jwk)
        self._clock = clock

    @property
    def jkt(self) -> str:
        """The key's RFC 7638 thumbprint (what bound tokens carry as ``cnf.jkt``)."""
        return self._jkt

    def proof(
        self,
        origin: str,
        method: str,
        *,
        access_token: str | None = None,
        nonce: str | None = None,
        htm: str = HTTP_METHOD,
    ) -> str:
        """A fresh proof for one call.

        Args:
            origin: The service's ``scheme://host:port``.
            method: The gRPC method path (an HTTP request's path, without the query).
            access_token: The token the call carries (sets ``ath``).
            nonce: The server's latest nonce, if it asked for one.
            htm: The HTTP method (``POST`` for gRPC).
        """
        claims: dict[str, Any] = {
            "jti": secrets.token_urlsafe(24),
            "htm": htm,
            "htu": method_uri(origin, method),
            "iat": int(self._clock()),
        }
        if access_token is not None:
            claims["ath"] = access_token_hash(access_token)
        if nonce is not None:
            claims["nonce"] = nonce
        return sign_compact({"typ": PROOF_TYPE, "jwk": self._jwk}, claims, self._key)


def default_origin(target: str, *, secure: bool) -> str:
    """The origin a client names a ``host:port`` target by: ``https://`` over TLS, else ``http://``."""
    return ("https://" if secure else "http://") + target


def proof_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The ``dpop`` metadata value, or None; more than one proof is refused.

    Raises:
        DpopRejected: Several ``dpop`` entries, or a binary one.
    """
    found: str | None = None
    for key, value in metadata or ():
        if key == DPOP_METADATA_KEY:
            if found is not None or not isinstance(value, str):
                raise DpopRejected("exactly one DPoP proof per call")
            found = value
    return found


class DpopMode(StrEnum):
    """A service's DPoP policy (``AUTHMESH_DPOP``)."""

    REQUIRE = "require"
    """Every call carries a key-bound token and a proof; bearer tokens are refused."""
    ACCEPT = "accept"
    """Key-bound tokens with proofs, and bearer tokens."""
    OFF = "off"
    """Bearer tokens only: proofs are refused, and so (by the verifier) are key-bound tokens."""


class ProofGate:
    """A service's DPoP decision for one call: which key, if any, the call proved.

    Args:
        mode: The service's policy.
        proofs: The proof verifier; required unless ``mode`` is off.

    Raises:
        ConfigurationError: No proof verifier for a mode that takes proofs.
    """

    def __init__(self, mode: DpopMode, proofs: ProofVerifier | None) -> None:
        if mode is not DpopMode.OFF and proofs is None:
            raise ConfigurationError(f"DPoP mode {mode.value!r} needs a proof verifier")
        self._mode = mode
        self._proofs = proofs if mode is not DpopMode.OFF else None

    @property
    def mode(self) -> DpopMode:
        """The service's policy."""
        return self._mode

    def proven_key(
        self,
        proof: str | None,
        method: str,
        *,
        dpop_scheme: bool = True,
        access_token: str | None = None,
        htm: str = HTTP_METHOD,
    ) -> str | None:
        """The ``jkt`` a call proved, or None for a bearer call the policy allows.

        Args:
            proof: The ``dpop`` metadata value.
            method: The gRPC method path (an HTTP request's path).
            dpop_scheme: Whether the call names the DPoP scheme (``authorization: DPoP …``); calls
                without an access token (Login, Refresh) pass True when they carry a proof.
            access_token: The access token the call carries, for ``ath``.
            htm: The call's HTTP method (``POST`` for gRPC).

        Raises:
            DpopRejected: A proof the policy refuses, an invalid proof, or none where one is required.
            Unavailable: The replay cache is full.
        """
        if self._proofs is None:
            if proof is not None or dpop_scheme:
                raise DpopRejected("this service does not accept DPoP")
            return None
        if not dpop_scheme:
            if self._mode is DpopMode.REQUIRE:
                raise DpopProofMissing("this service requires DPoP")
            return None
        if proof is None and self._mode is DpopMode.REQUIRE:
            challenge = self._proofs.challenge()
            if challenge is not None:
                raise challenge
        return self._proofs.verify(proof, method, access_token=access_token, htm=htm).jkt


def proof_gate(settings: CommonSettings, grpc_listen: str, audience: str) -> ProofGate:
    """A service's gate from its settings (``AUTHMESH_DPOP``, ``AUTHMESH_DPOP_ORIGINS``, ...).

    Args:
        settings: The service's settings.
        grpc_listen: Where it listens (the default origin).
        audience: Its audience (binds its nonces to it).

    Raises:
        ConfigurationError: A malformed origin or a short nonce secret.
    """
    mode = DpopMode(settings.dpop)
    if mode is DpopMode.OFF:
        return ProofGate(mode, None)
    secret = settings.dpop_nonce_secret
    nonces = None if secret is None else NonceSource(secret.get_secret_value().encode(), audience)
    policy = ProofPolicy(origins=settings.proof_origins(grpc_listen), max_age=settings.dpop_max_age)
    return ProofGate(mode, ProofVerifier(policy, nonces=nonces))
