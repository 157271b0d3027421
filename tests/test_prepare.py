"""`midtrain prepare` (raw corpora -> typed token shards) and the built-in demo corpus."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest
import zstandard

from midtrain import prepare as prep
from midtrain.data.shards import discover_shards
from midtrain.demo.corpus import EOS, build_demo_corpus, train_bpe_tokenizer
from midtrain.errors import MidtrainError
from midtrain.prepare import MANIFEST_NAME, prepare, read_shard_tokens

_WORDS = "the model reads code and math while a tokenizer splits text into pieces of data".split()


def _make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    extras = [
        "naïve café — 数学 🙂",
        "def f(x):\n    return x * 2\n",
        "  leading and trailing  ",
        "a\tb\n\nc",
        "12 + 30 = 42",
    ]
    docs = []
    for i in range(n):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 40)))
        docs.append(f"doc {i}: {words} {extras[i % len(extras)]}")
    return docs


DOCS = _make_docs(60)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return train_bpe_tokenizer(_make_docs(300, seed=1), tmp_path_factory.mktemp("tok"), vocab_size=400)


@pytest.fixture(scope="module")
def litgpt_tok(tok_dir):
    from litgpt.tokenizer import Tokenizer

    return Tokenizer(tok_dir)


def _write_jsonl(path: Path, docs: list[str], opener=open, key: str = "text") -> Path:
    with opener(path, "wt", encoding="utf-8") as fh:
        for i, d in enumerate(docs):
            fh.write(json.dumps({"id": i, key: d}) + "\n")
    return path


def _zst_open(path, mode, encoding):
    return zstandard.open(path, mode, encoding=encoding)


def _split_docs(tokens: np.ndarray, tok) -> list[str]:
    """Decode a token stream back to documents, cutting at EOS."""
    docs, start = [], 0
    for end in np.flatnonzero(tokens == tok.eos_id):
        docs.append(tok.decode(np.asarray(tokens[start:end], dtype=np.int64)))
        start = end + 1
    assert start == len(tokens), "stream must end with EOS"
    return docs


def _decode_shard(path: Path, tok) -> list[str]:
    return _split_docs(read_shard_tokens(path), tok)


def _prepare(inputs, data_path, tok_dir, **kw) -> Path:
    kw.setdefault("type", "code")
    kw.setdefault("num_workers", 0)
    return prepare(inputs, data_path=data_path, tokenizer_dir=tok_dir, **kw)


@pytest.mark.filterwarnings("ignore:The given buffer is not writable")
def test_round_trip_through_litdata_streaming_dataset(tmp_path, tok_dir, litgpt_tok):
    import torch
    from litdata import StreamingDataset, TokensLoader

    src = _write_jsonl(tmp_path / "raw.jsonl", DOCS)
    shard = _prepare(str(src), tmp_path / "corpus", tok_dir, chunk_tokens=300)
    assert shard == (tmp_path / "corpus" / "c1").resolve()

    ds = StreamingDataset(str(shard), item_loader=TokensLoader(block_size=1), shuffle=False)
    streamed = torch.cat([ds[i] for i in range(len(ds))]).numpy()
    assert np.array_equal(streamed, read_shard_tokens(shard))
    assert sorted(_split_docs(streamed, litgpt_tok)) == sorted(DOCS)

    manifest = json.loads((shard / MANIFEST_NAME).read_text())
    assert manifest["documents"] == len(DOCS) and manifest["tokens"] == len(streamed)
    assert manifest["inputs"][0]["sha256"] == prep.manifests.sha256_file(src).hexdigest()
    assert manifest["inputs"][0]["bytes"] == src.stat().st_size
    assert manifest["tokenizer"]["fingerprint"] == prep.tokenizer_fingerprint(tok_dir)
    (found,) = discover_shards(tmp_path / "corpus")
    assert (found.id, found.type, found.tokens) == ("c1", "code", len(streamed))


@pytest.mark.parametrize("bos", [False, True])
def test_ids_equal_litgpt_encode_with_parallel_workers(tmp_path, tok_dir, bos):
    from litgpt.tokenizer import Tokenizer
    from tokenizers import Tokenizer as HFTokenizer

    if bos:  # a tokenizer whose config asks for a distinct BOS token
        bos_dir = tmp_path / "tok_bos"
        hf = HFTokenizer.from_file(str(tok_dir / "tokenizer.json"))
        hf.add_special_tokens(["<s>"])
        bos_dir.mkdir()
        hf.save(str(bos_dir / "tokenizer.json"))
        config = json.loads((tok_dir / "tokenizer_config.json").read_text())
        (bos_dir / "tokenizer_config.json").write_text(
            json.dumps({**config, "bos_token": "<s>", "add_bos_token": True})
        )
        tok_dir = bos_dir
    docs = DOCS + [f"ends with eos {EOS}", f"{EOS} starts with eos", "<s> starts with bos"]
    src = _write_jsonl(tmp_path / "raw.jsonl", docs)
    shard = _prepare(str(src), tmp_path / "corpus", tok_dir, num_workers=2)
    lit = Tokenizer(tok_dir)
    assert lit.use_bos is bos
    expected = np.concatenate([lit.encode(d, eos=True).numpy() for d in docs])
    assert np.array_equal(read_shard_tokens(shard).astype(np.int64), expected)
    assert json.loads((shard / MANIFEST_NAME).read_text())["eos_dropped_documents"] == 1


def _jsonl_gz(tmp_path, docs):
    return str(_write_jsonl(tmp_path / "raw.jsonl.gz", docs, opener=gzip.open))


def _jsonl_zst(tmp_path, docs):
    return str(_write_jsonl(tmp_path / "raw.jsonl.zst", docs, opener=_zst_open))


def _jsonl_glob(tmp_path, docs):
    _write_jsonl(tmp_path / "a.jsonl", docs[:20])
    _write_jsonl(tmp_path / "b.jsonl", docs[20:])
    return str(tmp_path / "*.jsonl")


def _parquet(tmp_path, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "raw.parquet"
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=17)
    return str(path)


def _txt_dir(tmp_path, docs):
    root = tmp_path / "texts"
    for i, d in enumerate(docs):
        sub = root / ("nested" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:03d}.{'md' if i % 3 else 'txt'}").write_text(d, encoding="utf-8")
    (root / "ignored.py").write_text("not a text document")
    return str(root)


def _hf_dataset(tmp_path, docs):
    import datasets  # the `hf` extra, part of `dev`

    path = tmp_path / "hf"
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("make", [_jsonl_gz, _jsonl_zst, _jsonl_glob, _parquet, _txt_dir, _hf_dataset])
def test_input_formats(tmp_path, tok_dir, litgpt_tok, make):
    raw = tmp_path / "raw"
    raw.mkdir()
    shard = _prepare(make(raw, DOCS), tmp_path / "corpus", tok_dir)
    assert sorted(_decode_shard(shard, litgpt_tok)) == sorted(DOCS)


def test_hf_dataset_columns_splits_and_bad_rows(tmp_path, tok_dir, litgpt_tok):
    import datasets

    docs = DOCS[:10]
    rows = {"content": [*docs[:5], None, *docs[5:]], "id": list(range(11))}
    ds = datasets.Dataset.from_dict(rows)
    ds.save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(MidtrainError, match=r"no column 'text' \(columns: \['content', 'id'\]\)"):
        _prepare(str(tmp_path / "hf"), tmp_path / "corpus", tok_dir)
    with pytest.raises(MidtrainError, match=r"row 6: 'content' is NoneType"):
        _prepare(str(tmp_path / "hf"), tmp_path / "corpus", tok_dir, text_key="content")
    shard = _prepare(str(tmp_path / "hf"), tmp_path / "corpus", tok_dir, text_key="content", skip_bad=True)
    assert _decode_shard(shard, litgpt_tok) == docs  # row order kept, the None row skipped and counted
    assert json.loads((shard / MANIFEST_NAME).read_text())["skipped_bad_records"] == 1

    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(MidtrainError, match=r"DatasetDict with splits \['test', 'train'\]; pass one split"):
        _prepare(str(tmp_path / "dd"), tmp_path / "corpus", tok_dir)
    shard2 = _prepare(str(tmp_path / "dd" / "train"), tmp_path / "corpus2", tok_dir, text_key="content", skip_bad=True)
    assert _decode_shard(shard2, litgpt_tok) == docs


def _no_shards(data_path: Path) -> None:
    with pytest.raises(MidtrainError, match="No shards"):
        discover_shards(data_path)
    assert not [p for p in data_path.rglob("*") if ".tmp-" in p.name], "temp dirs must be cleaned up"


def test_interrupted_run_leaves_nothing_and_rerun_works(tmp_path, tok_dir, litgpt_tok):
    data = tmp_path / "corpus"
    src = _write_jsonl(tmp_path / "raw.jsonl", DOCS)
    with open(src, "a") as fh:
        fh.write('{"text": "truncated\n')
    with pytest.raises(MidtrainError, match=r"raw\.jsonl:61"):  # after several chunks were flushed
        _prepare(str(src), data, tok_dir, chunk_tokens=100, val_fraction=0.2, num_workers=2)
    _no_shards(data)

    _write_jsonl(src, DOCS)  # fixed input
    shard = _prepare(str(src), data, tok_dir, chunk_tokens=100)
    assert shard.name == "c1" and sorted(_decode_shard(shard, litgpt_tok)) == sorted(DOCS)


def test_interrupt_from_reader_aborts_cleanly(tmp_path, tok_dir, monkeypatch):
    def exploding_reader(*args, **kwargs):
        yield from DOCS
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "iter_documents", exploding_reader)
    src = _write_jsonl(tmp_path / "raw.jsonl", DOCS)
    with pytest.raises(KeyboardInterrupt):
        _prepare(str(src), tmp_path / "corpus", tok_dir, chunk_tokens=100, val_tokens=50, num_workers=2)
    _no_shards(tmp_path / "corpus")


def test_leftover_temp_dir_is_ignored_and_reported(tmp_path, tok_dir, capsys):
    data = tmp_path / "corpus"
    (data / ".c1.tmp-999999").mkdir(parents=True)
    (data / ".c1.tmp-999999" / "index.json").write_text('{"chunks": []}')
    with pytest.raises(MidtrainError, match="No shards"):
        discover_shards(data)
    shard = _prepare(str(_write_jsonl(tmp_path / "raw.jsonl", DOCS)), data, tok_dir)
    assert shard.name == "c1"
    assert ".c1.tmp-999999 is left over" in capsys.readouterr().out
    assert [s.id for s in discover_shards(data)] == ["c1"]


def test_rerun_with_same_inputs_skips_and_overlap_is_refused(tmp_path, tok_dir, capsys):
    data = tmp_path / "corpus"
    a = _write_jsonl(tmp_path / "a.jsonl", DOCS[:30])
    b = _write_jsonl(tmp_path / "b.jsonl", DOCS[30:])
    first = _prepare(str(a), data, tok_dir)
    capsys.readouterr()
    assert _prepare(str(a), data, tok_dir) == first
    assert "already prepared in shard" in capsys.readouterr().out
    assert [s.id for s in discover_shards(data)] == ["c1"]
    with pytest.raises(MidtrainError, match=r"a\.jsonl.*already prepared in shard .*c1"):
        _prepare([str(a), str(b)], data, tok_dir)
    assert _prepare(str(b), data, tok_dir).name == "c2"


def test_tokenizer_mismatch_names_both_fingerprints(tmp_path, tok_dir):
    data = tmp_path / "corpus"
    _prepare(str(_write_jsonl(tmp_path / "a.jsonl", DOCS)), data, tok_dir)
    other = train_bpe_tokenizer(_make_docs(100, seed=7), tmp_path / "other_tok", vocab_size=300)
    old, new = prep.tokenizer_fingerprint(tok_dir), prep.tokenizer_fingerprint(other)
    assert old != new
    with pytest.raises(MidtrainError, match=f"(?s)Tokenizer mismatch.*{old}.*{new}"):
        _prepare(str(_write_jsonl(tmp_path / "b.jsonl", DOCS[:5])), data, other, type="math")


def test_malformed_jsonl_names_file_and_line_or_is_skipped(tmp_path, tok_dir, litgpt_tok, capsys):
    lines = [json.dumps({"text": d}) for d in DOCS[:5]]
    lines.insert(2, "{not json")
    lines.insert(4, json.dumps({"content": "wrong key"}))
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(MidtrainError, match=r"bad\.jsonl:3: malformed JSON"):
        _prepare(str(src), tmp_path / "corpus", tok_dir)
    src.write_text("\n".join(lines[3:]) + "\n")
    with pytest.raises(MidtrainError, match=r"bad\.jsonl:2: no key 'text' \(keys: content\)"):
        _prepare(str(src), tmp_path / "corpus", tok_dir)

    src.write_text("\n".join(lines) + "\n")
    shard = _prepare(str(src), tmp_path / "corpus", tok_dir, skip_bad=True)
    assert sorted(_decode_shard(shard, litgpt_tok)) == sorted(DOCS[:5])
    assert json.loads((shard / MANIFEST_NAME).read_text())["skipped_bad_records"] == 2
    out = capsys.readouterr().out
    assert "skipped 2 malformed records" in out and "bad.jsonl:3" in out


def test_empty_inputs_are_clear_errors(tmp_path, tok_dir):
    data = tmp_path / "corpus"
    with pytest.raises(MidtrainError, match="matches no files"):
        _prepare(str(tmp_path / "nothing" / "*.jsonl"), data, tok_dir)
    with pytest.raises(MidtrainError, match="does not exist"):
        _prepare(str(tmp_path / "missing.jsonl"), data, tok_dir)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(MidtrainError, match="holds no"):
        _prepare(str(tmp_path / "emptydir"), data, tok_dir)
    with pytest.raises(MidtrainError, match=r"no column 'content' \(columns: \['id', 'text'\]\)"):
        _prepare(_parquet(tmp_path, DOCS), data, tok_dir, text_key="content")
    blank = tmp_path / "blank.jsonl"
    blank.write_text('\n{"text": ""}\n\n')
    with pytest.raises(MidtrainError, match="No training documents"):
        _prepare(str(blank), data, tok_dir)
    assert not any(data.iterdir())


def test_validation_split_is_beside_and_not_discovered(tmp_path, tok_dir, litgpt_tok):
    data = tmp_path / "corpus"
    shard = _prepare(str(_write_jsonl(tmp_path / "a.jsonl", DOCS)), data, tok_dir, val_fraction=0.3)
    train, val = _decode_shard(shard, litgpt_tok), _decode_shard(data / "val" / "c1", litgpt_tok)
    assert sorted(train + val) == sorted(DOCS) and val and not set(train) & set(val)
    assert [s.id for s in discover_shards(data)] == ["c1"]
    manifest = json.loads((shard / MANIFEST_NAME).read_text())
    assert manifest["validation"] == {
        "path": "val/c1",
        "documents": len(val),
        "tokens": len(read_shard_tokens(data / "val" / "c1")),  # counted from the written shard
    }

    docs = DOCS[::-1]
    _prepare(str(_write_jsonl(tmp_path / "b.jsonl", docs)), data, tok_dir, type="math", val_tokens=50)
    val = _decode_shard(data / "val" / "m1", litgpt_tok)
    assert val == docs[: len(val)] and len(read_shard_tokens(data / "val" / "m1")) >= 50
    assert len(val) < len(docs) // 2


def test_shard_names_types_and_argument_errors(tmp_path, tok_dir):
    data = tmp_path / "corpus"
    inputs = [str(_write_jsonl(tmp_path / f"{i}.jsonl", DOCS[i * 5 : i * 5 + 5])) for i in range(5)]
    assert _prepare(inputs[0], data, tok_dir, type="main").name == "1"
    assert _prepare(inputs[1], data, tok_dir, type="main").name == "2"
    assert _prepare(inputs[2], data, tok_dir, shard="c5").name == "c5"
    assert _prepare(inputs[3], data, tok_dir, type="pubmed", shard_types={"pubmed": "pm"}).name == "pm1"
    with pytest.raises(MidtrainError, match="does not fit type 'code'"):
        _prepare(inputs[4], data, tok_dir, shard="m1")
    with pytest.raises(MidtrainError, match="already exists; the next free name is 'c6'"):
        _prepare(inputs[4], data, tok_dir, shard="c5")
    with pytest.raises(MidtrainError, match=r"Unknown shard type 'poetry'.*'code'"):
        _prepare(inputs[4], data, tok_dir, type="poetry")
    with pytest.raises(MidtrainError, match="at most one of val_tokens and val_fraction"):
        _prepare(inputs[4], data, tok_dir, val_tokens=10, val_fraction=0.1)
    ids = {s.id: s.type for s in discover_shards(data, {"pubmed": "pm"})}
    assert ids == {"main/1": "main", "main/2": "main", "c5": "code", "pm1": "pubmed"}


def _tree(root: Path) -> dict[str, bytes | dict]:
    """Every file's bytes; index.json parsed, without litdata's ``updated_at`` timestamp."""
    tree: dict[str, bytes | dict] = {}
    for p in sorted(root.rglob("*")):
        if p.name == "index.json":
            tree[str(p.relative_to(root))] = {k: v for k, v in json.loads(p.read_text()).items() if k != "updated_at"}
        elif p.is_file():
            tree[str(p.relative_to(root))] = p.read_bytes()
    return tree


@pytest.mark.slow  # builds the demo corpus three times (tens of seconds)
def test_demo_corpus_is_deterministic_and_discoverable(tmp_path):
    from litgpt.tokenizer import Tokenizer

    small = {"scale": 0.04, "vocab_size": 512}
    info = build_demo_corpus(tmp_path / "a", seed=0, **small)
    build_demo_corpus(tmp_path / "b", seed=0, **small)
    build_demo_corpus(tmp_path / "c", seed=1, **small)
    a, b, c = (_tree(tmp_path / x) for x in "abc")
    assert a == b
    assert a["c1/chunk-0-0.bin"] != c["c1/chunk-0-0.bin"]

    shards = {s.id: s.type for s in discover_shards(tmp_path / "a")}
    assert shards == {"main/1": "main", "main/2": "main", "c1": "code", "c2": "code", "m1": "math"}
    for domain in ("main", "code", "math"):
        assert read_shard_tokens(tmp_path / "a" / "val" / domain).size > 0
    tok = Tokenizer(info["tokenizer_dir"])
    assert tok.eos_id == tok.token_to_id(EOS) and not tok.use_bos
    math_text = tok.decode(np.asarray(read_shard_tokens(tmp_path / "a" / "m1")[:200], dtype=np.int64))
    assert "Answer:" in math_text
    sft = json.loads((tmp_path / "a" / "sft" / "code_sft.json").read_text())
    sft_val = json.loads((tmp_path / "a" / "sft" / "code_sft_val.json").read_text())
    assert sft and sft_val and set(sft[0]) == {"instruction", "input", "output"}
    assert not {json.dumps(e) for e in sft} & {json.dumps(e) for e in sft_val}

    assert build_demo_corpus(tmp_path / "a", seed=0, **small)["shards"] == info["shards"]  # reused, not rebuilt
    with pytest.raises(MidtrainError, match="already holds a demo corpus"):
        build_demo_corpus(tmp_path / "a", seed=3, **small)
