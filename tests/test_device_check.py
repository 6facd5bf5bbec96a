"""`benchmarks/device_check.py --dry-run`: the GPU machine's whole path (offline install, `pytest -m gpu`, dpokit
and TRL on each shape, full-precision and QLoRA, the RESULTS.md block) on CPU with tiny shapes, so a lent GPU's
minutes are not spent on a broken script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.py"


def test_dry_run_writes_the_block_with_dpokit_matching_trl(tmp_path):
    pytest.importorskip("trl")
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nkept\n")
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--models", "llama-tiny", "--configs",
                           "dpo,trl,dpo-qlora,trl-qlora", "--results", str(results)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "== pytest -m gpu" in done.stdout and "== install" in done.stdout
    text = results.read_text()
    assert "kept" in text and "<!-- device_check:start -->" in text and "<!-- device_check:end -->" in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| llama-tiny")]
    configs = ("dpo", "trl", "dpo-qlora", "trl-qlora")
    assert sorted((r[1], r[2]) for r in rows) == sorted((s, c) for s in ("long", "short", "many") for c in configs)
    for row in rows:   # first-step log-probs: dpokit equals TRL, in full precision and on the same 4-bit base
        assert float(row[-1].rstrip(" |")) < 1e-5, row
