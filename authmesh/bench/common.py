"""What every ``authmesh bench`` shares: statistics, worker processes, CPU pinning, JSON, tables, charts.

Load generators and probers run in *worker processes*, separate from the servers they measure and from
the process that drives the benchmark: a worker is ``python -m <module> --worker`` speaking one JSON
object per line over its stdin and stdout (:class:`Worker` on the driving side, :func:`serve_worker`
on the worker's). Timestamps that cross processes are ``time.monotonic_ns()``, one clock for every
process on the machine (``CLOCK_MONOTONIC`` on Linux).

Charts need matplotlib (the ``plot`` extra); it is imported only when a chart is drawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from rich.console import Console
from rich.table import Table

from authmesh._shared.errors import ConfigurationError

# A worker answers each command within this long unless the command says otherwise.
WORKER_REPLY_TIMEOUT_SECONDS = 120.0
WORKER_START_TIMEOUT_SECONDS = 30.0
WORKER_STOP_TIMEOUT_SECONDS = 5.0
# Worker replies can carry thousands of timestamps.
_WORKER_LINE_LIMIT = 64 * 1024 * 1024
PLOT_INSTALL_HINT = "pip install 'authmesh[plot]'"

JsonDict = dict[str, Any]


# --- statistics -------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0 to 100) of ``values``, interpolating linearly between order statistics.

    Raises:
        ValueError: ``values`` is empty or ``q`` is outside 0 to 100.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError("q must be between 0 and 100")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True, slots=True)
class Latency:
    """A latency distribution, in milliseconds.

    Attributes:
        count: How many samples.
        p50: Median.
        p99: 99th percentile.
        max: Largest sample.
        mean: Arithmetic mean.
    """

    count: int
    p50: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, milliseconds: Sequence[float]) -> Latency:
        """Summarise samples (milliseconds); all zeros when there are none."""
        if not milliseconds:
            return cls(0, 0.0, 0.0, 0.0, 0.0)
        return cls(
            count=len(milliseconds),
            p50=percentile(milliseconds, 50),
            p99=percentile(milliseconds, 99),
            max=max(milliseconds),
            mean=statistics.fmean(milliseconds),
        )

    def to_json(self) -> JsonDict:
        """A JSON-ready dict."""
        return asdict(self)


def median(values: Iterable[float]) -> float:
    """The median of ``values`` (``nan`` when there are none, so a table can still show it)."""
    collected = list(values)
    return statistics.median(collected) if collected else math.nan


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``; ``nan`` when the denominator is zero."""
    return numerator / denominator if denominator else math.nan


# --- results ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Goal:
    """One goal of a benchmark.

    Attributes:
        name: Its key in the result.
        label: What a reader sees (``p99 at 10 replicas``).
        target: The figure to reach.
        higher_is_better: Whether the measured value must be at least (True) or at most the target.
        unit: ``ratio``, ``ms``, ``s`` or ``B``: how the figures are shown.
    """

    name: str
    label: str
    target: float
    higher_is_better: bool
    unit: str

    def met(self, value: float | None) -> bool:
        """Whether ``value`` reaches the target (a missing or ``nan`` value does not)."""
        if value is None or math.isnan(value):
            return False
        return value >= self.target if self.higher_is_better else value <= self.target


def format_value(value: float | None, unit: str) -> str:
    """A figure with its unit, for tables (``n/a`` when missing)."""
    if value is None or math.isnan(value):
        return "n/a"
    if unit == "ratio":
        return f"{value:,.2f}×"
    if unit == "B":
        return f"{value:,.1f} B"
    if unit == "ms":
        return f"{value:,.2f} ms"
    if unit == "s":
        return f"{value:,.2f} s"
    return f"{value:,.3g} {unit}".strip()


def judge(goals: Sequence[Goal], values: Mapping[str, float | None]) -> JsonDict:
    """The goal part of a result: targets, measured values, what passed, and whether all did."""
    passed = {goal.name: goal.met(values.get(goal.name)) for goal in goals}
    return {
        "goals": {
            goal.name: {
                "label": goal.label,
                "target": goal.target,
                "higher_is_better": goal.higher_is_better,
                "unit": goal.unit,
                "value": values.get(goal.name),
            }
            for goal in goals
        },
        "passed": passed,
        "ok": all(passed.values()),
    }


def add_goal_rows(table: Table, result: Mapping[str, Any], first_column_span: int) -> None:
    """Append a section with each goal, its measured value and the verdict to ``table``.

    Args:
        table: The benchmark's table.
        result: A result holding the :func:`judge` keys.
        first_column_span: How many columns the table has before the value and the verdict columns.
    """
    goals = result.get("goals", {})
    if not goals:
        return
    table.add_section()
    for name, goal in goals.items():
        sign = "≥" if goal["higher_is_better"] else "≤"
        verdict = "[green]met[/green]" if result["passed"][name] else "[red]missed[/red]"
        label = f"goal: {goal['label']} {sign} {format_value(goal['target'], goal['unit'])}"
        pad = [""] * max(0, first_column_span - 1)
        table.add_row(label, *pad, format_value(goal["value"], goal["unit"]), verdict)


def environment() -> JsonDict:
    """Where and when a result was measured: Python, CPUs, platform, and the machine's load then.

    The load average says how busy the machine was with other work (a shared machine is noisy).
    """
    import platform

    affinity = getattr(os, "sched_getaffinity", None)
    load = getattr(os, "getloadavg", None)
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": len(affinity(0)) if affinity is not None else os.cpu_count(),
        "load_average_1m": load()[0] if load is not None else None,
        "measured_at_unix": int(time.time()),
    }


def write_json(path: Path, result: Mapping[str, Any]) -> None:
    """Write ``result`` as indented JSON (``nan`` becomes ``null``)."""
    path.write_text(json.dumps(_json_safe(result), indent=2) + "\n", encoding="utf-8")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def finish(
    console: Console,
    result: Mapping[str, Any],
    table: Table,
    json_path: Path | None,
    plot_dir: Path | None,
    draw: Callable[[Mapping[str, Any], Path], list[Path]],
) -> int:
    """Print the table, write the JSON and the charts that were asked for, and return the exit status.

    Returns:
        0 when every goal is met, 1 otherwise.
    """
    console.print(table)
    if json_path is not None:
        write_json(json_path, result)
        console.print(f"result written to {json_path}")
    if plot_dir is not None:
        plot_dir.mkdir(parents=True, exist_ok=True)
        for path in draw(result, plot_dir):
            console.print(f"chart written to {path}")
    return 0 if result.get("ok", True) else 1


def measure_and_report(
    name: str,
    doing: str,
    measure: Callable[[Callable[[str], None]], Mapping[str, Any]],
    render: Callable[[Mapping[str, Any]], Table],
    draw: Callable[[Mapping[str, Any], Path], list[Path]],
    json_path: Path | None,
    plot_dir: Path | None,
) -> int:
    """Run one benchmark under a spinner, then :func:`finish` it.

    Args:
        name: The bench's name, prefixed to progress messages.
        doing: What the spinner says while it measures.
        measure: Runs the bench, given a progress callback; returns its result.
        render: The result as a table.
        draw: The result as charts.
        json_path: Where to write the result as JSON, if anywhere.
        plot_dir: Where to draw charts, if anywhere (checked before measuring).

    Returns:
        0 when every goal is met, 1 otherwise.
    """
    if plot_dir is not None:
        require_matplotlib()
    console = Console()
    with console.status(doing) as spinner:
        result = measure(lambda text: spinner.update(f"{name}: {text}"))
    return finish(console, result, render(result), json_path, plot_dir, draw)


def require_matplotlib() -> None:
    """Fail before measuring when a chart is asked for but cannot be drawn.

    Raises:
        ConfigurationError: matplotlib is not installed.
    """
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigurationError(f"--plot needs matplotlib, which is not installed: {PLOT_INSTALL_HINT}")


def bar_chart(
    path: Path,
    *,
    title: str,
    groups: Sequence[str],
    series: Mapping[str, Sequence[float]],
    ylabel: str,
    log: bool = False,
    goal: float | None = None,
    goal_label: str = "goal",
) -> Path:
    """Draw grouped bars: one group per entry of ``groups``, one bar per series in each group.

    Args:
        path: The image file (its suffix picks the format).
        title: The chart's title.
        groups: The labels along the x axis.
        series: Series name → one value per group (``nan`` leaves a gap).
        ylabel: The y axis label.
        log: A logarithmic y axis.
        goal: Draw a dashed horizontal line at this value.
        goal_label: The legend entry of that line.

    Returns:
        ``path``.
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(10, 4.5), constrained_layout=True)
    try:
        width = 0.8 / max(1, len(series))
        for index, (name, values) in enumerate(series.items()):
            positions = [group + (index - (len(series) - 1) / 2) * width for group in range(len(groups))]
            bars = axes.bar(positions, values, width, label=name)
            axes.bar_label(bars, labels=[_bar_text(value) for value in values], fontsize=7, padding=2)
        if goal is not None:
            axes.axhline(goal, color="tab:red", linestyle="--", linewidth=1, label=goal_label)
        axes.set_xticks(range(len(groups)), list(groups))
        axes.set_ylabel(ylabel)
        if log:
            axes.set_yscale("log")
        axes.set_title(title)
        axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        axes.grid(axis="y", alpha=0.3)
        figure.savefig(path, dpi=110)
    finally:
        plt.close(figure)
    return path


def _bar_text(value: float) -> str:
    if math.isnan(value):
        return ""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


# --- processes ----------------------------------------------------------------------------------------


def process_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds used so far by process ``pid`` (every thread); None off Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuAccount:
    """CPU seconds used by named processes (and this one) over one or more timed windows.

    Args:
        pids: Process name → pid. This process is counted too, as :attr:`SELF`.
    """

    SELF = "driver"

    def __init__(self, pids: Mapping[str, int]) -> None:
        self._pids = dict(pids)
        self._began: dict[str, float] = {}
        self.used: dict[str, float] = {}
        self.windows = 0

    def _now(self) -> dict[str, float]:
        readings = {name: process_cpu_seconds(pid) for name, pid in self._pids.items()}
        now = {name: seconds for name, seconds in readings.items() if seconds is not None}
        now[self.SELF] = time.process_time()
        return now

    def begin(self) -> None:
        """Open a window."""
        self._began = self._now()

    def end(self) -> None:
        """Close the window and add what each process used in it to :attr:`used` (seconds by name)."""
        now = self._now()
        for name, began in self._began.items():
            if name in now:
                self.used[name] = self.used.get(name, 0.0) + now[name] - began
        self.windows += 1


def cpus() -> list[int]:
    """The CPUs this process may run on, lowest first."""
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is None:
        return list(range(os.cpu_count() or 1))
    return sorted(affinity(0))


def pin(pid: int, cpu_set: Iterable[int]) -> bool:
    """Pin every thread of process ``pid`` (and threads it starts later) to ``cpu_set``.

    Returns:
        Whether it could be done (Linux only; a thread that ends meanwhile is skipped).
    """
    set_affinity = getattr(os, "sched_setaffinity", None)
    if set_affinity is None:
        return False
    wanted = set(cpu_set)
    try:
        threads = [int(name) for name in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        threads = [pid]
    pinned = False
    for thread in threads:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            set_affinity(thread, wanted)
            pinned = True
    return pinned


def split_cpus() -> tuple[set[int], set[int]] | None:
    """Two disjoint CPU sets, the server's and the load's: the last CPU, and the rest; None on one CPU."""
    available = cpus()
    if len(available) < 2:
        return None
    return {available[-1]}, set(available[:-1])


class Worker:
    """A worker process (``python -m module --worker``) that answers JSON commands (an async context manager).

    Args:
        module: The module whose ``--worker`` entry point serves the commands.
        name: For errors.
        env: Extra environment variables for the worker.
    """

    def __init__(self, module: str, name: str, env: Mapping[str, str] | None = None) -> None:
        self.module = module
        self.name = name
        self._env = dict(env or {})
        self._process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        """The worker's process id."""
        if self._process is None:
            raise ConfigurationError(f"worker {self.name} is not started")
        return self._process.pid

    async def __aenter__(self) -> Self:
        env = {**os.environ, **self._env, "PYTHONUNBUFFERED": "1"}
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            self.module,
            "--worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            limit=_WORKER_LINE_LIMIT,
        )
        try:
            hello = await self.request({"op": "ping"}, timeout=WORKER_START_TIMEOUT_SECONDS)
        except BaseException:
            await self.aclose()
            raise
        if hello.get("pong") is not True:
            await self.aclose()
            raise ConfigurationError(f"worker {self.name} answered {hello!r} to ping")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def request(
        self,
        command: Mapping[str, Any],
        timeout: float = WORKER_REPLY_TIMEOUT_SECONDS,  # noqa: ASYNC109  # the worker owns no deadline
    ) -> JsonDict:
        """Send one command and wait for its answer.

        Raises:
            ConfigurationError: The worker failed, exited or did not answer in time.
        """
        process = self._process
        if process is None or process.stdin is None or process.stdout is None:
            raise ConfigurationError(f"worker {self.name} is not started")
        process.stdin.write(json.dumps(command).encode() + b"\n")
        try:
            async with asyncio.timeout(timeout):
                await process.stdin.drain()
                line = await process.stdout.readline()
        except TimeoutError:
            raise ConfigurationError(
                f"worker {self.name} did not answer {command.get('op')!r} in time"
            ) from None
        if not line:
            raise ConfigurationError(f"worker {self.name} exited (status {await process.wait()})")
        answer: JsonDict = json.loads(line)
        if "error" in answer:
            raise ConfigurationError(f"worker {self.name} failed: {answer['error']}")
        return answer

    async def aclose(self) -> None:
        """Ask the worker to exit; kill it if it has not within the deadline."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None and not process.stdin.is_closing():
            process.stdin.close()
        try:
            async with asyncio.timeout(WORKER_STOP_TIMEOUT_SECONDS):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


Handler = Callable[[JsonDict], Awaitable[JsonDict]]


def serve_worker(handlers: Mapping[str, Handler]) -> None:
    """Run a worker: answer each JSON line on stdin with one on stdout until stdin closes.

    Every command carries ``op``, the name of its handler; ``ping`` is always answered. A handler's
    exception is answered as ``{"error": ...}`` and the worker goes on.
    """

    async def main() -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_WORKER_LINE_LIMIT)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            command: JsonDict = json.loads(line)
            op = command.get("op")
            try:
                if op == "ping":
                    answer: JsonDict = {"pong": True}
                elif isinstance(op, str) and op in handlers:
                    answer = await handlers[op](command)
                else:
                    answer = {"error": f"unknown op {op!r}"}
            except Exception as error:  # the driver reports it; the worker stays usable
                answer = {"error": f"{type(error).__name__}: {error}"}
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()

    asyncio.run(main())
