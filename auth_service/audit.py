"""The audit trail: one structured line per security-relevant act, on the ``audit`` logger.

Every line has ``event="audit"`` and an ``action``; who asked is ``by`` (the caller's subject). A login
names the account only by a hash of its username, and no line ever carries a password or a token.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import structlog

from authmesh._shared.logs import AUDIT_LOGGER

AUDIT_EVENT = "audit"
# Written whatever AUTHMESH_LOG_LEVEL says: the trail is not a diagnostic that a quieter level may drop.
_audit = structlog.wrap_logger(
    None,
    wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    logger_factory_args=(AUDIT_LOGGER,),
)


def audit(action: str, **fields: Any) -> None:
    """Write one audit line.

    Args:
        action: What happened, e.g. ``login_succeeded``, ``token_revoked``, ``signing_key_rotated``.
        fields: Who asked (``by``), on what (``sub``, ``sid``, ``jti``, ``kid``) and why (``reason``).
    """
    _audit.info(AUDIT_EVENT, action=action, **fields)


def username_hash(username: str) -> str:
    """A stable pseudonym of a username for the audit trail (SHA-256, first 16 hex digits)."""
    return hashlib.sha256(username.encode("utf-8", "replace")).hexdigest()[:16]
