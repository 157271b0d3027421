"""util_scripts/prepare_paper_data.py: its dry run prints every step of the paper's data and runs nothing,
and every command it would run uses only options that `midtrain prepare` / `prepare sft` accept."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from midtrain.prepare.hub import prepare_hub
from midtrain.prepare.sft_formats import FORMATS, prepare_sft

pytestmark = pytest.mark.slow  # spawns CLI / training / DDP / SLURM processes (make test-fast skips it)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "util_scripts" / "prepare_paper_data.py"


def _steps() -> dict[str, list[list[str]]]:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import prepare_paper_data
    finally:
        sys.path.pop(0)
    return prepare_paper_data.steps()


def test_dry_run_prints_every_step_and_writes_nothing(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry_run"], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    for name in ("allenai/c4", "bigcode/starcoderdata", "openai/gsm8k", "allenai/sciq", "GAIR/lima",
                 "--tokenizer_only true", "data/sft/pycode.json", "data/val/c4", "data/val/code", "data/val/math"):
        assert name in done.stdout
    assert list(tmp_path.iterdir()) == []
    bad = subprocess.run([sys.executable, str(SCRIPT), "--dry_run", "--only", "c5"], cwd=tmp_path,
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "unknown step(s) ['c5']" in bad.stderr


def test_every_command_uses_real_options():
    hub = set(inspect.signature(prepare_hub).parameters)
    sft = set(inspect.signature(prepare_sft).parameters)
    plan = _steps()
    assert {"c4", "c4-val", "code", "math", "flan", "qa", "web", "sft-pycode", "sft-gsm8k", "sft-lima",
            "sft-sciq"} <= set(plan)
    for name, commands in plan.items():
        for cmd in commands:
            if cmd[0] != "midtrain":
                continue
            flags = {a[2:] for a in cmd if a.startswith("--")}
            allowed = sft if cmd[2] == "sft" else hub
            assert flags <= allowed, (name, flags - allowed)
            if cmd[2] == "sft":
                assert cmd[cmd.index("--format") + 1] in FORMATS
