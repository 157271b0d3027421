"""The extra logger of a run besides ``metrics.jsonl`` (``logger_name``: csv, tensorboard or wandb).

litgpt's ``choose_logger`` builds it; this adds the missing-package hint and the arguments litgpt
expects its own scripts to pass (``log_args`` for wandb, which it otherwise fails on).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from litgpt.utils import choose_logger


def build_logger(logger_name: str, out_dir: Path | str, name: str, log_interval: int = 1) -> Any:
    """csv and tensorboard write under ``out_dir/logs/<logger_name>``; wandb logs to project ``name`` (or
    ``$WANDB_PROJECT``) with its local files under ``out_dir/logs``. Preflight's ``check_logger`` has checked
    the package."""
    out_dir = Path(out_dir)
    if logger_name == "wandb":
        log_args = {"project": os.environ.get("WANDB_PROJECT", name)}
        return choose_logger("wandb", out_dir, name, log_interval, log_args=log_args, save_dir=str(out_dir / "logs"))
    return choose_logger(logger_name, out_dir, name, log_interval)
