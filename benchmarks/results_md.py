"""benchmarks/RESULTS.md is written by several scripts, each owning one section between its own markers."""

from __future__ import annotations

from pathlib import Path


def replace_section(results: Path, markers: tuple[str, str], text: str) -> None:
    """Put `text` between `markers` in `results` (replacing what was there, or appending the section), keeping
    every other section as it is."""
    start, end = markers
    old = results.read_text(encoding="utf-8") if results.exists() else "# Benchmark results\n"
    section = f"{start}\n{text}\n{end}"
    if start in old and end in old:
        new = old[:old.index(start)] + section + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + section + "\n"
    results.write_text(new, encoding="utf-8")
