"""The propagation benchmark's CPU account: CPU per revocation by part of the system."""

from __future__ import annotations

from collections.abc import Mapping

from authmesh.bench.common import CpuAccount

# How the CPU account groups the run's processes.
CPU_PARTS = ("auth", "nats", "redis", "replicas", "probers", "driver")


def cpu_ms_per_round(used: Mapping[str, float], rounds: int) -> dict[str, float]:
    """CPU milliseconds per revocation by part of the system: auth, NATS, Redis, replicas, probers, driver."""
    parts = dict.fromkeys(CPU_PARTS, 0.0)
    for name, seconds in used.items():
        part = _cpu_part(name)
        if part in parts:
            parts[part] += seconds * 1000 / max(rounds, 1)
    parts["total"] = sum(parts[part] for part in CPU_PARTS)
    return parts


def _cpu_part(process: str) -> str:
    """The part of the system a process of the run belongs to (a name of :data:`CPU_PARTS`)."""
    if process == CpuAccount.SELF:
        return "driver"
    if process == "authmesh-nats":
        return "nats"
    if process.startswith("resource-"):
        return "replicas"
    if process.startswith("prober-"):
        return "probers"
    return process  # auth, redis
