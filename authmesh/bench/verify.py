"""``authmesh bench verify``: how fast one core verifies access tokens, against its baselines.

Everything runs in one process, pinned to one CPU where the platform allows it:

* **raw**: ``cryptography``'s ES256 verify of a precomputed DER signature over the signing input,
  the floor no JWT verifier in Python can go below;
* **cold**: :meth:`authmesh._shared.verifier.TokenVerifier.verify` on distinct tokens (an empty cache): strict
  decoding, signature, every claim;
* **warm**: the same verifier on tokens it has verified before (cache hits: time and revocation are
  still checked on every call);
* **PyJWT**: ``jwt.decode`` with the same checks (ES256 only, ``aud``, ``iss``, ``exp``/``nbf``/``iat``
  with the same leeway, the claims required);
* **joserfc**: ``jwt.decode`` plus ``JWTClaimsRegistry.validate`` with the same checks, if installed.

Each contender runs beside the baseline it is judged against (cold beside raw, warm and joserfc
beside PyJWT), the two taking turns every few milliseconds; a ratio is the median over those side-by-side
chunks, so background load on a shared machine moves both sides of it alike. Rates and ratios are
medians over rounds. Goals: cold at least 0.8 times raw; warm at least 100 times PyJWT.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cryptography
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from rich.console import Console
from rich.table import Table

from authmesh._shared.claims import new_uuid7
from authmesh._shared.dpop import ProofPolicy, ProofSigner, ProofVerifier
from authmesh._shared.errors import UnknownKey
from authmesh._shared.jose import b64url_decode, sign_compact
from authmesh._shared.verifier import NoRevocations, TokenVerifier, VerifierPolicy

GOAL_COLD_OVER_RAW = 0.8
GOAL_WARM_OVER_PYJWT = 100.0
ISSUER = "authmesh"
AUDIENCE = "authmesh-resources"
KID = "bench-key"
LEEWAY = 5
# Tokens must stay valid for the whole run, however slow the machine.
LIFETIME = 3600
# Warm calls take well under a microsecond: repeat them so each chunk lasts long enough to time.
WARM_PASSES = 20
# Tokens per turn: contenders alternate every few milliseconds (see _round).
CHUNK = 50
# Who is timed beside whom: each ratio compares members of one group.
GROUPS = (("raw", "cold", "dpop_cold"), ("pyjwt", "warm", "joserfc", "dpop_warm"))
# The DPoP path's origin and method (what each proof's htu names).
DPOP_ORIGIN = "https://api.example:443"
DPOP_METHOD = "/authmesh.resource.v1.ResourceService/WhoAmI"
REQUIRED = ["iss", "sub", "aud", "exp", "iat", "nbf", "jti"]


class _OneKey:
    """A :class:`authmesh._shared.verifier.KeySource` holding one key (a dict lookup, like the key cache)."""

    def __init__(self, kid: str, public_key: ec.EllipticCurvePublicKey) -> None:
        self._keys = {kid: public_key}

    def public_key(self, kid: str) -> ec.EllipticCurvePublicKey:
        try:
            return self._keys[kid]
        except KeyError:
            raise UnknownKey(kid) from None


@dataclass(frozen=True, slots=True)
class _Workload:
    """What every contender verifies."""

    private_key: ec.EllipticCurvePrivateKey
    tokens: list[str]
    raw_inputs: list[tuple[bytes, bytes]]
    signer: ProofSigner
    bound_tokens: list[str]

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.private_key.public_key()


def _workload(count: int) -> _Workload:
    private_key = ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    tokens = []
    raw_inputs = []
    signer = ProofSigner()
    bound_tokens = []
    for index in range(count):
        claims = {
            "iss": ISSUER,
            "sub": f"user-{index}",
            "aud": AUDIENCE,
            "exp": now + LIFETIME,
            "iat": now,
            "nbf": now,
            "jti": new_uuid7(now * 1000 + index),
            "sid": f"session-{index}",
            "scope": "docs:read openid",
            "client_id": "bench",
        }
        token = sign_compact({"typ": "at+jwt", "kid": KID}, claims, private_key)
        # The same token bound to the client's key, for the DPoP path.
        bound_tokens.append(
            sign_compact({"typ": "at+jwt", "kid": KID}, {**claims, "cnf": {"jkt": signer.jkt}}, private_key)
        )
        signing_input, signature = token.rsplit(".", 1)
        raw = b64url_decode(signature.encode("ascii"))
        der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        tokens.append(token)
        raw_inputs.append((signing_input.encode("ascii"), der))
    return _Workload(private_key, tokens, raw_inputs, signer, bound_tokens)


@contextmanager
def _one_cpu() -> Iterator[int | None]:
    """Pin this process to one CPU for the block (Linux); yields the CPU, or None where unsupported."""
    get_affinity = getattr(os, "sched_getaffinity", None)
    set_affinity = getattr(os, "sched_setaffinity", None)
    if get_affinity is None or set_affinity is None:
        yield None
        return
    previous = get_affinity(0)
    cpu = max(previous)
    set_affinity(0, {cpu})
    try:
        yield cpu
    finally:
        set_affinity(0, previous)


RoundRunner = Callable[[int, int], None]
"""Verifies tokens ``[lo, hi)`` of the workload, within one round."""


@dataclass(frozen=True, slots=True)
class _Contender:
    """One verifier under test.

    Attributes:
        passes: How many times each token is verified per round.
        begin_round: Returns the runner for a new round (a cold verifier starts empty here).
    """

    passes: int
    begin_round: Callable[[], RoundRunner]


def _contenders(work: _Workload) -> dict[str, _Contender]:
    """Every contender; none keeps anything from one round to the next that it could profit from."""
    public_key = work.public_key
    algorithm = ec.ECDSA(hashes.SHA256())
    tokens = work.tokens
    raw_inputs = work.raw_inputs
    policy = VerifierPolicy(issuer=ISSUER, audience=AUDIENCE, leeway=LEEWAY, cache_size=2 * len(tokens))
    keys = _OneKey(KID, public_key)

    def raw() -> RoundRunner:
        verify = public_key.verify

        def run(lo: int, hi: int) -> None:
            for signing_input, der in raw_inputs[lo:hi]:
                verify(der, signing_input, algorithm)

        return run

    def cold() -> RoundRunner:
        verify = TokenVerifier(keys, NoRevocations(), policy).verify

        def run(lo: int, hi: int) -> None:
            for token in tokens[lo:hi]:
                verify(token)

        return run

    warm_verifier = TokenVerifier(keys, NoRevocations(), policy)
    for token in tokens:
        warm_verifier.verify(token)

    def warm() -> RoundRunner:
        verify = warm_verifier.verify

        def run(lo: int, hi: int) -> None:
            chunk = tokens[lo:hi]
            for _ in range(WARM_PASSES):
                for token in chunk:
                    verify(token)

        return run

    signer = work.signer
    bound_tokens = work.bound_tokens
    dpop_policy = ProofPolicy(origins=(DPOP_ORIGIN,), replay_capacity=2 * len(tokens))

    def with_proofs(verify: Callable[..., Any]) -> RoundRunner:
        # Every call needs a proof never seen before (the replay cache), so each round signs its own
        # (untimed) and starts a proof verifier with an empty replay cache.
        proofs = [signer.proof(DPOP_ORIGIN, DPOP_METHOD, access_token=token) for token in bound_tokens]
        proof_verify = ProofVerifier(dpop_policy).verify

        def run(lo: int, hi: int) -> None:
            for token, proof in zip(bound_tokens[lo:hi], proofs[lo:hi], strict=True):
                verify(token, bound_to=proof_verify(proof, DPOP_METHOD, access_token=token).jkt)

        return run

    dpop_warm_verifier = TokenVerifier(keys, NoRevocations(), policy)
    for token in bound_tokens:
        dpop_warm_verifier.verify(token, bound_to=signer.jkt)

    def dpop_cold() -> RoundRunner:
        return with_proofs(TokenVerifier(keys, NoRevocations(), policy).verify)

    def dpop_warm() -> RoundRunner:
        return with_proofs(dpop_warm_verifier.verify)

    contenders = {
        "raw": _Contender(1, raw),
        "cold": _Contender(1, cold),
        "warm": _Contender(WARM_PASSES, warm),
        "dpop_cold": _Contender(1, dpop_cold),
        "dpop_warm": _Contender(1, dpop_warm),
    }
    try:
        import jwt
    except ImportError:
        pass
    else:

        def pyjwt() -> RoundRunner:
            decode = jwt.decode
            options = {"require": REQUIRED}

            def run(lo: int, hi: int) -> None:
                for token in tokens[lo:hi]:
                    decode(
                        token,
                        public_key,
                        algorithms=["ES256"],
                        audience=AUDIENCE,
                        issuer=ISSUER,
                        leeway=LEEWAY,
                        options=options,  # type: ignore[arg-type]  # PyJWT types options as a TypedDict
                    )

            return run

        contenders["pyjwt"] = _Contender(1, pyjwt)
    try:
        from joserfc import jwt as jose_jwt
        from joserfc.jwk import ECKey
    except ImportError:
        pass
    else:
        pem = public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        jose_key = ECKey.import_key(pem)
        registry = jose_jwt.JWTClaimsRegistry(
            leeway=LEEWAY,
            iss={"essential": True, "value": ISSUER},
            aud={"essential": True, "value": AUDIENCE},
            sub={"essential": True},
            exp={"essential": True},
            iat={"essential": True},
            nbf={"essential": True},
            jti={"essential": True},
        )

        def joserfc() -> RoundRunner:
            decode = jose_jwt.decode
            validate = registry.validate

            def run(lo: int, hi: int) -> None:
                for token in tokens[lo:hi]:
                    validate(decode(token, jose_key, algorithms=["ES256"]).claims)

            return run

        contenders["joserfc"] = _Contender(1, joserfc)
    return contenders


@dataclass(frozen=True, slots=True)
class _RoundResult:
    """One round's figures.

    Attributes:
        per_second: Verifications per second of each contender over the whole round.
        chunk_times: Each contender's seconds per verification, chunk by chunk.
    """

    per_second: dict[str, float]
    chunk_times: dict[str, list[float]]

    def ratio(self, contender: str, baseline: str) -> float:
        """How many times faster ``contender`` was than ``baseline``: the median over chunks.

        The two ran side by side chunk after chunk; the median ignores the chunks a burst of
        background load happened to hit.
        """
        return statistics.median(
            base / mine
            for base, mine in zip(self.chunk_times[baseline], self.chunk_times[contender], strict=True)
        )


def _round(contenders: dict[str, _Contender], tokens: int) -> _RoundResult:
    """One round: every contender over every token.

    Each contender is timed beside the baseline it is judged against (cold beside raw; warm and
    joserfc beside PyJWT), the members of a group taking turns on small chunks of the workload in
    rotating order, so a burst of background load, or a cache another contender just flushed, lands
    on both sides of a ratio alike.
    """
    runners = {name: contender.begin_round() for name, contender in contenders.items()}
    chunk_times: dict[str, list[float]] = {name: [] for name in contenders}
    total_ns = dict.fromkeys(contenders, 0)
    gc.collect()  # no garbage from setup or the previous round is billed to this one
    for group in GROUPS:
        names = [name for name in group if name in contenders]
        for turn, lo in enumerate(range(0, tokens, CHUNK)):
            hi = min(lo + CHUNK, tokens)
            shift = turn % len(names)
            for name in names[shift:] + names[:shift]:
                started = time.perf_counter_ns()
                runners[name](lo, hi)
                elapsed = max(time.perf_counter_ns() - started, 1)
                total_ns[name] += elapsed
                chunk_times[name].append(elapsed / 1e9 / ((hi - lo) * contenders[name].passes))
    per_second = {name: tokens * contenders[name].passes * 1e9 / total_ns[name] for name in contenders}
    return _RoundResult(per_second, chunk_times)


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {
        "python": platform.python_version(),
        "cryptography": cryptography.__version__,
        "pyjwt": None,
        "joserfc": None,
    }
    try:
        import jwt

        versions["pyjwt"] = jwt.__version__
    except ImportError:
        pass
    try:
        import joserfc

        versions["joserfc"] = joserfc.__version__
    except ImportError:
        pass
    return versions


def run(rounds: int = 7, tokens: int = 2000) -> dict[str, Any]:
    """Measure every contender, ``rounds`` times, on ``tokens`` distinct tokens.

    Args:
        rounds: Timed rounds (after one untimed warm-up round); the report gives medians.
        tokens: Distinct tokens per round.

    Returns:
        A JSON-ready dict: per contender, verifications per second and microseconds per call (medians
        over rounds); the ratios cold/raw and warm/PyJWT (medians over rounds of each round's median
        over the chunks both sides ran side by side); the goals and whether each is met.
    """
    if rounds < 1 or tokens < 1:
        raise ValueError("rounds and tokens must be positive")
    work = _workload(tokens)
    contenders = _contenders(work)
    with _one_cpu() as cpu:
        _round(contenders, tokens)  # warm-up: caches, allocator, CPU clock
        results = [_round(contenders, tokens) for _ in range(rounds)]
    rates = {name: statistics.median(result.per_second[name] for result in results) for name in contenders}
    cold_over_raw = statistics.median(result.ratio("cold", "raw") for result in results)
    warm_over_pyjwt = (
        statistics.median(result.ratio("warm", "pyjwt") for result in results) if "pyjwt" in rates else None
    )
    # The DPoP path's cost beside the bearer path (information: its goal is on a whole call, bench rpc).
    dpop_cold_over_cold = statistics.median(result.ratio("cold", "dpop_cold") for result in results)
    dpop_warm_over_warm = statistics.median(result.ratio("warm", "dpop_warm") for result in results)
    passed = {
        "cold_over_raw": cold_over_raw >= GOAL_COLD_OVER_RAW,
        "warm_over_pyjwt": warm_over_pyjwt is not None and warm_over_pyjwt >= GOAL_WARM_OVER_PYJWT,
    }
    return {
        "benchmark": "verify",
        "rounds": rounds,
        "tokens": tokens,
        "cpu": cpu,
        "versions": _versions(),
        "per_second": rates,
        "microseconds_per_call": {name: 1e6 / rate for name, rate in rates.items()},
        "rounds_per_second": [result.per_second for result in results],
        "rounds_ratios": [
            {
                "cold_over_raw": result.ratio("cold", "raw"),
                "warm_over_pyjwt": result.ratio("warm", "pyjwt") if "pyjwt" in rates else None,
            }
            for result in results
        ],
        "ratios": {"cold_over_raw": cold_over_raw, "warm_over_pyjwt": warm_over_pyjwt},
        "dpop_cost": {"dpop_cold_over_cold": dpop_cold_over_cold, "dpop_warm_over_warm": dpop_warm_over_warm},
        "goals": {"cold_over_raw": GOAL_COLD_OVER_RAW, "warm_over_pyjwt": GOAL_WARM_OVER_PYJWT},
        "passed": passed,
        "ok": all(passed.values()),
    }


_LABELS = {
    "raw": "raw cryptography ES256 verify",
    "cold": "authmesh verify, cold (distinct tokens)",
    "warm": "authmesh verify, warm (cache hit)",
    "pyjwt": "PyJWT jwt.decode (same checks)",
    "joserfc": "joserfc decode + validate",
    "dpop_cold": "authmesh DPoP: proof + token, cold",
    "dpop_warm": "authmesh DPoP: proof + token, warm (token cache hit)",
}


def render(result: dict[str, Any]) -> Table:
    """The result of :func:`run` as a table: rates, then the goals and whether they are met."""
    cpu = result["cpu"]
    table = Table(
        title=f"token verification, one core{f' (CPU {cpu})' if cpu is not None else ''}, "
        f"median of {result['rounds']} rounds × {result['tokens']} tokens",
    )
    table.add_column("what")
    table.add_column("verifications/s", justify="right")
    table.add_column("µs/call", justify="right")
    for name, rate in result["per_second"].items():
        table.add_row(_LABELS.get(name, name), f"{rate:,.0f}", f"{result['microseconds_per_call'][name]:.2f}")
    table.add_section()
    for name, label in (("cold_over_raw", "cold / raw"), ("warm_over_pyjwt", "warm / PyJWT")):
        ratio = result["ratios"][name]
        verdict = "[green]met[/green]" if result["passed"][name] else "[red]missed[/red]"
        shown = "n/a" if ratio is None else f"{ratio:,.2f}×"
        table.add_row(f"{label} (goal ≥ {result['goals'][name]:g}×)", shown, verdict)
    table.add_section()
    for name, label in (
        ("dpop_cold_over_cold", "DPoP cold / cold"),
        ("dpop_warm_over_warm", "DPoP warm / warm"),
    ):
        table.add_row(f"{label} (time per call)", f"{result['dpop_cost'][name]:,.2f}×", "")
    return table


def main(json_path: Path | None, rounds: int, tokens: int) -> int:
    """Run the benchmark, print the table, and write the result as JSON to ``json_path`` if given.

    Returns:
        The exit status: 0 when every goal is met, 1 otherwise.
    """
    console = Console()
    with console.status("measuring token verification…"):
        result = run(rounds=rounds, tokens=tokens)
    console.print(render(result))
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        console.print(f"result written to {json_path}")
    return 0 if result["ok"] else 1
