"""The run graph of an experiment: stable node names, kinds, dependencies and output paths.

* ``base-to<step>``: a segment of the base pretraining run that stops at a branch step (kind
  ``pretrain``); segments share the base run's ``out_dir`` and resume it exactly, so the chain
  equals one run. ``base``: the last segment, to ``max_steps``.
* ``<branch>``: a new run from the base run's checkpoint at its step (kind ``branch``); it depends
  on the segment that writes that checkpoint, not on the whole base run.
* ``<target>/sft-<set>-replay<r>-seed<s>``: a fine-tune of a branch's (or ``base``'s) ``final/``.
* ``<target>/sft-.../eval``: its evaluation; ``report``: one report over every run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from midtrain.errors import MidtrainError
from midtrain.experiment.spec import BASE_NAME, Experiment

KINDS = ("pretrain", "branch", "finetune", "evaluate", "report")
COMMAND = {"pretrain": "pretrain", "branch": "pretrain", "finetune": "finetune", "evaluate": "evaluate",
           "report": "report"}  # fmt: skip
"""The ``midtrain`` command that runs each kind of node (and the training_scripts/*.sbatch that submits it)."""


@dataclass
class Node:
    """One job of the study."""

    name: str
    kind: str
    deps: tuple[str, ...]
    out: Path
    """Its output: a run directory, an evaluate CSV or the report directory."""
    config: Path
    """The generated per-run config (``midtrain <command> --config <config>`` runs the node by hand)."""
    end_step: int | None = None
    """Training nodes of the pretrain schema: the step the node ends at."""
    run: str = ""
    """The node whose config identifies the output (segments: ``base``); default: the node itself."""
    params: dict = field(default_factory=dict)
    """Fine-tunes: target, set, ratio, seed."""

    @property
    def command(self) -> str:
        return COMMAND[self.kind]

    @property
    def owner(self) -> str:
        return self.run or self.name


def step_label(step: int) -> str:
    """``20k`` for 20000, ``6500`` for 6500: short and exact."""
    return f"{step // 1000}k" if step >= 1000 and step % 1000 == 0 else str(step)


def replay_label(ratio: float) -> str:
    return f"replay{ratio:g}"


def sft_name(target: str, sft_set: str, ratio: float, seed: int) -> str:
    return f"{target}/sft-{sft_set}-{replay_label(ratio)}-seed{seed}"


def build(exp: Experiment, max_steps: int | None) -> list[Node]:
    """The nodes in an order where every node comes after its dependencies.

    ``max_steps``: the base run's length (None when the base is an existing run directory).
    """
    root = exp.root
    configs = root / "configs"
    nodes: list[Node] = []
    base_dir = root / "runs" / BASE_NAME if exp.base.config else Path(exp.base.run)
    seg_of: dict[int, str] = {}
    if exp.base.config:
        assert max_steps is not None
        for b in exp.branches:
            if b.at_step > max_steps:
                raise MidtrainError(f"{exp.source}: branches.{b.name}.at_step: {b.at_step} is after the base run's "
                                    f"end (train.max_steps {max_steps}); choose a step in 1..{max_steps}.")
        prev: tuple[str, ...] = ()
        for step in sorted({b.at_step for b in exp.branches if b.at_step < max_steps}):
            name = f"{BASE_NAME}-to{step_label(step)}"
            nodes.append(Node(name, "pretrain", prev, base_dir, configs / f"{name}.yaml", step, BASE_NAME))
            seg_of[step], prev = name, (name,)
        nodes.append(Node(BASE_NAME, "pretrain", prev, base_dir, configs / f"{BASE_NAME}.yaml", max_steps))
        seg_of[max_steps] = BASE_NAME
    names = {n.name for n in nodes}
    run_dirs = {BASE_NAME: base_dir}
    for b in exp.branches:
        if b.name in names:
            raise MidtrainError(f"{exp.source}: branches.{b.name}: the name is taken by a base segment; rename it.")
        deps = (seg_of[b.at_step],) if exp.base.config else ()
        nodes.append(Node(b.name, "branch", deps, root / "runs" / b.name, configs / f"{b.name}.yaml"))
        run_dirs[b.name] = root / "runs" / b.name
    finetunes, evals = [], []
    if exp.finetune:
        ft = exp.finetune
        chosen = ft.branches if ft.branches is not None else tuple(run_dirs)
        extra = {t for name in ft.sets for t in (ft.for_set(name)[0] or ())}
        for target in [*chosen, *(t for t in run_dirs if t in extra and t not in chosen)]:
            deps = (target,) if exp.base.config or target != BASE_NAME else ()
            for sft_set in ft.sets:
                targets, ratios, seeds, _ = ft.for_set(sft_set)
                if target not in (targets if targets is not None else tuple(run_dirs)):
                    continue
                for ratio in ratios:
                    for seed in seeds:
                        name = sft_name(target, sft_set, ratio, seed)
                        tail = name.split("/", 1)[1]
                        node = Node(name, "finetune", deps, root / "sft" / target / tail, configs / f"{name}.yaml",
                                    params={"target": target, "set": sft_set, "ratio": ratio, "seed": seed})
                        finetunes.append(node)
                        if exp.evaluate:
                            evals.append(Node(f"{name}/eval", "evaluate", (name,), root / "eval" / target /
                                              f"{tail}.csv", configs / f"{name}/eval.yaml"))
    nodes += finetunes + evals
    if exp.report:
        last = evals or finetunes or [n for n in nodes if n.kind == "branch" or n.name == BASE_NAME]
        nodes.append(Node("report", "report", tuple(n.name for n in last), root / "report",
                          configs / "report.yaml"))
    return nodes


def run_dir(nodes: list[Node], name: str) -> Path:
    """The run directory of the training node ``name``."""
    return next(n.out for n in nodes if n.name == name)
