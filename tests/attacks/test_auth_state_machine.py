"""A model-based search for a wrong answer: hypothesis drives the auth service through random sequences of
logins, refreshes, refresh-token reuse, revocations and key rotations, and a small model says which
access tokens must still be accepted. After every step each token the example made is checked with
``Introspect`` and on two resource replicas.

Everything runs as real processes (``authmesh auth-server`` and two ``authmesh resource-server``) on the
session's Redis and NATS, driven through the synchronous gRPC client, because hypothesis state machines
are synchronous. Examples share the processes; each one makes its own users, so examples do not see
each other's sessions (key rotations are global, and the model tracks the keys it saw retired).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from authmesh._shared.claims import AccessClaims
from authmesh._shared.grpc_errors import error_reason
from authmesh._shared.jose import decode_compact
from authmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from authmesh.processes import LOOPBACK, free_ports
from authmesh.resource.v1 import resource_pb2, resource_pb2_grpc
from authmesh.stack import ServiceProcess
from tests.auth_support import SERVICE, admin_login, bearer, service_login
from tests.faults import auth_process, clean_environment

# Kept modest so the whole search runs in well under a minute on two cores.
MAX_EXAMPLES = 20
STEP_COUNT = 12
REPLICAS = 2
PASSWORD = "model-password-1"
CALL_TIMEOUT = 10.0
# A revocation reaches the replicas within milliseconds; a check waits at most this long for it.
PROPAGATION_DEADLINE = 5.0
_POLL_SECONDS = 0.01


@dataclass(frozen=True, slots=True)
class Token:
    """An access token the example was given, and what it says about itself."""

    access: str
    jti: str
    sid: str
    sub: str
    kid: str
    issued_ms: int

    @classmethod
    def of(cls, access: str) -> Token:
        """Read a token's claims (unverified: the token is the auth service's own)."""
        jws = decode_compact(access)
        claims = AccessClaims.from_payload(jws.unverified_payload, jws.kid)
        return cls(access, claims.jti, claims.sid, claims.sub, jws.kid, claims.issued_at_ms)


@dataclass
class Session:
    """A session as the model sees it."""

    sid: str
    username: str
    sub: str
    current: str
    spent: list[str] = field(default_factory=list)
    revoked: bool = False


class Cluster:
    """The auth service and the replicas as processes, with synchronous clients."""

    def __init__(self, tmp_path: Path, redis_url: str, nats_url: str) -> None:
        self.auth_process = auth_process(tmp_path / "auth", redis_url, [nats_url])
        self.replica_processes = [self._replica(tmp_path, index, nats_url) for index in range(REPLICAS)]
        self.names = (f"model-{number}" for number in itertools.count())
        self.auth: auth_pb2_grpc.AuthServiceStub | None = None
        self.replicas: list[resource_pb2_grpc.ResourceServiceStub] = []
        self._admin: tuple[tuple[str, str]] | None = None
        self._service: tuple[tuple[str, str]] | None = None

    def _replica(self, tmp_path: Path, index: int, nats_url: str) -> ServiceProcess:
        grpc_port, http_port = free_ports(2)
        env = clean_environment()
        env.update(
            {
                "AUTHMESH_INSTANCE": f"model-replica-{index + 1}",
                "AUTHMESH_GRPC_LISTEN": f"{LOOPBACK}:{grpc_port}",
                "AUTHMESH_HTTP_LISTEN": f"{LOOPBACK}:{http_port}",
                "AUTHMESH_AUTH_TARGET": self.auth_process.grpc_address,
                "AUTHMESH_NATS_URLS": nats_url,
                "AUTHMESH_SERVICE_ACCOUNT": f"{SERVICE[0]}:{SERVICE[1]}",
                "AUTHMESH_STALENESS_BOUND": "1",
                "AUTHMESH_SHUTDOWN_GRACE": "0.2",
                "AUTHMESH_LOG_LEVEL": "warning",
            }
        )
        return ServiceProcess(
            f"replica-{index + 1}",
            tmp_path / f"replica-{index + 1}",
            command="resource-server",
            env=env,
            grpc_address=f"{LOOPBACK}:{grpc_port}",
            http_address=f"{LOOPBACK}:{http_port}",
        )

    @contextmanager
    def running(self) -> Iterator[Cluster]:
        """Start the processes and open the channels; stop everything on the way out."""
        with ExitStack() as stack:
            stack.callback(self.auth_process.stop_blocking)
            self.auth_process.start_blocking()
            for process in self.replica_processes:
                stack.callback(process.stop_blocking)
                process.start_blocking()
            channel = stack.enter_context(grpc.insecure_channel(self.auth_process.grpc_address))
            self.auth = auth_pb2_grpc.AuthServiceStub(channel)
            for process in self.replica_processes:
                replica_channel = stack.enter_context(grpc.insecure_channel(process.grpc_address))
                self.replicas.append(resource_pb2_grpc.ResourceServiceStub(replica_channel))
            yield self

    @property
    def stub(self) -> auth_pb2_grpc.AuthServiceStub:
        """The auth service."""
        assert self.auth is not None
        return self.auth

    def login(self, username: str, password: str) -> auth_pb2.TokenPair:
        """Log in."""
        reply: auth_pb2.TokenPair = self.stub.Login(
            auth_pb2.LoginRequest(username=username, password=password), timeout=CALL_TIMEOUT
        )
        return reply

    def admin(self) -> tuple[tuple[str, str]]:
        """Admin metadata (renewed after a key retirement)."""
        if self._admin is None:
            self._admin = bearer(self.stub.Login(admin_login(), timeout=CALL_TIMEOUT).access_token)
        return self._admin

    def service(self) -> tuple[tuple[str, str]]:
        """Service-account metadata (renewed after a key retirement)."""
        if self._service is None:
            self._service = bearer(self.stub.Login(service_login(), timeout=CALL_TIMEOUT).access_token)
        return self._service

    def forget_tokens(self) -> None:
        """The admin's and service's tokens may carry a retired key: log in again when next needed."""
        self._admin = self._service = None


def failure(call: Any) -> str:
    """Run a call expected to fail: its ``ErrorInfo.reason``, or ``OK`` if it succeeded."""
    try:
        call()
    except grpc.RpcError as error:
        return error_reason(error) or str(error.code().name)
    return "OK"


class AuthModel(RuleBasedStateMachine):
    """The auth service against a model of which tokens are active."""

    cluster: Cluster
    sessions = Bundle("sessions")

    def __init__(self) -> None:
        super().__init__()
        self.tokens: list[Token] = []
        self.subjects: dict[str, str] = {}
        self.all_sessions: list[Session] = []
        self.revoked_jtis: set[str] = set()
        self.revoked_sids: set[str] = set()
        self.user_not_before: dict[str, int] = {}
        self.retired_kids: set[str] = set()

    # the model

    def reasons(self, token: Token) -> set[str]:
        """Every reason the token must be refused for (empty: it must be accepted)."""
        found = set()
        if token.kid in self.retired_kids:
            found.add("KEY_REVOKED")
        if token.jti in self.revoked_jtis:
            found.add("TOKEN_REVOKED")
        if token.sid in self.revoked_sids:
            found.add("SESSION_REVOKED")
        if token.issued_ms <= self.user_not_before.get(token.sub, -1):
            found.add("USER_REVOKED")
        return found

    # rules

    @initialize()
    def make_users(self) -> None:
        """Two fresh users for this example."""
        admin = self.cluster.admin()
        for _ in range(2):
            name = next(self.cluster.names)
            reply = self.cluster.stub.CreateUser(
                auth_pb2.CreateUserRequest(username=name, password=PASSWORD, scopes=["docs:read"]),
                metadata=admin,
                timeout=CALL_TIMEOUT,
            )
            self.subjects[name] = reply.subject

    @rule(target=sessions, pick=st.integers(0, 1))
    def login(self, pick: int) -> Session:
        """Open a session."""
        username = sorted(self.subjects)[pick]
        pair = self.cluster.login(username, PASSWORD)
        token = Token.of(pair.access_token)
        self.tokens.append(token)
        session = Session(pair.session_id, username, token.sub, pair.refresh_token)
        self.all_sessions.append(session)
        return session

    @rule(session=sessions)
    def refresh(self, session: Session) -> None:
        """Rotate a session's refresh token: works exactly while the session is not revoked."""
        request = auth_pb2.RefreshRequest(refresh_token=session.current)
        if session.revoked:
            assert (
                failure(lambda: self.cluster.stub.Refresh(request, timeout=CALL_TIMEOUT))
                == "REFRESH_TOKEN_INVALID"
            )
            return
        pair = self.cluster.stub.Refresh(request, timeout=CALL_TIMEOUT)
        assert pair.session_id == session.sid
        self.tokens.append(Token.of(pair.access_token))
        session.spent.append(session.current)
        session.current = pair.refresh_token

    @precondition(lambda self: any(session.spent for session in self.all_sessions))
    @rule(data=st.data())
    def reuse(self, data: st.DataObject) -> None:
        """Present a spent refresh token: the whole session is revoked."""
        session = data.draw(st.sampled_from([s for s in self.all_sessions if s.spent]))
        spent = data.draw(st.sampled_from(session.spent))
        answer = failure(
            lambda: self.cluster.stub.Refresh(
                auth_pb2.RefreshRequest(refresh_token=spent), timeout=CALL_TIMEOUT
            )
        )
        assert answer == ("REFRESH_TOKEN_INVALID" if session.revoked else "REFRESH_TOKEN_REUSED")
        session.revoked = True
        self.revoked_sids.add(session.sid)

    @precondition(lambda self: bool(self.tokens))
    @rule(data=st.data())
    def revoke_token(self, data: st.DataObject) -> None:
        """Revoke one access token."""
        token = data.draw(st.sampled_from(self.tokens))
        self.cluster.stub.RevokeToken(
            auth_pb2.RevokeTokenRequest(token=token.access, reason="model"),
            metadata=self.cluster.admin(),
            timeout=CALL_TIMEOUT,
        )
        self.revoked_jtis.add(token.jti)

    @rule(session=sessions)
    def revoke_session(self, session: Session) -> None:
        """Revoke a session."""
        self.cluster.stub.RevokeSession(
            auth_pb2.RevokeSessionRequest(session_id=session.sid, reason="model"),
            metadata=self.cluster.admin(),
            timeout=CALL_TIMEOUT,
        )
        session.revoked = True
        self.revoked_sids.add(session.sid)

    @rule(session=sessions)
    def logout(self, session: Session) -> None:
        """Log out with the session's current refresh token."""
        self.cluster.stub.Logout(auth_pb2.LogoutRequest(refresh_token=session.current), timeout=CALL_TIMEOUT)
        session.revoked = True
        self.revoked_sids.add(session.sid)

    @rule(pick=st.integers(0, 1))
    def revoke_user(self, pick: int) -> None:
        """Revoke a user: every token issued so far and every session."""
        username = sorted(self.subjects)[pick]
        subject = self.subjects[username]
        reply = self.cluster.stub.RevokeUser(
            auth_pb2.RevokeUserRequest(subject=subject, reason="model"),
            metadata=self.cluster.admin(),
            timeout=CALL_TIMEOUT,
        )
        self.user_not_before[subject] = max(self.user_not_before.get(subject, -1), reply.revoked_at_unix_ms)
        for session in self.all_sessions:
            if session.sub == subject:
                session.revoked = True

    @rule()
    def rotate(self) -> None:
        """Rotate the signing key; the previous key keeps verifying."""
        self.cluster.stub.RotateSigningKey(
            auth_pb2.RotateSigningKeyRequest(retire_previous=False),
            metadata=self.cluster.admin(),
            timeout=CALL_TIMEOUT,
        )

    @rule()
    def rotate_and_retire(self) -> None:
        """Rotate and retire the previous key (compromise): its tokens die at once."""
        reply = self.cluster.stub.RotateSigningKey(
            auth_pb2.RotateSigningKeyRequest(retire_previous=True),
            metadata=self.cluster.admin(),
            timeout=CALL_TIMEOUT,
        )
        self.retired_kids.add(reply.previous_kid)
        self.cluster.forget_tokens()

    # the check

    @invariant()
    def tokens_are_active_exactly_as_the_model_says(self) -> None:
        """``Introspect`` and every replica agree with the model about every token of the example."""
        if not self.tokens:
            return
        service = self.cluster.service()
        introspections = [
            self.cluster.stub.Introspect.future(
                auth_pb2.IntrospectRequest(token=token.access), metadata=service, timeout=CALL_TIMEOUT
            )
            for token in self.tokens
        ]
        for token, future in zip(self.tokens, introspections, strict=True):
            answer = future.result()
            expected = self.reasons(token)
            assert answer.active == (not expected), (token.jti, expected, answer.inactive_reason)
            if expected:
                assert answer.inactive_reason in expected, (answer.inactive_reason, expected)
        for replica in self.cluster.replicas:
            self._replica_agrees(replica)

    def _replica_agrees(self, replica: resource_pb2_grpc.ResourceServiceStub) -> None:
        deadline = time.monotonic() + PROPAGATION_DEADLINE
        pending = list(self.tokens)
        while True:
            futures = [
                replica.WhoAmI.future(resource_pb2.WhoAmIRequest(), metadata=bearer(t.access), timeout=5)
                for t in pending
            ]
            wrong = []
            for token, future in zip(pending, futures, strict=True):
                try:
                    future.result()
                    seen = "OK"
                except grpc.RpcError as error:
                    seen = error_reason(error) or "UNKNOWN_FAILURE"
                expected = self.reasons(token)
                if (seen == "OK") != (not expected) or (expected and seen not in expected):
                    wrong.append((token, seen, expected))
            if not wrong:
                return
            # Only a revocation still on its way may be seen late; an acceptance never comes back.
            assert all(seen == "OK" for _, seen, _ in wrong), wrong
            assert time.monotonic() < deadline, wrong
            pending = [token for token, _, _ in wrong]
            time.sleep(_POLL_SECONDS)


def test_random_sequences_of_logins_refreshes_revocations_and_rotations_match_the_model(
    tmp_path: Path, redis_url: str, nats_url: str
) -> None:
    """Invariant, after every step of up to 12 random operations (login, refresh, refresh-token reuse, revoke
    token / session / user, logout, rotate, rotate and retire), in 20 examples:

    - ``Introspect`` calls each access token of the example active exactly when the model says so, and when
      it is not active gives one of the reasons the model knows;
    - each resource replica accepts exactly the tokens the model calls active (a revocation may take up to
      a few seconds to arrive, an acceptance of a revoked token never comes back after a refusal), and
      refuses the others with one of those reasons;
    - a refresh works exactly while its session is not revoked; presenting a spent refresh token is
      ``REFRESH_TOKEN_REUSED`` on a live session.
    """
    with Cluster(tmp_path, redis_url, nats_url).running() as cluster:
        AuthModel.cluster = cluster
        run_state_machine_as_test(
            AuthModel,
            settings=settings(
                max_examples=MAX_EXAMPLES,
                stateful_step_count=STEP_COUNT,
                deadline=None,
                suppress_health_check=list(HealthCheck),
            ),
        )
