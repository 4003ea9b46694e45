"""Signing-key lifecycle: generated at first start, sealed at rest, shared by every auth-service replica.

Private keys are stored in Redis only sealed with AES-256-GCM under a key derived (HKDF-SHA256) from
``AUTHMESH_KEY_ENCRYPTION_KEY``, with the kid as associated data so a sealed key cannot be moved to another
kid. A key is ``active`` (signs), ``verify_only`` (its tokens stay valid until ``not_after_ms``: the last
token it signed has expired) or ``retired`` (compromised: its tokens are rejected at once).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from authmesh._auth_service.store import AuthStore, now_ms
from authmesh._shared.claims import new_uuid7
from authmesh._shared.errors import ConfigurationError, KeyRevoked, Unavailable, UnknownKey
from authmesh._shared.keys import jwks_json

_HKDF_INFO = b"authmesh signing keys v1"
_NONCE_BYTES = 12
ACTIVE, VERIFY_ONLY, RETIRED = "active", "verify_only", "retired"
# (new kid, previous kid) -> outbox entries (event id, event JSON) to write with the rotation.
EventFactory = Callable[[str, str], list[tuple[str, str]]]


class KeySealer:
    """Seals and unseals private keys with a key derived from the configured secret.

    Args:
        secret: ``AUTHMESH_KEY_ENCRYPTION_KEY`` as bytes.
    """

    def __init__(self, secret: bytes) -> None:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(secret)
        self._aead = AESGCM(key)

    def seal(self, kid: str, private_key: ec.EllipticCurvePrivateKey) -> str:
        """Encrypt a private key for storage."""
        der = private_key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        nonce = os.urandom(_NONCE_BYTES)
        return base64.b64encode(nonce + self._aead.encrypt(nonce, der, kid.encode())).decode("ascii")

    def unseal(self, kid: str, sealed: str) -> ec.EllipticCurvePrivateKey:
        """Decrypt a stored private key.

        Raises:
            ConfigurationError: The key-encryption key is not the one the key was sealed with.
        """
        blob = base64.b64decode(sealed)
        try:
            der = self._aead.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], kid.encode())
        except InvalidTag as error:
            raise ConfigurationError(
                "AUTHMESH_KEY_ENCRYPTION_KEY does not decrypt the signing keys stored in Redis"
            ) from error
        key = serialization.load_der_private_key(der, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigurationError("a stored signing key is not an EC key")
        return key


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A usable key pair with its lifecycle state."""

    kid: str
    private_key: ec.EllipticCurvePrivateKey
    public_key: ec.EllipticCurvePublicKey
    state: str
    not_after_ms: int

    def verifies_at(self, at_ms: int) -> bool:
        """Whether tokens signed by this key are still accepted at ``at_ms``."""
        if self.state == ACTIVE:
            return True
        return self.state == VERIFY_ONLY and at_ms < self.not_after_ms


@dataclass(frozen=True, slots=True)
class Rotation:
    """The result of a rotation."""

    kid: str
    previous_kid: str


class Keyring:
    """The signing keys, cached in memory and reloaded from Redis when they change.

    Implements :class:`authmesh._shared.verifier.KeySource` over the keys it has loaded.

    Args:
        store: The Redis store.
        sealer: Seals private keys.
        verify_window_ms: How long a superseded key keeps verifying (token lifetime plus leeway).
    """

    def __init__(self, store: AuthStore, sealer: KeySealer, verify_window_ms: int) -> None:
        self._store = store
        self._sealer = sealer
        self._verify_window_ms = verify_window_ms
        self._keys: dict[str, SigningKey] = {}
        self._active_kid = ""

    async def start(self) -> None:
        """Load the keys, generating the first one if Redis has none (race-safe across replicas)."""
        if await self._store.active_kid() is None:
            await self._install_new_key(expected_previous="", retire_previous=False, events_for=None)
        await self.reload()

    async def reload(self) -> None:
        """Reload every key record from Redis."""
        records = await self._store.key_records()
        active = await self._store.active_kid()
        keys: dict[str, SigningKey] = {}
        for record in records:
            known = self._keys.get(record.kid)
            private_key = known.private_key if known else self._sealer.unseal(record.kid, record.sealed)
            keys[record.kid] = SigningKey(
                kid=record.kid,
                private_key=private_key,
                public_key=private_key.public_key(),
                state=record.state,
                not_after_ms=record.not_after_ms,
            )
        self._keys = keys
        self._active_kid = active or ""

    async def signing_key(self, active: str | None = None) -> SigningKey:
        """The active key, as Redis says now (another replica may have rotated).

        Args:
            active: The active kid, when the caller has just read it from Redis in a round trip it made
                anyway (the refresh script returns it); otherwise it is read here.

        Raises:
            Unavailable: No active key is stored.
        """
        if active is None:
            active = await self._store.active_kid()
        if active is None:
            raise Unavailable("no active signing key", code="KEYS_UNAVAILABLE")
        if active != self._active_kid or active not in self._keys:
            await self.reload()
        key = self._keys.get(active)
        if key is None:
            raise Unavailable("active signing key missing", code="KEYS_UNAVAILABLE")
        return key

    def cached_signing_key(self) -> SigningKey:
        """The active key as last loaded (for heartbeats, which must not wait on Redis).

        Raises:
            Unavailable: No key loaded yet.
        """
        key = self._keys.get(self._active_kid)
        if key is None:
            raise Unavailable("no active signing key", code="KEYS_UNAVAILABLE")
        return key

    def public_key(self, kid: str) -> ec.EllipticCurvePublicKey:
        """The public key for ``kid`` if tokens it signed are still accepted.

        Raises:
            UnknownKey: Not loaded.
            KeyRevoked: Retired, or verify-only past its window.
        """
        key = self._keys.get(kid)
        if key is None:
            raise UnknownKey(kid)
        if not key.verifies_at(now_ms()):
            raise KeyRevoked()
        return key.public_key

    def public_keys(self) -> dict[str, ec.EllipticCurvePublicKey]:
        """The keys whose tokens are still accepted: what the JWK Set publishes."""
        at = now_ms()
        return {kid: key.public_key for kid, key in self._keys.items() if key.verifies_at(at)}

    def jwks(self) -> str:
        """The JWK Set as JSON text."""
        return jwks_json(self.public_keys())

    async def rotate(self, *, retire_previous: bool, events_for: EventFactory) -> Rotation:
        """Make a new active key; the previous one turns verify-only, or retired.

        Args:
            retire_previous: Compromise: reject every token the previous key signed at once.
            events_for: Builds the outbox entries (event id, JSON) for (new kid, previous kid).

        Raises:
            Unavailable: Rotations kept racing with other replicas.
        """
        for _ in range(5):
            previous = await self._store.active_kid() or ""
            kid = await self._install_new_key(
                expected_previous=previous, retire_previous=retire_previous, events_for=events_for
            )
            if kid:
                await self.reload()
                await self._forget_expired()
                return Rotation(kid=kid, previous_kid=previous)
        raise Unavailable("concurrent key rotations; try again", code="ROTATION_CONFLICT")

    async def _install_new_key(
        self,
        *,
        expected_previous: str,
        retire_previous: bool,
        events_for: EventFactory | None,
    ) -> str:
        kid = new_uuid7()
        private_key = ec.generate_private_key(ec.SECP256R1())
        now = now_ms()
        events = events_for(kid, expected_previous) if events_for is not None else []
        installed = await self._store.rotate_key(
            expected_previous=expected_previous,
            kid=kid,
            sealed=self._sealer.seal(kid, private_key),
            now_ms=now,
            previous_state=RETIRED if retire_previous else VERIFY_ONLY,
            previous_not_after_ms=now if retire_previous else now + self._verify_window_ms,
            events=events,
        )
        return kid if installed else ""

    async def _forget_expired(self) -> None:
        """Drop verify-only keys whose last token has long expired."""
        at = now_ms()
        for key in list(self._keys.values()):
            if key.state == VERIFY_ONLY and key.not_after_ms + self._verify_window_ms < at:
                await self._store.delete_key(key.kid)
                self._keys.pop(key.kid, None)
