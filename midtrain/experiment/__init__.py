"""``midtrain experiment plan|run|submit|status FILE``: a study as a graph of runs (see ``spec``, ``graph``)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from midtrain.errors import MidtrainError

ACTIONS = ("plan", "run", "submit", "status")


def main(args: list[str]) -> object:
    """Parse ``midtrain experiment`` arguments and run the action."""
    parser = argparse.ArgumentParser(prog="midtrain experiment", description=(
        "plan: the dependency graph (nothing runs); run: on this machine; submit: as SLURM jobs with "
        "dependencies; status: each node's state."))
    parser.add_argument("action", help=" | ".join(ACTIONS))
    parser.add_argument("file", type=Path, help="The experiment file (YAML).")
    parser.add_argument("--jobs", type=int, default=1, help="run: processes at once (default 1).")
    parser.add_argument("--reuse_processes", action="store_true",
                        help="run: nodes in --jobs long-lived workers (imports once; faster on small models).")
    parser.add_argument("--json", action="store_true", help="status: a JSON list, one object per node.")
    parser.add_argument("--site", type=Path, default=None,
                        help="submit/status: the site file (default: MIDTRAIN_SITE or training_scripts/site.sh).")
    if any(a in ("-h", "--help") for a in args):
        parser.print_help()
        return None
    try:
        ns = parser.parse_args(args)
    except SystemExit:
        raise MidtrainError(f"usage: midtrain experiment {{{','.join(ACTIONS)}}} FILE [--jobs N] [--json] "
                            "[--site FILE]") from None
    if ns.action not in ACTIONS:
        raise MidtrainError(f"unknown action {ns.action!r}; use one of {', '.join(ACTIONS)}.")
    from midtrain.experiment.generate import check_unchanged, plan
    from midtrain.experiment.spec import load
    from midtrain.experiment.status import render, states

    t0 = time.perf_counter()
    p = plan(load(ns.file))
    if ns.action == "plan":
        check_unchanged(p)
        print(render(p, states(p)))
        print(f"(planned in {time.perf_counter() - t0:.1f} s; nothing run)")
        return p
    if ns.action == "run":
        from midtrain.experiment.local import run_local

        return run_local(p, ns.jobs, ns.reuse_processes)
    if ns.action == "submit":
        from midtrain.experiment.slurm import submit

        return submit(p, ns.site)
    sts = states(p)
    print(json.dumps([s.as_dict() for s in sts], indent=1) if ns.json else render(p, sts))
    return sts
