"""Every Redis key, TTL and Lua script of the auth service, in one place.

Each state change that must be broadcast is written in ONE atomic step together with its event, which
goes into an outbox hash (``am:outbox``); the publisher sends outbox entries to JetStream and deletes them
once acknowledged. So a revocation is never in Redis without its event eventually following, and a
retried RPC finds the same event again instead of inventing a second one.

Keys (all prefixed ``am:``)::

    user:{username}            JSON {sub, password_hash, scopes, created_ms}
    sub:{sub}                  username
    user_sessions:{sub}        set of session ids (lives as long as its longest-lived session)
    user_nbf:{sub}             the cut of the latest RevokeUser (ms), never expiring: a session opened at
                               or before it can neither refresh nor mint, however long it lives
    user_disabled:{sub}        the reason, while the account is disabled
    session:{sid}              hash {sub, username, scopes, created_ms, last_ms (latest issue instant),
                               refresh, revoked_ms, revoke_event}
    refresh:{sha256}           hash {sid, state: live|spent, exp_ms}
    revoked_jti:{jti}          "{revoked_ms} {event_id}" until the token's exp + leeway
    revoked_jtis               zset jti -> exp (for snapshots)
    revoked_sessions           zset "sid sub" -> revoked_ms
    revoked_users              zset sub -> not_before_ms
    key:{kid}                  hash {sealed, created_ms, state: active|verify_only|retired, not_after_ms}
    keys                       set of kids
    keys:active                the active kid
    outbox                     hash event_id -> event JSON
    login_failures:{username}  failed-login counter for the rate limit
    login_checks:{username}    zset: password checks in flight (id -> lease end, ms) for the rate limit
    rotation:{request_id}      "kid previous_kid event_id…" of a RotateSigningKey, for its retries
    users                      zset of usernames, all with score 0 (listed in username order)
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Concatenate, ParamSpec, TypeVar

import redis.asyncio as redis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from authmesh._auth_service.redis_scripts import LuaScript, ReplicaAck, ScriptRunner
from authmesh._shared.errors import (
    ConfigurationError,
    NotFound,
    RateLimited,
    StoreError,
    StoreUnavailable,
    UserDisabled,
)

PREFIX = "am:"
OUTBOX = PREFIX + "outbox"
KEYS_SET = PREFIX + "keys"
ACTIVE_KID = PREFIX + "keys:active"
REVOKED_JTIS = PREFIX + "revoked_jtis"
REVOKED_SESSIONS = PREFIX + "revoked_sessions"
REVOKED_USERS = PREFIX + "revoked_users"
REVOKED_KEY_BINDINGS = PREFIX + "revoked_jkts"
RETIRED_KEYS = PREFIX + "retired_keys"
USERS = PREFIX + "users"
# SCAN batch of the start-up user index backfill.
_USER_SCAN_BATCH = 1000

# The oldest server the scripts and commands work on: EXPIRE … NX and the 7.0 script semantics. Valkey
# reports the Redis version it is compatible with (7.2.4 for Valkey 7.2 to 9), so one check covers both.
MINIMUM_REDIS_VERSION = (7, 0)
MINIMUM_SERVER_TEXT = "Redis >= 7.0 or Valkey >= 7.2"

_log = structlog.get_logger(__name__)
_P = ParamSpec("_P")
_R = TypeVar("_R")
# redis-py prefixes a pipeline's error with the whole command, arguments (values) included.
_PIPELINE_PREFIX = re.compile(r"^Command # \d+ \((?P<command>\S+).*?\) of pipeline caused error: ", re.S)
# Redis echoes the first arguments of an unknown command; they may be keys or values.
_ECHOED_ARGUMENTS = ", with args beginning with:"


def redis_error_message(error: RedisError) -> tuple[str | None, str]:
    """The command a pipeline names (if any) and Redis's own message, without any argument it echoed."""
    text = str(error)
    command = None
    prefix = _PIPELINE_PREFIX.match(text)
    if prefix is not None:
        command = prefix.group("command").upper()
        text = text[prefix.end() :]
    return command, text.split(_ECHOED_ARGUMENTS, 1)[0].strip()


def translate_redis_error(command: str, error: BaseException) -> StoreUnavailable | StoreError:
    """The error a failed Redis call means for a caller, logged once with its cause.

    A lost connection or a timeout is an outage (``STORE_UNAVAILABLE``, retrying is safe); an error reply
    (a script error, an unknown command, ``WRONGTYPE``, ``OOM`` under ``noeviction``) is not, and is
    ``STORE_ERROR``. Only the command's name and Redis's message are logged, never a key or a value.

    Args:
        command: What was sent (``EVALSHA rotate_refresh``, ``MULTI INCR EXPIRE TTL EXEC``, …).
        error: What redis-py raised.
    """
    if isinstance(error, RedisConnectionError | RedisTimeoutError | OSError):
        _log.warning("token store unavailable", command=command, cause=f"{type(error).__name__}: {error}")
        return StoreUnavailable()
    failed, message = redis_error_message(error) if isinstance(error, RedisError) else (None, str(error))
    # redis-py strips the code of the replies it has a class for (OOM → OutOfMemoryError): keep the class.
    _log.error(
        "token store refused a command",
        command=failed or command,
        error_type=type(error).__name__,
        redis_error=message,
    )
    return StoreError("token store refused the command")


def _store_call(
    command: str,
) -> Callable[
    [Callable[Concatenate[AuthStore, _P], Awaitable[_R]]], Callable[Concatenate[AuthStore, _P], Awaitable[_R]]
]:
    """Translate what redis-py raises inside the method into our errors (see ``translate_redis_error``)."""

    def decorate(
        method: Callable[Concatenate[AuthStore, _P], Awaitable[_R]],
    ) -> Callable[Concatenate[AuthStore, _P], Awaitable[_R]]:
        @functools.wraps(method)
        async def call(store: AuthStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return await method(store, *args, **kwargs)
            except (RedisError, OSError) as error:
                raise translate_redis_error(command, error) from error

        return call

    return decorate


def parse_version(text: str) -> tuple[int, ...]:
    """``"7.2.4"`` → ``(7, 2, 4)``; the numeric prefix of each part (``"7.0.15-rc1"`` → ``(7, 0, 15)``)."""
    parts = []
    for part in text.split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def server_version_problem(info: Mapping[str, Any]) -> str | None:
    """Why the server ``INFO server`` describes is too old for the auth service, or None if it is not.

    Args:
        info: The parsed ``INFO server`` section (``redis_version``, and ``valkey_version`` on Valkey).
    """
    redis_version = str(info.get("redis_version", ""))
    valkey_version = info.get("valkey_version")
    if not redis_version:
        found = "a server that reports no redis_version"
    elif parse_version(redis_version) >= MINIMUM_REDIS_VERSION:
        return None
    elif valkey_version:
        found = f"Valkey {valkey_version} (redis_version {redis_version})"
    else:
        found = f"Redis {redis_version}"
    return f"the token store runs {found}; authmesh needs {MINIMUM_SERVER_TEXT}"


def user_key(username: str) -> str:
    """The user record."""
    return f"{PREFIX}user:{username}"


def sub_key(sub: str) -> str:
    """Subject → username."""
    return f"{PREFIX}sub:{sub}"


def user_sessions_key(sub: str) -> str:
    """A user's session ids."""
    return f"{PREFIX}user_sessions:{sub}"


def user_nbf_key(sub: str) -> str:
    """A user's revocation instant."""
    return f"{PREFIX}user_nbf:{sub}"


def user_disabled_key(sub: str) -> str:
    """Present while a user is disabled."""
    return f"{PREFIX}user_disabled:{sub}"


def session_key(sid: str) -> str:
    """A session."""
    return f"{PREFIX}session:{sid}"


def refresh_key(token_hash: str) -> str:
    """A refresh token, by the hash of its value."""
    return f"{PREFIX}refresh:{token_hash}"


def revoked_jti_key(jti: str) -> str:
    """A revoked access token."""
    return f"{PREFIX}revoked_jti:{jti}"


def revoked_jkt_key(jkt: str) -> str:
    """A revoked DPoP key binding (kept as long as a refresh token lives)."""
    return f"{PREFIX}revoked_jkt:{jkt}"


def key_record_key(kid: str) -> str:
    """A signing key record."""
    return f"{PREFIX}key:{kid}"


def rotation_key(request_id: str) -> str:
    """The outcome of a RotateSigningKey call, by its idempotency key."""
    return f"{PREFIX}rotation:{request_id}"


def login_failures_key(username: str) -> str:
    """The failed-login counter."""
    return f"{PREFIX}login_failures:{username}"


class LoginOutcome(StrEnum):
    """How a password check that held a unit of the failure budget ended."""

    FAILED = "failed"
    SUCCEEDED = "succeeded"
    ABANDONED = "abandoned"  # the login ended before its password was checked


def login_checks_key(username: str) -> str:
    """The password checks in flight for a username."""
    return f"{PREFIX}login_checks:{username}"


def hash_refresh_token(token: str) -> str:
    """Refresh tokens are stored only as SHA-256 hashes (they are 256-bit random, so no salt is needed)."""
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


# Only failed password checks count against a username. A check in flight holds one unit of what is
# left of the budget until it ends (so guesses sent at once never check more passwords than the limit
# allows); a check that succeeds, or a login abandoned before its check started, gives it back. A
# lease bounds how long a check whose replica died keeps its unit. Redis's clock dates the leases, so
# replicas with skewed clocks agree.
# KEYS: login_failures, login_checks
# ARGV: max_failures, lease_ms, check id
# Returns {1, 0} (admitted) or {0, retry_after_ms}.
_RESERVE_LOGIN_CHECK = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms)
local failures = tonumber(redis.call('GET', KEYS[1]) or '0')
local in_flight = redis.call('ZCARD', KEYS[2])
if failures + in_flight >= tonumber(ARGV[1]) then
  if failures >= tonumber(ARGV[1]) then
    return {0, math.max(redis.call('PTTL', KEYS[1]), 1000)}
  end
  return {0, 1000}
end
local lease_end = now_ms + tonumber(ARGV[2])
redis.call('ZADD', KEYS[2], lease_end, ARGV[3])
redis.call('PEXPIREAT', KEYS[2], lease_end, 'GT')
redis.call('PEXPIREAT', KEYS[2], lease_end, 'NX')
return {1, 0}
"""

# KEYS: login_failures, login_checks
# ARGV: check id, outcome (failed | succeeded | abandoned), window_s
_SETTLE_LOGIN_CHECK = """
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[2] == 'failed' then
  redis.call('INCR', KEYS[1])
  redis.call('EXPIRE', KEYS[1], ARGV[3], 'NX')
elseif ARGV[2] == 'succeeded' then
  redis.call('DEL', KEYS[1])
end
return 1
"""

# KEYS: refresh(old), refresh(new), outbox, revoked_sessions, active kid
# ARGV: now_ms, new_exp_ms, ttl_ms, reuse_event_id, session_prefix, user_nbf prefix,
#       user_disabled prefix, user_sessions prefix, the jkt of the request's DPoP proof ('' for none),
#       revoked_jkt prefix
# Returns {ok, sid, sub, scopes, username, active kid, issue ms, jkt}, {reused, sid, sub, active kid},
# {revoked, sid, sub, the event that revoked it}, {disabled, sid, sub} or {invalid}. The active kid
# rides along so that minting the new access token, or signing the reuse event, needs no second round
# trip. A session opened at or before its user's cut is revoked whatever the per-user set remembers,
# and the new token's issue instant is after that cut: Redis decides both in one step, so a replica
# (which knows only the cut) and Introspect (which reads the session) always agree. A session bound to
# a DPoP key is refused ({key_mismatch}) before anything else, spent or not, unless the request proves
# that key: a stolen refresh token without the key neither rotates nor revokes anything.
_ROTATE_REFRESH = """
local old = redis.call('HMGET', KEYS[1], 'sid', 'state', 'exp_ms')
if not old[1] then return {'invalid'} end
local now = tonumber(ARGV[1])
if tonumber(old[3]) <= now then return {'invalid'} end
local skey = ARGV[5] .. old[1]
local s = redis.call('HMGET', skey, 'sub', 'scopes', 'username', 'revoked_ms', 'created_ms', 'revoke_event',
                     'jkt')
if not s[1] then return {'invalid'} end
if (s[7] or '') ~= ARGV[9] then return {'key_mismatch', old[1], s[1]} end
if ARGV[9] ~= '' and redis.call('EXISTS', ARGV[10] .. ARGV[9]) == 1 then
  return {'revoked', old[1], s[1], ''}
end
if s[4] ~= '0' then return {'revoked', old[1], s[1], s[6] or ''} end
local cut = tonumber(redis.call('GET', ARGV[6] .. s[1]) or '0')
if cut >= tonumber(s[5]) then return {'revoked', old[1], s[1], ''} end
if redis.call('EXISTS', ARGV[7] .. s[1]) == 1 then return {'disabled', old[1], s[1]} end
if old[2] ~= 'live' then
  redis.call('HSET', skey, 'revoked_ms', ARGV[1], 'revoke_event', ARGV[4])
  redis.call('ZADD', KEYS[4], now, old[1] .. ' ' .. s[1])
  local event = cjson.encode({id = ARGV[4], ms = ARGV[1], type = 'revoked.session',
                              body = {sid = old[1], sub = s[1]}})
  redis.call('HSET', KEYS[3], ARGV[4], event)
  return {'reused', old[1], s[1], redis.call('GET', KEYS[5]) or ''}
end
local issued = now
if issued <= cut then issued = cut + 1 end
redis.call('HSET', KEYS[1], 'state', 'spent')
redis.call('HSET', KEYS[2], 'sid', old[1], 'state', 'live', 'exp_ms', ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('HSET', skey, 'refresh', KEYS[2], 'last_ms', string.format('%d', issued))
if redis.call('PTTL', skey) < tonumber(ARGV[3]) then redis.call('PEXPIRE', skey, ARGV[3]) end
local sessions = ARGV[8] .. s[1]
if redis.call('PTTL', sessions) < tonumber(ARGV[3]) then redis.call('PEXPIRE', sessions, ARGV[3]) end
return {'ok', old[1], s[1], s[2], s[3], redis.call('GET', KEYS[5]) or '', string.format('%d', issued),
        s[7] or ''}
"""

# KEYS: session, refresh, user_sessions, user_nbf, user_disabled
# ARGV: now_ms, ttl_ms, sid, sub, username, scopes, jkt of the DPoP key the session is bound to ('' for none)
# Returns {ok, issue ms} or {disabled}. The session is born after its user's latest cut (its issue
# instant is moved past the cut when this clock is behind the one that made it), so a Login racing a
# RevokeUser either lands before the cut (and is revoked with everything else) or after it.
_OPEN_SESSION = """
if redis.call('EXISTS', KEYS[5]) == 1 then return {'disabled'} end
local issued = tonumber(ARGV[1])
local cut = tonumber(redis.call('GET', KEYS[4]) or '0')
if issued <= cut then issued = cut + 1 end
local ms = string.format('%d', issued)
local ttl = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'sub', ARGV[4], 'username', ARGV[5], 'scopes', ARGV[6], 'created_ms', ms,
           'last_ms', ms, 'refresh', KEYS[2], 'revoked_ms', '0', 'revoke_event', '', 'jkt', ARGV[7])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('HSET', KEYS[2], 'sid', ARGV[3], 'state', 'live', 'exp_ms', string.format('%d', issued + ttl))
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('SADD', KEYS[3], ARGV[3])
if redis.call('PTTL', KEYS[3]) < ttl then redis.call('PEXPIRE', KEYS[3], ttl) end
return {'ok', ms}
"""

# KEYS: user, subject index of the new user, username index (zset)
# ARGV: record JSON, username, subject-index prefix
# Returns 'created' or 'exists'. One step, so there is never a user whom RevokeUser cannot find (nor
# one ListUsers does not list); an existing user whose subject index is missing (written by a version
# that wrote the two apart) gets it back, so a retry repairs it.
_CREATE_USER = """
local existing = redis.call('GET', KEYS[1])
redis.call('ZADD', KEYS[3], 0, ARGV[2])
if existing then
  redis.call('SET', ARGV[3] .. cjson.decode(existing).sub, ARGV[2], 'NX')
  return 'exists'
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
return 'created'
"""

# The revocation scripts return {status, revoked_ms, event_id, active kid}: the event that broadcasts the
# revocation (this call's, or an earlier one's when already revoked) and the kid to sign it with, so
# publishing it needs no further round trip.

# KEYS: session, revoked_sessions, outbox, active kid
# ARGV: now_ms, event_id, event_json, sid
# status ok | already | missing.
_REVOKE_SESSION = """
local s = redis.call('HMGET', KEYS[1], 'sub', 'revoked_ms', 'revoke_event')
if not s[1] then return {'missing'} end
local active = redis.call('GET', KEYS[4]) or ''
if s[2] ~= '0' then return {'already', s[2], s[3], active} end
redis.call('HSET', KEYS[1], 'revoked_ms', ARGV[1], 'revoke_event', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[4] .. ' ' .. s[1])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
return {'ok', ARGV[1], ARGV[2], active}
"""

# KEYS: revoked_jti, revoked_jtis, outbox, active kid (or a DPoP key binding's marker and zset)
# ARGV: now_ms, event_id, event_json, jti (or jkt), zset score (exp in s, or now_ms), ttl_ms
# status ok | already.
_REVOKE_TOKEN = """
local active = redis.call('GET', KEYS[4]) or ''
local existing = redis.call('GET', KEYS[1])
if existing then
  local sep = string.find(existing, ' ')
  return {'already', string.sub(existing, 1, sep - 1), string.sub(existing, sep + 1), active}
end
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[2], 'PX', ARGV[6])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
return {'ok', ARGV[1], ARGV[2], active}
"""

# KEYS: a string
# ARGV: the value it must still have, its new value
# Returns 1 when replaced, 0 when the value had changed.
_REPLACE_IF_UNCHANGED = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""

# KEYS: user_nbf, user_sessions, revoked_users, outbox, user_disabled, active kid
# ARGV: now_ms, event_id, event_json, sub, session_prefix, disable reason ('' leaves the account enabled)
# status ok; revoked_ms is the cut. The cut is never earlier than a token already issued in any of the
# user's sessions (their last_ms), nor than an earlier cut, whatever this replica's clock says: every
# token minted before this step is covered at the replicas, which know only the cut. The cut never
# expires, so no session opened before it can refresh, however long refreshes kept it alive. The event
# is the caller's, with the cut written into it.
_REVOKE_USER = """
local cut = tonumber(ARGV[1])
local previous = tonumber(redis.call('GET', KEYS[1]) or '0')
if previous > cut then cut = previous end
local sids = redis.call('SMEMBERS', KEYS[2])
for _, sid in ipairs(sids) do
  local last = tonumber(redis.call('HGET', ARGV[5] .. sid, 'last_ms') or '0')
  if last > cut then cut = last end
end
local ms = string.format('%d', cut)
for _, sid in ipairs(sids) do
  local skey = ARGV[5] .. sid
  if redis.call('HGET', skey, 'revoked_ms') == '0' then
    redis.call('HSET', skey, 'revoked_ms', ms, 'revoke_event', ARGV[2])
  end
end
redis.call('SET', KEYS[1], ms)
redis.call('ZADD', KEYS[3], ms, ARGV[4])
redis.call('DEL', KEYS[2])
if ARGV[6] ~= '' then redis.call('SET', KEYS[5], ARGV[6]) end
local event = cjson.decode(ARGV[3])
event.body.not_before_ms = ms
redis.call('HSET', KEYS[4], ARGV[2], cjson.encode(event))
return {'ok', ms, ARGV[2], redis.call('GET', KEYS[6]) or ''}
"""

# KEYS: active, keys set, new key record, previous key record, outbox, retired_keys
# ARGV: expected previous kid, new kid, sealed, now_ms, previous state, previous not_after_ms,
#       then pairs of (event_id, event_json)
# KEYS: revoked_jti, session, user_nbf, key record, revoked_jkt
# Returns {jti revoked (0|1), session revoked_ms, user nbf_ms, key state, key binding revoked (0|1)}, ''
# for what is not stored. A
# script rather than a pipeline: this check guards every authenticated call and Introspect, and a script
# call costs the client less than half the CPU of redis-py's pipeline (about 130 µs against 350 µs).
_REVOCATION_STATE = """
return {redis.call('EXISTS', KEYS[1]), redis.call('HGET', KEYS[2], 'revoked_ms') or '',
        redis.call('GET', KEYS[3]) or '', redis.call('HGET', KEYS[4], 'state') or '',
        redis.call('EXISTS', KEYS[5])}
"""

# KEYS: outbox
# ARGV: event_id
_OUTBOX_DONE = """
return redis.call('HDEL', KEYS[1], ARGV[1])
"""

# KEYS: revoked_jtis, revoked_sessions, revoked_users, retired_keys, revoked_key_bindings
# ARGV: expired jtis up to (s), expired sessions, users and key bindings up to (ms)
# Drops what can no longer matter, then returns {jti, exp, …}, {"sid sub", revoked_ms, …},
# {sub, nbf_ms, …} and {kid, …}: flat arrays that hiredis parses in C, where redis-py's pipeline turned
# every score into a Python float and every member into a tuple: 0.3 to 0.5 s of CPU per 100k tokens
# then, 0.07 to 0.15 s now.
_SNAPSHOT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', ARGV[2])
return {redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES'),
        redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES'),
        redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES'),
        redis.call('ZRANGE', KEYS[4], 0, -1),
        redis.call('ZRANGE', KEYS[5], 0, -1, 'WITHSCORES')}
"""

_ROTATE_KEY = """
local current = redis.call('GET', KEYS[1]) or ''
if current ~= ARGV[1] then return {'conflict', current} end
redis.call('HSET', KEYS[3], 'sealed', ARGV[3], 'created_ms', ARGV[4], 'state', 'active', 'not_after_ms', '0')
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('SET', KEYS[1], ARGV[2])
if ARGV[1] ~= '' then
  redis.call('HSET', KEYS[4], 'state', ARGV[5], 'not_after_ms', ARGV[6])
  if ARGV[5] == 'retired' then redis.call('ZADD', KEYS[6], ARGV[4], ARGV[1]) end
end
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[5], ARGV[i], ARGV[i + 1]) end
return {'ok'}
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(flat: list[Any]) -> Iterator[tuple[Any, Any]]:
    """``[a, 1, b, 2]`` → ``(a, 1), (b, 2)`` (a sorted set read with its scores)."""
    items = iter(flat)
    return zip(items, items, strict=False)


def _sid_and_sub(member: Any) -> tuple[str, str]:
    sid, _, sub = _text(member).partition(" ")
    return sid, sub


@dataclass(frozen=True, slots=True)
class UserRecord:
    """A stored user."""

    username: str
    sub: str
    password_hash: str
    scopes: tuple[str, ...]
    created_ms: int


def _user(username: str, raw: bytes | str) -> UserRecord:
    data = json.loads(raw)
    return UserRecord(
        username=username,
        sub=data["sub"],
        password_hash=data["password_hash"],
        scopes=tuple(data["scopes"]),
        created_ms=int(data["created_ms"]),
    )


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A stored session."""

    sid: str
    sub: str
    username: str
    scopes: tuple[str, ...]
    created_ms: int
    revoked_ms: int
    jkt: str | None = None

    @property
    def revoked(self) -> bool:
        """Whether the session has been revoked."""
        return self.revoked_ms > 0


@dataclass(frozen=True, slots=True)
class RotationResult:
    """What a refresh-token rotation found.

    ``status`` is ``ok`` (rotated), ``invalid`` (unknown or expired), ``revoked`` (its session or its
    user is revoked), ``disabled`` (its user is disabled), ``key_mismatch`` (the session is bound to a
    DPoP key the request did not prove, or the request proved a key the session is not bound to) or
    ``reused`` (a spent token: the session has just been revoked, its event is in the outbox).
    ``active_kid`` and ``issued_ms`` (the issue instant of the new access token) and ``jkt`` (the
    session's DPoP key) come with ``ok``, ``active_kid`` with ``reused``; ``revoke_event`` is the event
    that revoked the session, when a session revocation did.
    """

    status: str
    sid: str = ""
    sub: str = ""
    scopes: tuple[str, ...] = ()
    username: str = ""
    active_kid: str | None = None
    issued_ms: int = 0
    revoke_event: str = ""
    jkt: str | None = None


@dataclass(frozen=True, slots=True)
class RevocationResult:
    """The outcome of a revocation write: when it took effect and the event that broadcasts it.

    ``active_kid`` is the signing kid read in the same step (None when unknown).
    """

    revoked_at_ms: int
    event_id: str
    already: bool
    active_kid: str | None = None


def _revocation(reply: Any) -> RevocationResult:
    status, revoked_ms, event_id, active_kid = (_text(v) for v in reply)
    return RevocationResult(
        int(revoked_ms), event_id, already=status == "already", active_kid=active_kid or None
    )


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A stored signing key (private key sealed with the key-encryption key)."""

    kid: str
    sealed: str
    created_ms: int
    state: str
    not_after_ms: int


@dataclass(frozen=True, slots=True)
class RevocationSnapshot:
    """Every revocation still in force."""

    tokens: list[tuple[str, int]]
    sessions: list[tuple[str, str, int]]
    users: list[tuple[str, int]]
    retired_key_ids: list[str]
    key_bindings: list[tuple[str, int]] = field(default_factory=list)


class AuthStore:
    """The auth service's Redis state.

    Args:
        client: A redis-py asyncio client (``decode_responses=False``).
        access_ttl: Access-token lifetime, s (how long revocations of access tokens matter).
        leeway: Clock leeway, s.
        replica_ack: Replicas that must hold a revocation, a key rotation, a refresh rotation or a new
            session before it is acknowledged (None: none, a single Redis).
    """

    def __init__(
        self, client: redis.Redis, *, access_ttl: int, leeway: float, replica_ack: ReplicaAck | None = None
    ) -> None:
        self._redis = client
        self._replica_ack = replica_ack
        self._expiry_margin_ms = int((leeway + 60) * 1000)
        self._revocation_horizon_ms = int(access_ttl * 1000) + self._expiry_margin_ms
        self._scripts = ScriptRunner(client.connection_pool)
        self._rotate_refresh = LuaScript.of(_ROTATE_REFRESH)
        self._revoke_session = LuaScript.of(_REVOKE_SESSION)
        self._revoke_token = LuaScript.of(_REVOKE_TOKEN)
        self._revoke_user = LuaScript.of(_REVOKE_USER)
        self._open_session = LuaScript.of(_OPEN_SESSION)
        self._create_user = LuaScript.of(_CREATE_USER)
        self._replace_if_unchanged = LuaScript.of(_REPLACE_IF_UNCHANGED)
        self._rotate_key = LuaScript.of(_ROTATE_KEY)
        self._revocation_state = LuaScript.of(_REVOCATION_STATE)
        self._outbox_done = LuaScript.of(_OUTBOX_DONE)
        self._snapshot = LuaScript.of(_SNAPSHOT)
        self._reserve_login_check = LuaScript.of(_RESERVE_LOGIN_CHECK)
        self._settle_login_check = LuaScript.of(_SETTLE_LOGIN_CHECK)

    @property
    def redis(self) -> redis.Redis:
        """The underlying client."""
        return self._redis

    @_store_call("PING")
    async def ping(self) -> None:
        """Raise if Redis does not answer."""
        await self._redis.ping()

    @_store_call("INFO server")
    async def check_server_version(self) -> None:
        """Refuse a server older than the commands and scripts need.

        Raises:
            ConfigurationError: The server is too old (the message names what it found and what is needed).
        """
        problem = server_version_problem(await self._redis.info("server"))
        if problem is not None:
            raise ConfigurationError(problem)

    # users

    @_store_call("EVALSHA create_user")
    async def create_user(self, user: UserRecord) -> bool:
        """Store a new user and its subject index in one step; False if the username is taken."""
        record = json.dumps(
            {
                "sub": user.sub,
                "password_hash": user.password_hash,
                "scopes": list(user.scopes),
                "created_ms": user.created_ms,
            }
        )
        reply = await self._scripts.run(
            self._create_user,
            keys=[user_key(user.username), sub_key(user.sub), USERS],
            args=[record, user.username, f"{PREFIX}sub:"],
        )
        return _text(reply) == "created"

    @_store_call("GET, EVALSHA replace_if_unchanged")
    async def replace_password_hash(self, username: str, old_hash: str, new_hash: str) -> bool:
        """Swap a user's password hash, unless the record changed since it was read (then False)."""
        raw = await self._redis.get(user_key(username))
        if raw is None:
            return False
        data = json.loads(raw)
        if data.get("password_hash") != old_hash:
            return False
        data["password_hash"] = new_hash
        reply = await self._scripts.run(
            self._replace_if_unchanged, keys=[user_key(username)], args=[_text(raw), json.dumps(data)]
        )
        return bool(int(reply))

    @_store_call("SCAN ZADD")
    async def index_users(self) -> int:
        """Add every stored user to the username index (users stored before it existed); how many."""
        prefix = user_key("")
        added = 0
        async for key in self._redis.scan_iter(match=f"{prefix}*", count=_USER_SCAN_BATCH):
            added += int(await self._redis.zadd(USERS, {_text(key)[len(prefix) :]: 0}, nx=True) or 0)
        return added

    @_store_call("ZRANGEBYLEX MGET")
    async def list_users(
        self, *, after: str, prefix: str, limit: int
    ) -> tuple[list[tuple[UserRecord, bool]], bool]:
        """Up to ``limit`` users named after ``after`` (exclusive) and starting with ``prefix``.

        Returns:
            The users in username order, each with whether it is disabled, and whether more follow.
        """
        low = f"({after}" if after and after >= prefix else (f"[{prefix}" if prefix else "-")
        # Usernames are ASCII, so every name that starts with the prefix sorts below prefix + 0xff.
        high = b"[" + prefix.encode() + b"\xff" if prefix else b"+"
        names = await self._redis.zrangebylex(USERS, low, high, start=0, num=limit + 1)
        page = [_text(name) for name in names[:limit]]
        records = await self._redis.mget([user_key(name) for name in page]) if page else []
        users = [_user(name, raw) for name, raw in zip(page, records, strict=True) if raw is not None]
        disabled = await self._redis.mget([user_disabled_key(user.sub) for user in users]) if users else []
        return [(user, flag is not None) for user, flag in zip(users, disabled, strict=True)], len(
            names
        ) > limit

    @_store_call("GET")
    async def get_user(self, username: str) -> UserRecord | None:
        """A user by name."""
        raw = await self._redis.get(user_key(username))
        return None if raw is None else _user(username, raw)

    @_store_call("EXISTS")
    async def user_exists(self, sub: str) -> bool:
        """Whether a subject names a user."""
        return bool(await self._redis.exists(sub_key(sub)))

    # rate limit

    @_store_call("EVALSHA reserve_login_check")
    async def reserve_login_check(
        self, username: str, check_id: str, *, max_failures: int, lease: float
    ) -> None:
        """Hold one unit of ``username``'s failure budget for a password check about to run.

        Raises:
            RateLimited: The failures in the window and the checks in flight use up the budget.
        """
        admitted, retry_after_ms = await self._scripts.run(
            self._reserve_login_check,
            (login_failures_key(username), login_checks_key(username)),
            (max_failures, int(lease * 1000), check_id),
        )
        if not int(admitted):
            raise RateLimited(int(retry_after_ms) / 1000)

    @_store_call("EVALSHA settle_login_check")
    async def settle_login_check(
        self, username: str, check_id: str, outcome: LoginOutcome, window: int
    ) -> None:
        """End a check: a failure counts for ``window`` seconds, a success clears the failures."""
        await self._scripts.run(
            self._settle_login_check,
            (login_failures_key(username), login_checks_key(username)),
            (check_id, outcome.value, window),
        )

    # sessions and refresh tokens

    @_store_call("EVALSHA open_session")
    async def open_session(self, session: SessionRecord, refresh_hash: str, ttl_ms: int) -> int:
        """Store a new session with its first refresh token; return its issue instant (ms).

        The instant is ``session.created_ms``, or just after the user's latest cut when that is later.

        Raises:
            UserDisabled: The account is disabled.
        """
        reply = await self._scripts.run(
            self._open_session,
            keys=[
                session_key(session.sid),
                refresh_key(refresh_hash),
                user_sessions_key(session.sub),
                user_nbf_key(session.sub),
                user_disabled_key(session.sub),
            ],
            args=[
                session.created_ms,
                ttl_ms,
                session.sid,
                session.sub,
                session.username,
                " ".join(session.scopes),
                session.jkt or "",
            ],
            ack=self._replica_ack,
        )
        if _text(reply[0]) == "disabled":
            raise UserDisabled()
        return int(reply[1])

    @_store_call("HGETALL")
    async def get_session(self, sid: str) -> SessionRecord | None:
        """A session by id."""
        raw = await self._redis.hgetall(session_key(sid))
        if not raw:
            return None
        data = {_text(k): _text(v) for k, v in raw.items()}
        return SessionRecord(
            sid=sid,
            sub=data["sub"],
            username=data["username"],
            scopes=tuple(data["scopes"].split()),
            created_ms=int(data["created_ms"]),
            revoked_ms=int(data["revoked_ms"]),
            jkt=data.get("jkt") or None,
        )

    @_store_call("HGET")
    async def session_of_refresh(self, refresh_hash: str) -> str | None:
        """The session a refresh token belongs to (spent or not)."""
        sid = await self._redis.hget(refresh_key(refresh_hash), "sid")
        return _text(sid) if sid is not None else None

    @_store_call("EVALSHA rotate_refresh")
    async def rotate_refresh(
        self,
        old_hash: str,
        new_hash: str,
        now_ms: int,
        ttl_ms: int,
        reuse_event_id: str,
        jkt: str | None = None,
    ) -> RotationResult:
        """Spend a refresh token and store its successor, atomically; detect reuse.

        ``jkt`` is the key the request proved possession of (DPoP): it must be the session's binding.
        """
        result = await self._scripts.run(
            self._rotate_refresh,
            keys=[refresh_key(old_hash), refresh_key(new_hash), OUTBOX, REVOKED_SESSIONS, ACTIVE_KID],
            args=[
                now_ms,
                now_ms + ttl_ms,
                ttl_ms,
                reuse_event_id,
                f"{PREFIX}session:",
                f"{PREFIX}user_nbf:",
                f"{PREFIX}user_disabled:",
                f"{PREFIX}user_sessions:",
                jkt or "",
                f"{PREFIX}revoked_jkt:",
            ],
            ack=self._replica_ack,
        )
        values = [_text(v) for v in result]
        status = values[0]
        if status == "ok":
            return RotationResult(
                status,
                values[1],
                values[2],
                tuple(values[3].split()),
                values[4],
                values[5] or None,
                issued_ms=int(values[6]),
                jkt=values[7] or None,
            )
        if status == "reused":
            return RotationResult(status, values[1], values[2], active_kid=values[3] or None)
        if status == "revoked":
            return RotationResult(status, values[1], values[2], revoke_event=values[3])
        if status in ("disabled", "key_mismatch"):
            return RotationResult(status, values[1], values[2])
        return RotationResult(status)

    # revocations

    @_store_call("EVALSHA revoke_session")
    async def revoke_session(self, sid: str, now_ms: int, event_id: str, event_json: str) -> RevocationResult:
        """Mark a session revoked and queue its event; idempotent.

        Raises:
            NotFound: No such session.
        """
        result = await self._scripts.run(
            self._revoke_session,
            keys=[session_key(sid), REVOKED_SESSIONS, OUTBOX, ACTIVE_KID],
            args=[now_ms, event_id, event_json, sid],
            ack=self._replica_ack,
        )
        if _text(result[0]) == "missing":
            raise NotFound("session not found", code="SESSION_NOT_FOUND")
        return _revocation(result)

    @_store_call("EVALSHA revoke_token")
    async def revoke_token(
        self, jti: str, exp: int, now_ms: int, event_id: str, event_json: str, keep_ms: int
    ) -> RevocationResult:
        """Record an access token as revoked and queue its event; idempotent."""
        result = await self._scripts.run(
            self._revoke_token,
            keys=[revoked_jti_key(jti), REVOKED_JTIS, OUTBOX, ACTIVE_KID],
            args=[now_ms, event_id, event_json, jti, exp, max(keep_ms, 1)],
            ack=self._replica_ack,
        )
        return _revocation(result)

    @_store_call("EVALSHA revoke_user")
    @_store_call("EVALSHA revoke_key_binding")
    async def revoke_key_binding(
        self, jkt: str, now_ms: int, event_id: str, event_json: str, keep_ms: int
    ) -> RevocationResult:
        """Record a DPoP key binding as revoked and queue its event; idempotent.

        The marker (checked by Login, Refresh and Introspect) lives ``keep_ms``, as long as a refresh
        token; the snapshot's entry, scored by the revocation instant, as long as an access token.
        """
        # The token revocation's script: the same marker, zset entry and outbox write.
        result = await self._scripts.run(
            self._revoke_token,
            keys=[revoked_jkt_key(jkt), REVOKED_KEY_BINDINGS, OUTBOX, ACTIVE_KID],
            args=[now_ms, event_id, event_json, jkt, now_ms, max(keep_ms, 1)],
        )
        return _revocation(result)

    @_store_call("EXISTS")
    async def key_binding_revoked(self, jkt: str) -> bool:
        """Whether a DPoP key binding has been revoked."""
        return bool(await self._redis.exists(revoked_jkt_key(jkt)))

    async def revoke_user(
        self, sub: str, now_ms: int, event_id: str, event_json: str, *, disable_reason: str = ""
    ) -> RevocationResult:
        """Revoke every session of a user and every token issued up to the cut (at least ``now_ms``).

        Args:
            sub: The user.
            now_ms: This replica's clock.
            event_id: The user-revocation event's id.
            event_json: Its outbox record; the script writes the cut into it.
            disable_reason: Non-empty: also disable the account, in the same step.

        Returns:
            The revocation; ``revoked_at_ms`` is the cut.
        """
        result = await self._scripts.run(
            self._revoke_user,
            keys=[
                user_nbf_key(sub),
                user_sessions_key(sub),
                REVOKED_USERS,
                OUTBOX,
                user_disabled_key(sub),
                ACTIVE_KID,
            ],
            args=[now_ms, event_id, event_json, sub, f"{PREFIX}session:", disable_reason],
            ack=self._replica_ack,
        )
        return _revocation(result)

    @_store_call("DEL")
    async def enable_user(self, sub: str) -> None:
        """Let a disabled user log in again."""
        await self._redis.delete(user_disabled_key(sub))

    @_store_call("EXISTS")
    async def user_disabled(self, sub: str) -> bool:
        """Whether a user is disabled."""
        return bool(await self._redis.exists(user_disabled_key(sub)))

    @_store_call("EVALSHA revocation_state")
    async def revocation_reason(
        self, jti: str, sid: str, sub: str, issued_at_ms: int, kid: str, jkt: str | None = None
    ) -> str | None:
        """Why a token is revoked (a stable code), or None if it is not."""
        reply = await self._scripts.run(
            self._revocation_state,
            keys=[
                revoked_jti_key(jti),
                session_key(sid),
                user_nbf_key(sub),
                key_record_key(kid),
                revoked_jkt_key(jkt or ""),
            ],
            args=[],
        )
        jti_revoked = int(reply[0])
        session_revoked_ms, user_nbf, key_state = (_text(value) for value in reply[1:4])
        if jti_revoked or (jkt is not None and int(reply[4])):
            return "TOKEN_REVOKED"
        if user_nbf and issued_at_ms <= int(user_nbf):
            return "USER_REVOKED"
        if session_revoked_ms and int(session_revoked_ms) > 0:
            return "SESSION_REVOKED"
        if not key_state or key_state == "retired":
            return "KEY_REVOKED"
        return None

    @_store_call("EVALSHA snapshot")
    async def snapshot(self, now_ms: int) -> RevocationSnapshot:
        """Every revocation that can still matter (newer than one access-token lifetime)."""
        horizon = now_ms - self._revocation_horizon_ms
        # A revoked jti matters until its token expires (its score is that exp, in seconds).
        tokens, sessions, users, retired, key_bindings = await self._scripts.run(
            self._snapshot,
            keys=[REVOKED_JTIS, REVOKED_SESSIONS, REVOKED_USERS, RETIRED_KEYS, REVOKED_KEY_BINDINGS],
            args=[(now_ms - self._expiry_margin_ms) // 1000, horizon],
        )
        return RevocationSnapshot(
            tokens=[(_text(jti), int(exp)) for jti, exp in _pairs(tokens)],
            sessions=[(*_sid_and_sub(member), int(revoked_ms)) for member, revoked_ms in _pairs(sessions)],
            users=[(_text(sub), int(nbf)) for sub, nbf in _pairs(users)],
            retired_key_ids=[_text(kid) for kid in retired],
            key_bindings=[(_text(jkt), int(revoked_ms)) for jkt, revoked_ms in _pairs(key_bindings)],
        )

    # outbox

    @_store_call("HGET")
    async def outbox_entry(self, event_id: str) -> str | None:
        """An event still waiting to be acknowledged by JetStream."""
        raw = await self._redis.hget(OUTBOX, event_id)
        return _text(raw) if raw is not None else None

    @_store_call("HGETALL")
    async def outbox_entries(self) -> dict[str, str]:
        """Every event waiting for JetStream."""
        raw = await self._redis.hgetall(OUTBOX)
        return {_text(k): _text(v) for k, v in raw.items()}

    @_store_call("EVALSHA outbox_done")
    async def outbox_done(self, event_id: str) -> None:
        """JetStream acknowledged the event."""
        await self._scripts.run(self._outbox_done, keys=[OUTBOX], args=[event_id])

    # signing keys

    @_store_call("SMEMBERS HGETALL")
    async def key_records(self) -> list[KeyRecord]:
        """Every stored signing key."""
        kids = sorted(_text(k) for k in await self._redis.smembers(KEYS_SET))
        if not kids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for kid in kids:
                pipe.hgetall(key_record_key(kid))
            rows = await pipe.execute()
        records = []
        for kid, row in zip(kids, rows, strict=True):
            if not row:
                continue
            data = {_text(k): _text(v) for k, v in row.items()}
            records.append(
                KeyRecord(
                    kid=kid,
                    sealed=data["sealed"],
                    created_ms=int(data["created_ms"]),
                    state=data["state"],
                    not_after_ms=int(data["not_after_ms"]),
                )
            )
        return records

    @_store_call("GET")
    async def active_kid(self) -> str | None:
        """The kid new tokens are signed with."""
        raw = await self._redis.get(ACTIVE_KID)
        return _text(raw) if raw is not None else None

    @_store_call("EVALSHA rotate_key")
    async def rotate_key(
        self,
        *,
        expected_previous: str,
        kid: str,
        sealed: str,
        now_ms: int,
        previous_state: str,
        previous_not_after_ms: int,
        events: list[tuple[str, str]],
    ) -> bool:
        """Install a new active key if the active one is still ``expected_previous`` (compare-and-set).

        Returns:
            False when another rotation won the race.
        """
        args: list[str | int] = [
            expected_previous,
            kid,
            sealed,
            now_ms,
            previous_state,
            previous_not_after_ms,
        ]
        for event_id, event_json in events:
            args += [event_id, event_json]
        result = await self._scripts.run(
            self._rotate_key,
            keys=[
                ACTIVE_KID,
                KEYS_SET,
                key_record_key(kid),
                key_record_key(expected_previous or kid),
                OUTBOX,
                RETIRED_KEYS,
            ],
            args=args,
            ack=self._replica_ack,
        )
        return _text(result[0]) == "ok"

    @_store_call("SET")
    async def save_rotation(
        self, request_id: str, kid: str, previous_kid: str, event_ids: list[str], ttl_s: int
    ) -> None:
        """Remember a rotation's outcome under its idempotency key."""
        await self._redis.set(
            rotation_key(request_id), " ".join([kid, previous_kid or "-", *event_ids]), ex=ttl_s
        )

    @_store_call("GET")
    async def rotation(self, request_id: str) -> tuple[str, str, list[str]] | None:
        """A remembered rotation: (kid, previous kid, event ids)."""
        raw = await self._redis.get(rotation_key(request_id))
        if raw is None:
            return None
        kid, previous_kid, *event_ids = _text(raw).split(" ")
        return kid, "" if previous_kid == "-" else previous_kid, event_ids

    @_store_call("MULTI SREM DEL EXEC")
    async def delete_key(self, kid: str) -> None:
        """Forget a key whose last token has expired."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.srem(KEYS_SET, kid)
            pipe.delete(key_record_key(kid))
            await pipe.execute()


def now_ms() -> int:
    """The current Unix time in milliseconds."""
    return int(time.time() * 1000)
