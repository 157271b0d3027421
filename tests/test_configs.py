"""Every shipped config parses through the ``midtrain`` CLI and resolves against a shard tree with all types.

The configs use paths relative to the working directory (``data/...``, ``out/...``), so the test
builds that layout in a temp dir, changes into it and runs ``midtrain inspect`` on each config
unchanged: this checks the path convention itself, not just the YAML.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from midtrain.cli import run
from midtrain.data.mixture import load_mix_config, resolve_mixture
from midtrain.data.shards import discover_shards
from tests.synthetic import write_tree

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "midtrain_configs"
ALL_YAML = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml")
                  if not p.relative_to(CONFIGS).as_posix().startswith("experiments/"))  # tests/test_experiment.py
FINETUNE = [p for p in ALL_YAML if p.startswith("finetune/") or Path(p).name.startswith("finetune-")]
EVALUATE = [p for p in ALL_YAML if Path(p).name.startswith("evaluate")]  # midtrain evaluate's schema
RUNS = [p for p in ALL_YAML if p not in FINETUNE + EVALUATE]  # everything the pretrain schema parses
NAME = re.compile(r"(?P<type>code|math|instruct|qa|web)(?P<pct>\d+)-from(?P<k>\d+)k")
ABLATIONS = {
    "timing": {f"code20-from{k}k" for k in (20, 30, 40, 50)},
    "percentage": {f"code{p}-from40k" for p in (10, 30, 50, 80)},
    "cts_pretrain": {"code100-from40k", "math100-from56k"},
}
PAPER_SIZES = {"pythia-70m": (16, 1e-3), "pythia-160m": (16, 6e-4), "pythia-410m": (8, 3e-4), "pythia-1b": (4, 3e-4)}


def load(rel: str) -> dict:
    return yaml.safe_load((CONFIGS / rel).read_text())


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A MIDTRAIN_ROOT with the paper layout (all shard types) and the demo layout, as the cwd."""
    root = tmp_path_factory.mktemp("midtrain_root")
    paper = {str(i): 5_000 for i in range(1, 5)}
    paper.update({name: 5_000 for name in ("c1", "m1", "i1", "q1", "q2", "q3", "q4", "w1")})
    write_tree(root / "data/pretrain", paper)
    write_tree(root / "data/val", {"c4": 5_000, "code": 5_000, "math": 5_000})
    write_tree(root / "data/demo", {"1": 3_000, "2": 3_000, "c1": 3_000, "c2": 3_000, "m1": 3_000})
    write_tree(root / "data/demo/val", {"main": 1_000, "code": 1_000, "math": 1_000})
    (root / "midtrain_configs").symlink_to(CONFIGS)  # mix_config_path is relative to the working directory
    old = os.getcwd()
    os.chdir(root)
    yield root
    os.chdir(old)


def test_config_set_is_complete():
    assert len([p for p in RUNS if p.startswith("pretrain/")]) == 4
    assert len([p for p in RUNS if p.startswith("midtrain/")]) == 20
    for group, names in ABLATIONS.items():  # the fork's three families, at 70m and at 160m
        for size in ("pythia-70m", "pythia-160m"):
            found = {p.removeprefix(f"ablations/{group}/{size}-").removesuffix(".yaml")
                     for p in RUNS if p.startswith(f"ablations/{group}/{size}-")}
            assert found == names, (group, size)
    assert {"tiny/pretrain.yaml", "tiny/stages.yaml", "tiny/midtrain-code20.yaml"} <= set(RUNS)
    assert len(FINETUNE) >= 10


@pytest.mark.slow  # spawns processes
def test_generated_configs_are_up_to_date():
    script = REPO / "util_scripts/generate_paper_configs.py"
    out = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("rel", RUNS)
def test_config_resolves_through_cli(rel: str, root: Path, capsys):
    rows = run("inspect", ["--config", str(CONFIGS / rel)])
    capsys.readouterr()
    cfg = load(rel)
    assert rows, f"{rel}: inspect returned no rows"
    stages = sorted({r.stage for r in rows})
    for stage in stages:
        active = [r for r in rows if r.stage == stage and r.weight > 0]
        assert active, f"{rel}: stage {stage} samples no shard"
        assert abs(sum(r.weight for r in active) - 1) < 1e-9
    assert len(stages) == 1 + len(cfg["data"]["init_args"].get("stages") or [])

    by_type: dict[str, float] = {}
    for r in rows:
        if r.stage == stages[-1]:
            by_type[r.type] = by_type.get(r.type, 0.0) + r.weight
    m = NAME.search(Path(rel).stem)
    if m:  # a midtraining config: start checkpoint and mixture as its name says
        step = int(m["k"]) * 1000
        assert by_type[m["type"]] == pytest.approx(int(m["pct"]) / 100), f"{rel}: {by_type}"
        if int(m["pct"]) < 100:
            assert by_type["main"] == pytest.approx(1 - int(m["pct"]) / 100)
        model = cfg["model_name"]
        assert cfg["resume"] == f"out/{model}/pretrain/step-{step:08d}", rel
        assert step % load(f"pretrain/{model}.yaml")["train"]["save_interval"] == 0, "no checkpoint at that step"
        assert step < cfg["train"]["max_steps"]
    elif rel.startswith("pretrain/"):
        assert by_type == {"main": pytest.approx(1.0), **{t: 0.0 for t in by_type if t != "main"}}
        assert cfg["resume"] == "auto"


def test_out_dirs_are_unique():
    seen: dict[str, str] = {}
    for rel in ALL_YAML:
        out = load(rel).get("out_dir") or load(rel)["out"]
        assert out not in seen, f"{rel} and {seen[out]} share out_dir {out}"
        seen[out] = rel


def test_paths_are_relative_placeholders():
    """No cluster paths: every path in every config is relative to the working directory."""
    for rel in ALL_YAML:
        text = (CONFIGS / rel).read_text()
        for line in text.splitlines():
            value = line.split("#", 1)[0]
            assert not re.search(r":\s*['\"]?(/|~)", value), f"{rel}: absolute path in {line!r}"


@pytest.mark.parametrize("size", sorted(PAPER_SIZES))
def test_pretrain_configs_have_the_paper_recipe(size: str):
    cfg = load(f"pretrain/{size}.yaml")
    micro, lr = PAPER_SIZES[size]
    t = cfg["train"]
    assert (t["max_steps"], t["global_batch_size"], t["max_seq_length"]) == (61_035, 1024, 2048)
    assert (t["micro_batch_size"], t["save_interval"], cfg["eval"]["interval"]) == (micro, 2000, 1000)
    assert (t["lr_schedule"], t["lr_warmup_fraction"], t["min_lr"]) == ("cosine", 0.1, 1e-6)
    opt = cfg["optimizer"]
    assert opt["class_path"] == "torch.optim.AdamW"
    assert opt["init_args"] == {"lr": lr, "weight_decay": 0.1, "betas": [0.9, 0.95]}
    assert cfg["precision"] == "bf16-mixed" and cfg["model_name"] == size
    assert cfg["data"]["init_args"]["mix_weights_str"] == "main:1.0"
    assert set(cfg["data"]["init_args"]["val_data_path"]) == {"c4", "code", "math"}


@pytest.mark.parametrize("rel", [p for p in RUNS if p.startswith(("midtrain/", "ablations/"))])
def test_midtrain_config_differs_from_its_pretraining_only_in_data_and_paths(rel: str):
    """Same model, schedule and max_steps as the run it resumes: the LR schedule continues."""
    cfg, base = load(rel), load(f"pretrain/{load(rel)['model_name']}.yaml")
    for c in (cfg, base):
        for key in ("out_dir", "resume"):
            c.pop(key)
        for key in ("mix_weights_str", "literal_weights_str"):
            c["data"]["init_args"].pop(key, None)
    assert cfg == base


def test_mix_configs_resolve(root: Path):
    shards = discover_shards(root / "data/pretrain")
    files = sorted((CONFIGS / "mix_configs").glob("*.json"))
    assert len(files) >= 6
    for path in files:
        mixture = resolve_mixture(load_mix_config(path), shards)
        assert mixture.active, path.name
    qa = resolve_mixture(load_mix_config(CONFIGS / "mix_configs/qa20-literal.json"), shards).weights_by_type()
    assert qa["qa"] == pytest.approx(0.2)


@pytest.mark.parametrize("rel", FINETUNE)
def test_finetune_configs_have_the_planned_schema(rel: str):
    cfg = load(rel)
    assert {"checkpoint_dir", "out_dir", "data", "train", "eval"} <= set(cfg), rel
    assert re.search(r"/step-\d{8}$", cfg["checkpoint_dir"]), rel
    data = cfg["data"]
    assert data["class_path"] == "litgpt.data.JSON"
    assert {"json_path", "val_split_fraction", "mask_prompt", "prompt_style"} <= set(data["init_args"])
    if "replay" in Path(rel).stem:
        assert cfg["replay"]["ratio"] == 0.25
        assert set(cfg["replay"]["data"]) == {"data_path", "mix_weights_str"}
        assert cfg["replay"]["data"]["mix_weights_str"] == "main:1"
    else:
        assert "replay" not in cfg


@pytest.mark.parametrize("rel", FINETUNE)
def test_finetune_configs_parse_with_the_finetune_cli(rel: str):
    """Parse only (no instantiation: the SFT JSON files are not in the test tree)."""
    from midtrain.cli import _parser
    from midtrain.config.commands import FinetuneConfig

    cfg = _parser(FinetuneConfig, "midtrain finetune").parse_args(["--config", str(CONFIGS / rel)])
    assert str(cfg.checkpoint_dir).endswith(load(rel)["checkpoint_dir"])
    assert "c4" in (cfg.val_data_path or {}) or "main" in (cfg.val_data_path or {})


@pytest.mark.parametrize("rel", EVALUATE)
def test_evaluate_configs_parse_with_the_evaluate_cli(rel: str):
    """Parse only; tests/test_slurm.py runs tiny/evaluate.yaml on real checkpoints."""
    from midtrain.cli import _parser
    from midtrain.eval.losses import evaluate

    cfg = _parser(evaluate, "midtrain evaluate").parse_args(["--config", str(CONFIGS / rel)])
    assert cfg.checkpoints and cfg.val and str(cfg.out) == load(rel)["out"]
