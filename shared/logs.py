"""Logging set-up shared by every service: one format for every line on stderr, JSON for log shippers.

structlog renders through the standard library's ``logging``, so what grpc, nats-py, aiohttp or Python's
``warnings`` log comes out in the same format as our own lines, and every line names the service and
the instance that wrote it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# The audit trail's logger: it logs at INFO whatever the configured level.
AUDIT_LOGGER = "audit"
# Lines of these libraries below WARNING are their internals, not an operator's business.
_QUIET_LIBRARIES = ("asyncio", "grpc", "nats", "aiohttp.access")


def configure_logging(
    level: str = "info", fmt: str = "console", *, service: str | None = None, instance: str | None = None
) -> None:
    """Configure structlog and the standard library's logging for a service process.

    Args:
        level: debug, info, warning or error.
        fmt: ``console`` (human-readable ``key=value``) or ``json`` (one object per line).
        service: Written as ``service`` on every line.
        instance: Written as ``instance`` on every line.
    """
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    identity = {name: value for name, value in (("service", service), ("instance", instance)) if value}

    def add_identity(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for name, value in identity.items():
            event.setdefault(name, value)
        return event

    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_identity,
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    logging.getLogger(AUDIT_LOGGER).setLevel(logging.INFO)
    logging.captureWarnings(True)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
