"""`midtrain prepare sft`: the paper's SFT sets (GSM8K, SciQ, LIMA, a PyCode-style code set) -> litgpt JSON,
read back by litgpt's own ``litgpt.data.JSON``. Samples are written here in each set's record format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from midtrain.demo.corpus import train_bpe_tokenizer
from midtrain.errors import MidtrainError
from midtrain.prepare.sft_formats import prepare_sft

GSM8K = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A box holds 6 eggs. How many eggs are in 2 boxes?", "answer": "2 * 6 = <<2*6=12>>12\n#### 12"},
]
SCIQ = [
    {"question": "What gas do plants absorb?", "distractor1": "oxygen", "distractor2": "helium",
     "distractor3": "neon", "correct_answer": "carbon dioxide", "support": " Plants take in carbon dioxide. "},
    {"question": "What is the closest star to Earth?", "distractor1": "Sirius", "distractor2": "Vega",
     "distractor3": "Polaris", "correct_answer": "the Sun", "support": ""},
]
LIMA = [
    {"conversations": ["How do I boil an egg?", "Put it in boiling water for nine minutes."], "source": "wikihow"},
    {"conversations": ["Name a prime.", "7", "Another one?", "11"], "source": "multi_turn"},
    {"conversations": ["Only a question, no answer"], "source": "broken"},
]
PYCODE = [
    {"instruction": "Write a function that doubles a number.", "input": "",
     "output": "def double(x):\n    return 2 * x", "prompt": "..."},
    {"instruction": "Sum a list.", "input": "[1, 2, 3]", "output": "print(sum([1, 2, 3]))", "prompt": "..."},
]
EXPECTED = {
    "gsm8k": (GSM8K, [{"instruction": r["question"], "input": "", "output": r["answer"]} for r in GSM8K]),
    "sciq": (SCIQ, [
        {"instruction": "What gas do plants absorb?", "input": "Plants take in carbon dioxide.",
         "output": "carbon dioxide"},
        {"instruction": "What is the closest star to Earth?", "input": "", "output": "the Sun"},
    ]),
    "lima": (LIMA, [
        {"instruction": "How do I boil an egg?", "input": "", "output": "Put it in boiling water for nine minutes."},
        {"instruction": "Name a prime.", "input": "", "output": "7"},
    ]),
    "code": (PYCODE, [{k: r[k] for k in ("instruction", "input", "output")} for r in PYCODE]),
}


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("fmt", sorted(EXPECTED))
def test_each_format_gives_litgpt_json(tmp_path, fmt):
    records, expected = EXPECTED[fmt]
    out = prepare_sft(str(_jsonl(tmp_path / f"{fmt}.jsonl", records)), fmt, tmp_path / "sft" / f"{fmt}.json")
    assert json.loads(out.read_text()) == expected


def test_litgpt_reads_the_written_json(tmp_path):
    from litgpt.data import JSON
    from litgpt.tokenizer import Tokenizer

    out = prepare_sft(str(_jsonl(tmp_path / "g.jsonl", GSM8K * 5)), "gsm8k", tmp_path / "gsm8k.json")
    texts = [r["question"] + r["answer"] for r in GSM8K] * 20
    tokenizer = Tokenizer(train_bpe_tokenizer(texts, tmp_path / "tok", vocab_size=300))
    data = JSON(json_path=out, val_split_fraction=0.2, prompt_style="alpaca")
    data.connect(tokenizer, batch_size=2, max_seq_length=256)
    data.setup()
    assert len(data.train_dataset) == 8 and len(data.test_dataset) == 2
    sample = data.train_dataset[0]
    response = tokenizer.decode(sample["input_ids"][sample["labels"] != -100])
    assert "####" in response  # the loss is on the worked answer, not on the prompt


def test_parquet_and_dataset_directory_sources(tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "sciq").mkdir()
    pq.write_table(pa.Table.from_pylist(SCIQ), tmp_path / "sciq" / "train-00000.parquet")
    from_file = prepare_sft(str(tmp_path / "sciq" / "train-00000.parquet"), "sciq", tmp_path / "a.json")
    from_dataset = prepare_sft(str(tmp_path / "sciq"), "sciq", tmp_path / "b.json", split="train")
    assert json.loads(from_file.read_text()) == json.loads(from_dataset.read_text()) == EXPECTED["sciq"][1]


def test_wrong_format_is_one_clear_error(tmp_path):
    src = _jsonl(tmp_path / "lima.jsonl", LIMA)
    with pytest.raises(MidtrainError, match=r"record 0: no field 'question'.*--format gsm8k"):
        prepare_sft(str(src), "gsm8k", tmp_path / "x.json")
    with pytest.raises(MidtrainError, match=r"Unknown SFT format 'alpaca'; choose one of \['code', 'gsm8k'"):
        prepare_sft(str(src), "alpaca", tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_cli_prepare_sft(tmp_path):
    src = _jsonl(tmp_path / "code.jsonl", PYCODE + [{"instruction": "no output field"}])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    base = [sys.executable, "-m", "midtrain", "prepare", "sft", "--source", str(src), "--format", "code",
            "--output", str(tmp_path / "pycode.json")]
    failed = subprocess.run(base, capture_output=True, text=True, env=env, timeout=300)
    assert failed.returncode == 2 and "record 2: no field 'output'" in failed.stderr
    done = subprocess.run([*base, "--skip_bad", "true"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "wrote 2 code examples" in done.stdout and "skipped 1 bad" in done.stdout
    assert json.loads((tmp_path / "pycode.json").read_text()) == EXPECTED["code"][1]
