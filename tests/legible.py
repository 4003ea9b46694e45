"""Whether printed output reads: no word cut, folded or elided by a layout, no line too wide."""

from __future__ import annotations

from collections.abc import Iterable


def assert_legible(
    output: str, *, texts: Iterable[str] = (), whole_lines: Iterable[str] = (), width: int | None = None
) -> None:
    """Check what a command printed.

    Args:
        output: The printed text (no colour codes).
        texts: Each must appear with every word whole (a layout may wrap between words only).
        whole_lines: Each must appear unbroken within one line (addresses, paths, credentials).
        width: No line of the tables may be wider (lines holding a ``whole_lines`` item may be).
    """
    assert "…" not in output, output
    printed_words = set(output.split())
    for text in texts:
        broken = [word for word in text.split() if word not in printed_words]
        assert not broken, f"words cut or squeezed: {broken}\n{output}"
    lines = output.splitlines()
    kept = list(whole_lines)
    for item in kept:
        assert any(item in line for line in lines), f"{item!r} is not whole on one line\n{output}"
    if width is not None:
        too_wide = [
            line for line in lines if len(line.rstrip()) > width and not any(item in line for item in kept)
        ]
        assert not too_wide, f"lines wider than {width}: {too_wide}"
