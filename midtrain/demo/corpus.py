"""The built-in demo corpus: a small multi-domain token corpus from what every Python install has.

No download. Three clearly distinct domains:

* ``code`` (shards ``c1``, ``c2``): standard-library ``*.py`` source files;
* ``main`` (shards ``1``, ``2``): English prose, the bundled documentation text
  (``pydoc_data.topics``) and standard-library docstrings;
* ``math`` (shard ``m1``): generated arithmetic and word problems with worked answers.

Plus a byte-level BPE tokenizer trained on the corpus (``tokenizer/``, loadable by litgpt's
``Tokenizer``), validation shards per domain (``val/main``, ``val/code``, ``val/math``), and a tiny
code SFT set (``sft/code_sft.json`` and ``sft/code_sft_val.json``, litgpt's instruction/input/
output JSON) whose prompts, rendered in the ``alpaca`` style, leave every example at least 16 scored
response tokens within 128 tokens. The standard library is split into disjoint file pools for code shards, docstring
prose and SFT examples, so SFT answers are never verbatim in the pretraining data.

Deterministic for a given seed on a given Python installation (the standard library differs
between Python versions). The whole directory is built in a hidden sibling and renamed into place.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sysconfig
import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path

from midtrain.errors import MidtrainError
from midtrain.prepare import (
    VAL_DIR,
    TokenizerSpec,
    load_tokenizer_spec,
    tokenize_to_shard,
)

EOS = "<|endoftext|>"
DEMO_MARKER = "demo.json"
DEMO_VERSION = 2
DEFAULT_VOCAB_SIZE = 4096
# Characters of raw text per domain at scale 1.0 (about 1M tokens, ~2 MB of uint16 tokens in all).
CODE_CHARS = 1_600_000
PROSE_CHARS = 1_000_000
MATH_CHARS = 600_000
SFT_EXAMPLES = 288  # at scale 1: 240 train + 48 validation examples
SFT_VAL_FRACTION = 1 / 6
# The SFT set is built for fine-tuning with this prompt style and sequence length: every example's
# rendered prompt leaves at least SFT_MIN_SCORED response tokens, so no sample is fully masked.
SFT_PROMPT_STYLE = "alpaca"
SFT_MAX_SEQ_LENGTH = 128
SFT_MIN_SCORED = 16
VAL_FRACTION = 0.05
MAX_FILE_BYTES = 200_000
MAX_DOC_CHARS = 16_000
# Small chunks, so litdata can spread every shard over several ranks and loader workers.
CHUNK_TOKENS = 16_384
MIN_DOCS = 4  # per domain: two training shards and a validation set need documents
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__"}
_SKIP_DIRS |= {"encodings", "pydoc_data", "ensurepip"}  # tables, the prose source, wheels


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def stdlib_files() -> list[Path]:
    """Standard-library ``*.py`` files (no tests, IDLE, tables or third-party packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            path = Path(dirpath, name)
            if name.endswith(".py") and 200 < path.stat().st_size <= MAX_FILE_BYTES:
                files.append(path)
    if not files:
        raise MidtrainError(f"No standard-library source files found under {root}; cannot build the demo corpus.")
    return sorted(files)


def _module_name(path: Path) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def _parse(path: Path) -> tuple[str, ast.Module] | None:
    source = _read(path)
    if source is None:
        return None
    try:
        return source, ast.parse(source)
    except (SyntaxError, ValueError):
        return None


def take_until(items: Iterable[str], budget: int, min_items: int = MIN_DOCS) -> list[str]:
    """Leading items whose total length stays within ``budget`` characters (at least ``min_items``)."""
    out, total = [], 0
    for item in items:
        if len(out) >= min_items and total + len(item) > budget:
            break
        out.append(item)
        total += len(item)
    return out


def code_documents(files: list[Path], budget: int) -> list[str]:
    """Source files as documents headed by their module path; long files split between top-level blocks."""

    def gen() -> Iterable[str]:
        for path in files:
            text = _read(path)
            if text:
                for i, part in enumerate(pack(text.split("\n\n\n"), MAX_DOC_CHARS, "\n\n\n")):
                    yield f"# {_module_name(path)}{f' (part {i + 1})' if i else ''}\n{part}"

    return take_until(gen(), budget)


def pack(pieces: list[str], max_chars: int, sep: str) -> list[str]:
    """Join consecutive pieces with ``sep`` into parts of at most ``max_chars`` (a longer piece stays whole)."""
    parts: list[str] = []
    for piece in pieces:
        if parts and len(parts[-1]) + len(sep) + len(piece) <= max_chars:
            parts[-1] += sep + piece
        else:
            parts.append(piece)
    return parts


def docstring_documents(files: list[Path], budget: int) -> list[str]:
    """One prose document per module: its docstrings (module, classes, functions) as paragraphs."""

    def gen() -> Iterable[str]:
        for path in files:
            parsed = _parse(path)
            if parsed is None:
                continue
            nodes = _documented_nodes(parsed[1])
            docs = [d for n in nodes if isinstance(n, _DOC_NODES) and (d := ast.get_docstring(n)) and len(d) > 60]
            unique = list(dict.fromkeys(docs))
            if unique:
                yield "\n\n".join(unique)

    return take_until(gen(), budget)


_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _documented_nodes(tree: ast.Module) -> list[ast.AST]:
    """The module, its top-level definitions and the methods of its top-level classes."""
    nodes: list[ast.AST] = [tree]
    for node in tree.body:
        nodes.append(node)
        if isinstance(node, ast.ClassDef):
            nodes.extend(node.body)
    return nodes


def prose_documents(files: list[Path], budget: int) -> list[str]:
    """Bundled documentation topics (``pydoc_data``) plus docstrings, up to ``budget`` characters."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    docs = [topics[k].strip() for k in sorted(topics) if topics[k].strip()]
    docs = take_until(docs, budget // 2, min_items=0)
    return docs + docstring_documents(files, budget - sum(map(len, docs)))


_NAMES = ["Alice", "Bob", "Chen", "Dana", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Jia", "Kofi", "Lena"]
_ITEMS = ["apples", "books", "marbles", "stamps", "pencils", "cookies", "shells", "cards"]


def _arith(rng: random.Random) -> str:
    a, b = rng.randint(2, 999), rng.randint(2, 999)
    op = rng.choice("+-*")
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"Compute {a} {op} {b}.\nAnswer: {a} {op} {b} = {value}."


def _division(rng: random.Random) -> str:
    b = rng.randint(2, 40)
    a = rng.randint(b, 2000)
    q, r = divmod(a, b)
    return f"Divide {a} by {b}.\nAnswer: {a} = {b} * {q} + {r}, so the quotient is {q} and the remainder is {r}."


def _expression(rng: random.Random) -> str:
    a, b, c, d = (rng.randint(1, 60) for _ in range(4))
    s = a + b
    p = s * c
    return (
        f"Evaluate ({a} + {b}) * {c} - {d}.\n"
        f"Answer: {a} + {b} = {s}; {s} * {c} = {p}; {p} - {d} = {p - d}. The result is {p - d}."
    )


def _word_items(rng: random.Random) -> str:
    name, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    a, b = rng.randint(5, 90), rng.randint(1, 60)
    c = rng.randint(1, a + b)
    return (
        f"{name} has {a} {item}. {name} buys {b} more and gives {c} to {other}. "
        f"How many {item} does {name} have now?\n"
        f"Answer: {a} + {b} - {c} = {a + b - c}. {name} has {a + b - c} {item}."
    )


def _word_distance(rng: random.Random) -> str:
    speed, hours = rng.randint(20, 120), rng.randint(2, 12)
    return (
        f"A train travels at {speed} km per hour for {hours} hours. How far does it travel?\n"
        f"Answer: {speed} * {hours} = {speed * hours}. The train travels {speed * hours} km."
    )


def _word_change(rng: random.Random) -> str:
    name = rng.choice(_NAMES)
    price, count = rng.randint(2, 25), rng.randint(2, 9)
    cost = price * count
    paid = (cost // 10 + 1) * 10 + rng.choice([0, 10, 40])
    return (
        f"A pen costs {price} dollars. {name} buys {count} pens and pays with {paid} dollars. "
        f"How much change does {name} get?\n"
        f"Answer: {count} * {price} = {cost}; {paid} - {cost} = {paid - cost}. The change is {paid - cost} dollars."
    )


_PROBLEMS: list[Callable[[random.Random], str]] = [
    _arith,
    _division,
    _expression,
    _word_items,
    _word_distance,
    _word_change,
]


def math_documents(rng: random.Random, budget: int) -> list[str]:
    """Documents of 4 to 10 generated problems with worked answers, up to ``budget`` characters."""
    docs, total = [], 0
    while total < budget or len(docs) < MIN_DOCS:
        doc = "\n\n".join(rng.choice(_PROBLEMS)(rng) for _ in range(rng.randint(4, 10)))
        docs.append(doc)
        total += len(doc)
    return docs


def _summary(doc: str) -> str:
    return " ".join(doc.split("\n\n")[0].split())


def _source_lines(lines: list[str], node: ast.stmt, skip: ast.stmt | None = None) -> str:
    """Whole source lines of a top-level ``node`` (decorators included), optionally without ``skip``'s lines."""
    start = min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno])
    kept = lines[start - 1 : node.end_lineno]
    if skip is not None:
        del kept[skip.lineno - start : skip.end_lineno - start + 1]
    return "\n".join(kept)


def _public_functions(tree: ast.Module) -> Iterable[tuple[str, ast.FunctionDef]]:
    """``(qualified name, node)`` of public top-level functions and public methods of top-level classes."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for fn in node.body:
                if isinstance(fn, ast.FunctionDef) and not fn.name.startswith("_"):
                    yield f"{node.name}.{fn.name}", fn


def sft_examples(files: list[Path], rng: random.Random) -> list[dict]:
    """Instruction/input/output examples from documented functions and methods: write it, or explain it."""
    examples = []
    for path in files:
        parsed = _parse(path)
        if parsed is None:
            continue
        lines = parsed[0].splitlines()
        module = _module_name(path)
        for name, fn in _public_functions(parsed[1]):
            if len(fn.body) < 2 or fn.body[0].lineno == fn.lineno:  # one-line def: no separate docstring lines
                continue
            doc = ast.get_docstring(fn)
            code = _source_lines(lines, fn)
            if not doc or not 80 <= len(code) <= 1500 or len(_summary(doc)) < 20:
                continue
            kind = "method" if "." in name else "function"
            if rng.random() < 0.5:
                signature = f"{name}({ast.unparse(fn.args)})"
                instruction = f"Write the Python {kind} `{signature}` that does the following: {_summary(doc)}"
                examples.append({"instruction": instruction, "input": "", "output": textwrap.dedent(code)})
            else:
                instruction = f"Explain what this Python {kind} from the `{module}` module does."
                body = textwrap.dedent(_source_lines(lines, fn, skip=fn.body[0]))
                examples.append({"instruction": instruction, "input": body, "output": _summary(doc)})
    return examples


def fitting_examples(examples: list[dict], tokenizer_dir: Path, limit: int) -> tuple[list[dict], int]:
    """``limit`` examples that score at least ``SFT_MIN_SCORED`` response tokens, and the sequence length for that.

    Prompts are rendered with litgpt's ``SFT_PROMPT_STYLE`` as fine-tuning renders them. Examples whose
    prompt fits ``SFT_MAX_SEQ_LENGTH`` are taken first, in order; when too few fit (a very small
    vocabulary), the shortest others fill up and the returned sequence length grows to fit them all, so
    fine-tuning at that length masks no example fully.
    """
    from litgpt.prompts import PromptStyle
    from litgpt.tokenizer import Tokenizer

    tokenizer, style = Tokenizer(tokenizer_dir), PromptStyle.from_name(SFT_PROMPT_STYLE)
    lengths = [len(tokenizer.encode(style.apply(prompt=e["instruction"], **e))) for e in examples]
    budget = SFT_MAX_SEQ_LENGTH + 1 - SFT_MIN_SCORED
    chosen = [i for i, n in enumerate(lengths) if n <= budget][:limit]
    if len(chosen) < limit:
        rest = sorted((i for i, n in enumerate(lengths) if n > budget), key=lambda i: lengths[i])
        chosen += rest[: limit - len(chosen)]
    seq_len = max([SFT_MAX_SEQ_LENGTH] + [lengths[i] + SFT_MIN_SCORED - 1 for i in chosen])
    if seq_len > SFT_MAX_SEQ_LENGTH:
        print(f"demo corpus: SFT prompts need max_seq_length {seq_len} (not {SFT_MAX_SEQ_LENGTH}) with this tokenizer.")
    return [examples[i] for i in sorted(chosen)], seq_len


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def train_bpe_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Train a byte-level BPE tokenizer with ``<|endoftext|>`` as EOS; write a litgpt tokenizer dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "add_bos_token": False,
        "model_max_length": 2048,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------


def _split(docs: list[str], rng: random.Random, val_fraction: float) -> tuple[list[str], list[str]]:
    """Shuffle and hold out ``val_fraction`` of the documents (at least one)."""
    docs = list(docs)
    rng.shuffle(docs)
    n_val = max(1, round(len(docs) * val_fraction))
    return docs[n_val:], docs[:n_val]


def _write(docs: list[str], path: Path, spec: TokenizerSpec, label: str, seed: int) -> int:
    """Tokenise ``docs`` into the shard ``path``; return its token count."""
    digest = hashlib.sha256("\0".join(docs).encode("utf-8", "surrogatepass")).hexdigest()
    manifest = {
        "type": label.split("/")[0],
        "shard": path.name,
        "inputs": [{"path": f"demo:{label}", "kind": "generated", "documents": len(docs), "sha256": digest}],
        "text_key": None,
        "generator": {"name": "midtrain.demo.corpus", "version": DEMO_VERSION, "seed": seed},
    }
    if path.parent.name == VAL_DIR:
        manifest["split"] = "val"
    stats = tokenize_to_shard(docs, path, spec, manifest, chunk_tokens=CHUNK_TOKENS, desc=f"demo {label}")
    return stats.tokens


def _settings(seed: int, scale: float, vocab_size: int) -> dict:
    return {"version": DEMO_VERSION, "seed": seed, "scale": scale, "vocab_size": vocab_size}


def _existing(data_path: Path, settings: dict) -> dict | None:
    """The recorded build when ``data_path`` already holds this demo; None when it is empty or missing."""
    marker = data_path / DEMO_MARKER
    if marker.is_file():
        recorded = json.loads(marker.read_text())
        if recorded.get("settings") != settings:
            raise MidtrainError(
                f"{data_path} already holds a demo corpus built with {recorded.get('settings')}, not {settings}; "
                "use another data_path or delete it."
            )
        return recorded
    if data_path.exists() and (not data_path.is_dir() or any(data_path.iterdir())):
        raise MidtrainError(f"{data_path} exists and is not an empty directory or a demo corpus; choose a new path.")
    return None


def build_demo_corpus(data_path: Path, seed: int = 0, scale: float = 1.0, vocab_size: int = DEFAULT_VOCAB_SIZE) -> dict:
    """Build (or reuse) the demo corpus at ``data_path``; return what was built.

    Args:
        data_path: Directory to create (must be missing, empty, or an earlier build with the same settings).
        seed: Random seed; the same seed gives byte-identical output on the same Python install.
        scale: Multiplier on the amount of text per domain (1.0 is about 1M tokens; tests use less).
        vocab_size: BPE vocabulary size including ``<|endoftext|>``.

    Returns:
        A summary: settings, tokenizer dir, tokens per shard and validation set, SFT files and counts.
    """
    if scale <= 0:
        raise MidtrainError(f"scale must be positive, got {scale}.")
    data_path = Path(data_path).expanduser().resolve()
    settings = _settings(seed, scale, vocab_size)
    recorded = _existing(data_path, settings)
    if recorded is not None:
        return _with_paths(recorded, data_path)
    tmp = data_path.with_name(f".{data_path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        info = _build(tmp, settings)
        _write_marker(tmp, info)
        if data_path.exists():
            data_path.rmdir()  # empty (checked above)
        os.replace(tmp, data_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _with_paths(info, data_path)


def _write_marker(root: Path, info: dict) -> None:
    (root / DEMO_MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def _with_paths(info: dict, data_path: Path) -> dict:
    return {**info, "data_path": str(data_path), "tokenizer_dir": str(data_path / info["tokenizer"])}


def _domains(settings: dict) -> tuple[dict[str, list[str]], list[dict]]:
    """Raw documents per domain and the SFT examples."""
    rng = random.Random(settings["seed"])
    scale = settings["scale"]
    files = stdlib_files()
    rng.shuffle(files)
    third = len(files) // 3
    code_pool, prose_pool, sft_pool = files[:third], files[third : 2 * third], files[2 * third :]
    docs = {
        "code": code_documents(code_pool, int(CODE_CHARS * scale)),
        "main": prose_documents(prose_pool, int(PROSE_CHARS * scale)),
        "math": math_documents(rng, int(MATH_CHARS * scale)),
    }
    candidates = sft_examples(sft_pool, rng)
    rng.shuffle(candidates)
    return docs, candidates


def demo_documents(seed: int = 0, scale: float = 1.0) -> dict[str, list[str]]:
    """The demo's raw documents per domain (``main``, ``code``, ``math``), before the validation split."""
    return _domains(_settings(seed, scale, DEFAULT_VOCAB_SIZE))[0]


def _build(root: Path, settings: dict) -> dict:
    seed = settings["seed"]
    rng = random.Random(seed + 1)
    docs, sft = _domains(settings)
    splits = {domain: _split(d, rng, VAL_FRACTION) for domain, d in docs.items()}
    train_texts = [t for train, _ in splits.values() for t in train]
    tok_dir = train_bpe_tokenizer(train_texts, root / "tokenizer", settings["vocab_size"])
    # Manifests record the tokenizer relative to data_path: the build directory is renamed afterwards.
    spec = dataclasses.replace(load_tokenizer_spec(tok_dir), directory="tokenizer")
    shards = {}
    for domain, names in (("main", ["1", "2"]), ("code", ["c1", "c2"]), ("math", ["m1"])):
        train = splits[domain][0]
        for i, name in enumerate(names):
            shards[name] = _write(train[i :: len(names)], root / name, spec, f"{domain}/{name}", seed)
    val = {domain: _write(v, root / VAL_DIR / domain, spec, f"{domain}/val", seed) for domain, (_, v) in splits.items()}
    sft, sft_seq_len = fitting_examples(sft, root / "tokenizer", max(20, int(SFT_EXAMPLES * settings["scale"])))
    sft_files = _write_sft(sft, root / "sft", rng, sft_seq_len)
    return {
        "settings": settings,
        "tokenizer": "tokenizer",
        "tokenizer_fingerprint": spec.fingerprint,
        "shards": shards,
        "val": {domain: {"path": f"{VAL_DIR}/{domain}", "tokens": n} for domain, n in val.items()},
        "documents": {domain: len(d) for domain, d in docs.items()},
        "sft": sft_files,
    }


def _write_sft(examples: list[dict], out: Path, rng: random.Random, max_seq_length: int) -> dict:
    examples = list(examples)
    rng.shuffle(examples)
    n_val = max(1, round(len(examples) * SFT_VAL_FRACTION))
    out.mkdir(parents=True)
    (out / "code_sft.json").write_text(json.dumps(examples[n_val:], indent=1) + "\n")
    (out / "code_sft_val.json").write_text(json.dumps(examples[:n_val], indent=1) + "\n")
    return {
        "train": "sft/code_sft.json",
        "val": "sft/code_sft_val.json",
        "examples": len(examples) - n_val,
        "val_examples": n_val,
        "prompt_style": SFT_PROMPT_STYLE,
        "max_seq_length": max_seq_length,
        "min_scored_tokens": SFT_MIN_SCORED,
    }


def prepare_demo(data_path: Path, seed: int = 0) -> None:
    """Build the built-in demo corpus (no download): code, prose and math shards, tokenizer, SFT set.

    Args:
        data_path: Directory to create the corpus in (missing or empty; an earlier build with the same seed is reused).
        seed: Random seed; the same seed gives identical shards on the same Python install.
    """
    info = build_demo_corpus(data_path, seed=seed)
    print(f"midtrain prepare demo: corpus at {info['data_path']} (seed {seed})")
    print(f"  tokenizer: {info['tokenizer_dir']} (vocab {info['settings']['vocab_size']})")
    for name, tokens in info["shards"].items():
        print(f"  shard {name:>3}: {tokens:>9,} tokens")
    for domain, val in info["val"].items():
        print(f"  val/{domain}: {val['tokens']:,} tokens")
    sft = info["sft"]
    print(f"  code SFT: {sft['examples']} train / {sft['val_examples']} val examples in {sft['train']}, {sft['val']}")
