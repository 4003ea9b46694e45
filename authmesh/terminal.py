"""What the commands print stays legible at any terminal width and in a log file.

A table is printed only where it fits with every column at its readable minimum; otherwise the command
prints the same content as one block per row, which reads at any width. Without a terminal (output to
a file or a pipe) rich lays out for 80 columns, and ``COLUMNS`` changes that.
"""

from __future__ import annotations

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

# Wider than any terminal: measured against it, a table's minimum is not clamped to the console's width.
_UNBOUNDED = 1 << 16


def fits(console: Console, table: Table) -> bool:
    """Whether ``table`` fits ``console`` with no column below its minimum width."""
    return Measurement.get(console, console.options.update_width(_UNBOUNDED), table).minimum <= console.width
