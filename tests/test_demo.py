"""Pieces of ``midtrain demo`` on a small demo corpus (the full demo is not run here: it takes minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from midtrain.demo.corpus import build_demo_corpus
from midtrain.demo.run import _sft_data, demo_experiment

pytestmark = pytest.mark.slow  # builds a demo corpus and its tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    return build_demo_corpus(tmp_path_factory.mktemp("demo") / "corpus", seed=0, scale=0.05, vocab_size=1024)


def test_sft_data_scores_every_sample_and_shares_one_validation_set(corpus, tmp_path):
    root, sft = Path(corpus["data_path"]), corpus["sft"]
    dirs, scored = _sft_data(root, sft, tmp_path / "sft_data", [0.25, 0.5, 1.0], seed=0)
    n = sft["examples"]
    assert sorted(dirs) == sorted({max(16, round(f * n)) for f in (0.25, 0.5, 1.0)})
    subsets = [json.loads((dirs[x] / "train.json").read_text()) for x in sorted(dirs)]
    for small, large in zip(subsets, subsets[1:]):  # nested: more target data adds examples, keeps the others
        assert {json.dumps(e) for e in small} < {json.dumps(e) for e in large}
    assert len(subsets[-1]) == n
    val = (root / sft["val"]).read_bytes()
    assert all((d / "val.json").read_bytes() == val for d in dirs.values())  # the file `evaluate` scores
    for split in ("train", "val"):
        assert scored[split]["fraction"] == 1.0 and scored[split]["min_tokens"] >= 1, scored
    assert f"max_seq_length {sft['max_seq_length']}" in scored["text"]


def test_the_demo_is_an_experiment_file_with_the_timing_and_percentage_branches(corpus, tmp_path):
    from midtrain.experiment.generate import plan
    from midtrain.experiment.spec import load

    root, sft = Path(corpus["data_path"]), corpus["sft"]
    dirs, _ = _sft_data(root, sft, tmp_path / "sft_data", [0.25, 0.5, 1.0], seed=0)
    p = plan(load(demo_experiment(tmp_path, root, sft, dirs, 200, 100, 400, 768, 2)))
    by_name = {n.name: n for n in p.nodes}
    # the base run stops at both branch steps; each branch waits only for the segment that writes its checkpoint
    assert by_name["code20-early"].deps == ("base-to100",) and by_name["code20"].deps == ("base-to200",)
    assert p.configs["code20-early"]["resume"].endswith("step-00000100")
    assert p.configs["code50"]["data"]["init_args"]["mix_weights_str"] == "main:0.5,code:0.5"
    plain = [n for n in p.nodes if n.kind == "finetune" and n.params["set"] == "code"]
    assert {(n.params["target"], n.params["seed"]) for n in plain} == {
        (t, s) for t in ("base", "code20", "code50", "cpt", "code20-early") for s in (42, 43)}
    assert all(n.params["ratio"] == 0 for n in plain)
    eff = [n for n in p.nodes if n.kind == "finetune" and n.params["set"] != "code"]
    assert {n.params["target"] for n in eff} == {"base"} and len(eff) == 2 * (len(dirs) - 1) + 1
    # every SFT run consumes the same number of target sequences: smaller sets repeat more epochs
    for n in plain + eff:
        cfg = p.configs[n.name]
        examples = len(json.loads((Path(cfg["data"]["init_args"]["json_path"]) / "train.json").read_text()))
        assert cfg["epochs"] * examples == pytest.approx(768)
        assert ("replay" in cfg) == bool(n.params["ratio"])
    assert all(n.deps == (n.name[: -len("/eval")],) for n in p.nodes if n.kind == "evaluate")


def test_a_set_written_as_a_mapping_is_checked(corpus, tmp_path):
    from midtrain.errors import MidtrainError
    from midtrain.experiment.spec import load

    root, sft = Path(corpus["data_path"]), corpus["sft"]
    dirs, _ = _sft_data(root, sft, tmp_path / "sft_data", [0.25, 0.5, 1.0], seed=0)
    path = demo_experiment(tmp_path, root, sft, dirs, 200, 100, 400, 768, 1)
    import yaml

    spec = yaml.safe_load(path.read_text())
    spec["finetune"]["sets"]["code"]["branches"] = ["nowhere"]
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(MidtrainError, match=r"finetune.sets.code.branches: 'nowhere' is not a branch; valid: base"):
        load(path)
    spec["finetune"]["sets"]["code"] = {"paht": "x"}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(MidtrainError, match=r"paht"):
        load(path)


def test_a_claim_can_name_a_benchmark_metric(corpus, tmp_path):
    import yaml

    from midtrain.errors import MidtrainError
    from midtrain.experiment.spec import load

    root, sft = Path(corpus["data_path"]), corpus["sft"]
    dirs, _ = _sft_data(root, sft, tmp_path / "sft_data", [0.25, 0.5, 1.0], seed=0)
    path = demo_experiment(tmp_path, root, sft, dirs, 200, 100, 400, 768, 1)
    spec = yaml.safe_load(path.read_text())
    spec["evaluate"]["tasks"] = ["demo_mc"]
    spec["report"] = {"claims": ["timing", {"claim": "midtrain_vs_base", "metric": "demo_mc/acc"}]}
    path.write_text(yaml.safe_dump(spec))
    assert load(path).report.claims[1] == {"claim": "midtrain_vs_base", "metric": "demo_mc/acc"}
    spec["report"]["claims"][1]["metric"] = "arc_easy/acc"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(MidtrainError, match=r"report.claims.midtrain_vs_base.metric: task 'arc_easy' is not among"):
        load(path)
