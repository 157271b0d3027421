"""How close are two corpora? Word n-gram and token-distribution similarity, mixtures, proximity advantage.

Sources
    A SOURCE string is one of

    * a shard directory (holds a litdata ``index.json``): token IDs are read directly; the text
      needed for word n-grams is decoded with the tokenizer;
    * a ``data_path`` (a directory of shard folders): all its shards;
    * ``DATA_PATH:SELECTION``: the shards of one type (``corpus/:code``) or one shard ID
      (``corpus/:main/1``) under ``data_path``;
    * a ``.json`` (list of records) or ``.jsonl`` (one record per line) SFT file: a record's text is
      its ``text_key`` field, otherwise its ``instruction``, ``input`` and ``output`` joined by newlines
      (litgpt's / Alpaca's JSON format);
    * a directory of text files (searched recursively, hidden files skipped): one file = one document.

Sampling
    Every source is reduced to at most ``sample_docs`` documents chosen without replacement by
    ``numpy.random.default_rng(seed)``. Token shards have no document boundaries (litgpt streams
    them as one token stream), so their "documents" are the fixed windows of ``window_tokens``
    tokens that litdata's ``TokensLoader`` serves; the sample is a seeded choice of windows across
    all selected shards (uniform over windows, hence proportional to each shard's tokens). The same
    seed gives the same sample; every source is sampled with its own generator seeded by ``seed``.

Metrics (``compare``)
    * ``ngram_cosine``: cosine between the normalised word n-gram frequency vectors for ``n``; words
      are lower-cased runs of word characters or of punctuation (``\\w+|[^\\w\\s]+``), n-grams do not
      cross document boundaries. ``ngram_cosine_avg`` averages the cosine over n = 1..``max_n``.
    * ``token_cosine``, ``token_js``, ``vocab_overlap``: cosine and Jensen–Shannon divergence (base 2,
      so in [0, 1]) of the unigram token distributions, and the Jaccard index of the token sets.
      Text sources are encoded with the tokenizer (no BOS/EOS); without a tokenizer these are None.

Mixtures and proximity advantage
    With ``mixture="main:0.8,code:0.2"`` the single ``a`` source is a ``data_path`` and the names are
    its types or shard IDs. The mixture's distributions are the weighted sums of the components'
    normalised distributions (n-gram and token alike). Against the target ``b`` we report each
    component, the ``base`` corpus and the mixture, and the proximity advantage
    ``distance(base -> b) - distance(mixture -> b)`` with distance ``1 - cosine`` for n-grams and
    tokens and ``JS`` for ``token_js``. Positive = the mixture is closer to the target than the base.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from midtrain.data.mixture import parse_weights
from midtrain.data.shards import Shard, classify, discover_shards, load_shard, shard_type_table
from midtrain.errors import MidtrainError
from midtrain.rundir import has_tokenizer, to_plain
from midtrain.storage import is_remote, location, open_dataset

WORD_RE = re.compile(r"\w+|[^\w\s]+")
SFT_FIELDS = ("instruction", "input", "output")
METRICS = ("ngram_cosine", "ngram_cosine_avg", "token_cosine", "token_js", "vocab_overlap")
# metric -> its distance (0 = identical) for the proximity advantage
_DISTANCES = {
    "ngram_cosine": lambda v: 1.0 - v,
    "ngram_cosine_avg": lambda v: 1.0 - v,
    "token_cosine": lambda v: 1.0 - v,
    "token_js": lambda v: v,
}

Dist = dict[Hashable, float]


# ----------------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Source:
    """A resolved SOURCE string: ``kind`` is ``shards``, ``records`` (JSON/JSONL) or ``text`` (a directory)."""

    spec: str
    kind: str
    path: Path | str
    shards: tuple[Shard, ...] = ()


def resolve_source(spec: str, shard_types: dict[str, str] | None = None) -> Source:
    """Turn a SOURCE string into a :class:`Source` (see the module docstring for the accepted forms)."""
    if is_remote(spec):
        return _remote_source(spec, shard_types)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() in (".json", ".jsonl"):
            return Source(spec, "records", path)
        raise MidtrainError(
            f"Source {spec!r} is a file but not .json/.jsonl. A source is a shard directory, a data_path "
            "(optionally 'DATA_PATH:TYPE'), a .json/.jsonl SFT file or a directory of text files."
        )
    if path.is_dir():
        if (path / "index.json").is_file():
            found = classify(path.name, shard_type_table(shard_types)) or (path.name, "shard")
            return Source(spec, "shards", path, (load_shard(found[0], found[1], path),))
        if any((child / "index.json").is_file() for child in path.iterdir() if child.is_dir()):
            return Source(spec, "shards", path, tuple(discover_shards(path, shard_types)))
        return Source(spec, "text", path)
    root, sep, selection = spec.rpartition(":")
    if sep and root and Path(root).expanduser().is_dir():
        shards = discover_shards(Path(root).expanduser(), shard_types)
        return Source(spec, "shards", Path(root).expanduser(), tuple(select_shards(shards, selection, spec)))
    raise MidtrainError(
        f"Source {spec!r} does not exist. A source is a shard directory, a data_path, 'DATA_PATH:TYPE' "
        "(e.g. 'corpus/:code'), a .json/.jsonl SFT file or a directory of text files."
    )


def _remote_source(spec: str, shard_types: dict[str, str] | None) -> Source:
    """An ``s3://``/``gs://`` shard, data_path or ``DATA_PATH:TYPE`` (credentials from the environment)."""
    root, sep, selection = spec.rpartition(":")
    if sep and is_remote(root) and "/" not in selection:
        shards = discover_shards(root, shard_types)
        return Source(spec, "shards", location(root), tuple(select_shards(shards, selection, spec)))
    url = location(spec)
    try:
        name = str(url).rsplit("/", 1)[-1]
        found = classify(name, shard_type_table(shard_types)) or (name, "shard")
        return Source(spec, "shards", url, (load_shard(found[0], found[1], url),))
    except MidtrainError as err:
        if "has no index.json" not in str(err):
            raise
    return Source(spec, "shards", url, tuple(discover_shards(url, shard_types)))


def select_shards(shards: Sequence[Shard], selection: str, where: str) -> list[Shard]:
    """The shards of type ``selection``, or the single shard with ID ``selection``."""
    chosen = [s for s in shards if s.type == selection or s.id == selection]
    if not chosen:
        types = sorted({s.type for s in shards})
        raise MidtrainError(
            f"{where}: no shard of type or ID {selection!r}. Types present: {types}; "
            f"shard IDs: {[s.id for s in shards]}."
        )
    return chosen


# ---------------------------------------------------------------------------------------------- sampling
def _choose(total: int, k: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded sample of ``min(k, total)`` items out of ``total``."""
    if total <= k:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=k, replace=False))


def sample_windows(shards: Sequence[Shard], sample_docs: int, window_tokens: int, seed: int) -> list[np.ndarray]:
    """A seeded sample of ``window_tokens``-token windows (litdata ``TokensLoader`` items) across ``shards``."""
    counts = [s.samples(window_tokens) for s in shards]
    if sum(counts) == 0:
        raise MidtrainError(
            f"Shards {[s.id for s in shards]} hold no window of {window_tokens} tokens (largest chunk: "
            f"{max(max(s.chunk_dims) for s in shards)} tokens); pass a smaller window_tokens."
        )
    offsets = np.cumsum([0, *counts])
    picks = _choose(int(offsets[-1]), sample_docs, seed)
    windows: list[np.ndarray] = []
    for i, shard in enumerate(shards):
        local = picks[(picks >= offsets[i]) & (picks < offsets[i + 1])] - offsets[i]
        if local.size == 0:
            continue
        ds = open_dataset(shard.path, window_tokens)
        windows.extend(np.asarray(ds[int(j)], dtype=np.int64) for j in local)
    return windows


def _record_text(record: object, text_key: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise MidtrainError(f"{where}: records must be JSON objects or strings, got {type(record).__name__}.")
    if record.get(text_key) is not None:
        return str(record[text_key])
    parts = [str(record[k]) for k in SFT_FIELDS if record.get(k)]
    if not parts:
        raise MidtrainError(
            f"{where}: a record has neither {text_key!r} nor any of {list(SFT_FIELDS)}; its keys are "
            f"{sorted(record)}. Pass text_key=<field> to name the text field."
        )
    return "\n".join(parts)


def _read_records(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise MidtrainError(f"{path} is not valid {path.suffix.lstrip('.').upper()}: {e}") from e
    if not isinstance(data, list):
        raise MidtrainError(f"{path} must hold a JSON list of records, got {type(data).__name__}.")
    return data


def _text_files(root: Path) -> list[Path]:
    files = (p for p in sorted(root.rglob("*")) if p.is_file())
    return [p for p in files if not any(part.startswith(".") for part in p.relative_to(root).parts)]


def sample_texts(source: Source, sample_docs: int, seed: int, text_key: str = "text") -> list[str]:
    """A seeded sample of documents (as text) of a ``records`` or ``text`` source."""
    if source.kind == "records":
        records = _read_records(source.path)
        return [_record_text(records[i], text_key, str(source.path)) for i in _choose(len(records), sample_docs, seed)]
    files = _text_files(source.path)
    if not files:
        raise MidtrainError(f"Source {source.spec!r} is a directory without shards or text files.")
    texts = []
    for i in _choose(len(files), sample_docs, seed):
        try:
            texts.append(files[i].read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise MidtrainError(f"{files[i]} in text source {source.spec!r} is not UTF-8 text: {e}") from e
    return texts


# ---------------------------------------------------------------------------------------------- profiles
@dataclass
class Profile:
    """Normalised distributions of one (possibly mixed) source."""

    name: str
    docs: int
    words: int
    ngrams: dict[int, Dist]
    tokens: Dist | None = None
    token_count: int = 0
    components: dict[str, float] = field(default_factory=dict)


def words_of(text: str) -> list[str]:
    """Lower-cased words and punctuation runs."""
    return WORD_RE.findall(text.lower())


def normalise(counts: Counter) -> Dist:
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()} if total else {}


def count_ngrams(docs: Iterable[list[str]], max_n: int) -> dict[int, Counter]:
    """Word n-gram counts for n = 1..max_n, never crossing a document boundary."""
    counts = {k: Counter() for k in range(1, max_n + 1)}
    for words in docs:
        for k in counts:
            counts[k].update(zip(*(words[i:] for i in range(k))))
    return counts


def build_profile(name: str, texts: Sequence[str], token_docs: Sequence[np.ndarray] | None, max_n: int) -> Profile:
    """Profile of sampled documents: word n-grams from ``texts``, unigram tokens from ``token_docs``."""
    docs = [words_of(t) for t in texts]
    n_words = sum(len(d) for d in docs)
    if n_words == 0:
        raise MidtrainError(f"Source {name!r}: the sampled documents contain no words.")
    ngrams = {k: normalise(c) for k, c in count_ngrams(docs, max_n).items()}
    tokens, n_tokens = None, 0
    if token_docs is not None:
        flat = np.concatenate([np.asarray(d, dtype=np.int64) for d in token_docs]) if token_docs else np.zeros(0)
        ids, freq = np.unique(flat, return_counts=True)
        n_tokens = int(flat.size)
        tokens = {int(i): int(f) / n_tokens for i, f in zip(ids, freq)} if n_tokens else {}
    return Profile(name, len(texts), n_words, ngrams, tokens, n_tokens)


def mix_profiles(name: str, parts: Sequence[tuple[float, Profile]]) -> Profile:
    """Weighted mixture of normalised distributions (weights are normalised to sum to 1)."""
    total = sum(w for w, _ in parts)
    parts = [(w / total, p) for w, p in parts if w > 0]

    def mix(dists: Sequence[Dist]) -> Dist:
        out: dict[Hashable, float] = {}
        for (w, _), d in zip(parts, dists):
            for k, v in d.items():
                out[k] = out.get(k, 0.0) + w * v
        return out

    ngrams = {k: mix([p.ngrams[k] for _, p in parts]) for k in parts[0][1].ngrams}
    has_tokens = all(p.tokens is not None for _, p in parts)
    return Profile(
        name=name,
        docs=sum(p.docs for _, p in parts),
        words=sum(p.words for _, p in parts),
        ngrams=ngrams,
        tokens=mix([p.tokens for _, p in parts]) if has_tokens else None,
        token_count=sum(p.token_count for _, p in parts),
        components={p.name: w for w, p in parts},
    )


# ----------------------------------------------------------------------------------------------- metrics
def cosine(p: Dist, q: Dist) -> float:
    """Cosine similarity of two sparse vectors (0 when either is empty)."""
    if len(p) > len(q):
        p, q = q, p
    dot = sum(v * q.get(k, 0.0) for k, v in p.items())
    norm = math.sqrt(sum(v * v for v in p.values()) * sum(v * v for v in q.values()))
    return min(1.0, dot / norm) if norm else 0.0


def js_divergence(p: Dist, q: Dist) -> float:
    """Jensen–Shannon divergence in bits (0 = identical, 1 = disjoint supports)."""
    total = 0.0
    for k in p.keys() | q.keys():
        a, b = p.get(k, 0.0), q.get(k, 0.0)
        m = (a + b) / 2
        if a > 0:
            total += 0.5 * a * math.log2(a / m)
        if b > 0:
            total += 0.5 * b * math.log2(b / m)
    return min(1.0, max(0.0, total))


def jaccard(p: Dist, q: Dist) -> float:
    union = len(p.keys() | q.keys())
    return len(p.keys() & q.keys()) / union if union else 0.0


def compare(p: Profile, q: Profile, n: int, max_n: int) -> dict[str, float | None]:
    """All metrics between two profiles (token metrics are None when either lacks tokens)."""
    result: dict[str, float | None] = {
        "ngram_cosine": cosine(p.ngrams[n], q.ngrams[n]),
        "ngram_cosine_avg": sum(cosine(p.ngrams[k], q.ngrams[k]) for k in range(1, max_n + 1)) / max_n,
        "token_cosine": None,
        "token_js": None,
        "vocab_overlap": None,
    }
    if p.tokens is not None and q.tokens is not None:
        result.update(
            token_cosine=cosine(p.tokens, q.tokens),
            token_js=js_divergence(p.tokens, q.tokens),
            vocab_overlap=jaccard(p.tokens, q.tokens),
        )
    return result


def proximity_advantage(base: dict, mixed: dict) -> dict[str, float | None]:
    """``distance(base -> target) - distance(mixture -> target)`` per metric (positive = mixture closer)."""
    return {
        m: None if base[m] is None or mixed[m] is None else dist(base[m]) - dist(mixed[m])
        for m, dist in _DISTANCES.items()
    }


# ------------------------------------------------------------------------------------------------ runner
@dataclass
class _Profiler:
    """Samples and profiles sources, caching by name so that a source is read once."""

    tokenizer: object | None
    n: int
    max_n: int
    sample_docs: int
    window_tokens: int
    seed: int
    text_key: str
    cache: dict[str, Profile] = field(default_factory=dict)

    def profile(self, source: Source, name: str | None = None) -> Profile:
        name = name or source.spec
        if name not in self.cache:
            self.cache[name] = self._build(source, name)
        return self.cache[name]

    def _build(self, source: Source, name: str) -> Profile:
        if source.kind == "shards":
            if self.tokenizer is None:
                raise MidtrainError(
                    f"Source {name!r} is a token shard; its word n-grams need the tokenizer that wrote it. Pass "
                    "tokenizer_dir=DIR (a directory with tokenizer.json, e.g. the model checkpoint)."
                )
            windows = sample_windows(source.shards, self.sample_docs, self.window_tokens, self.seed)
            texts = [self.tokenizer.decode(_as_tensor(w)) for w in windows]
            return build_profile(name, texts, windows, max(self.n, self.max_n))
        texts = sample_texts(source, self.sample_docs, self.seed, self.text_key)
        tokens = None
        if self.tokenizer is not None:
            tokens = [self.tokenizer.encode(t, bos=False, eos=False).numpy() for t in texts]
        return build_profile(name, texts, tokens, max(self.n, self.max_n))


def _as_tensor(window: np.ndarray):
    import torch

    return torch.from_numpy(window)


def find_tokenizer_dir(sources: Sequence[Source]) -> Path | None:
    """``<data_path>/tokenizer`` next to the first shard source that has one."""
    for shard in (s for source in sources for s in source.shards if not is_remote(s.path)):
        candidate = shard.path.parent / "tokenizer"
        if has_tokenizer(candidate):
            print(f"similarity: using the tokenizer found next to the shards: {candidate}")
            return candidate
    return None


def load_tokenizer(tokenizer_dir: Path | None):
    """litgpt's tokenizer from ``tokenizer_dir`` (None when not given)."""
    from litgpt.tokenizer import Tokenizer

    if tokenizer_dir is None:
        return None
    path = Path(tokenizer_dir).expanduser()
    try:
        return Tokenizer(path)
    except (NotADirectoryError, NotImplementedError):
        raise MidtrainError(
            f"tokenizer_dir {path} is not a tokenizer directory; it must exist and hold tokenizer.json "
            "(or tokenizer.model)."
        ) from None


def _as_list(value: list[str] | str | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _check_settings(n: int, max_n: int, sample_docs: int, window_tokens: int) -> None:
    for name, value in (("n", n), ("max_n", max_n), ("sample_docs", sample_docs), ("window_tokens", window_tokens)):
        if value < 1:
            raise MidtrainError(f"{name} must be >= 1, got {value}.")


def _weights(value: str, field_name: str) -> dict[str, float]:
    return parse_weights(value if ":" in value else f"{value}:1", field_name)


def mixture_base(spec: str, base: str | None) -> tuple[str, str]:
    """Mixture mode's ``(data_path, base)``: ``DATA_PATH:TYPE`` names the data_path and the base (``main``)."""
    root, sep, selection = spec.rpartition(":")
    if Path(spec).expanduser().is_dir() or not (sep and root and Path(root).expanduser().is_dir()):
        return spec, base or "main"
    if base is not None and base != selection:
        raise MidtrainError(f"a={spec!r} names the base {selection!r} but base={base!r}; give one of them.")
    return root, selection


def _mixture_rows(profiler: _Profiler, source: Source, target: Profile, mixture: str, base: str) -> dict:
    single = len(source.shards) == 1 and source.shards[0].path == source.path
    if source.kind != "shards" or single or source.path != location(source.spec):
        raise MidtrainError(
            f"With mixture=..., a must be one data_path (a directory of shard folders, or DATA_PATH:BASE_TYPE); "
            f"got {source.spec!r}."
        )
    mix_w, base_w = _weights(mixture, "mixture"), _weights(base, "base")
    names = [k for k in dict.fromkeys([*mix_w, *base_w]) if mix_w.get(k, 0) > 0 or base_w.get(k, 0) > 0]
    parts = {}
    for name in names:
        shards = select_shards(source.shards, name, f"mixture component {name!r} in {source.spec}")
        parts[name] = profiler.profile(Source(f"{source.spec}:{name}", "shards", source.path, tuple(shards)))
    base_p = mix_profiles(f"base({_fmt(base_w)})", [(w, parts[k]) for k, w in base_w.items() if w > 0])
    mix_p = mix_profiles(f"mixture({_fmt(mix_w)})", [(w, parts[k]) for k, w in mix_w.items() if w > 0])
    rows = [_row(p, target, profiler) for p in (*parts.values(), base_p, mix_p)]
    return {
        "rows": rows,
        "mixture": mix_p.components,
        "base": base_p.components,
        "proximity_advantage": proximity_advantage(rows[-2], rows[-1]),
    }


def _row(p: Profile, q: Profile, profiler: _Profiler) -> dict:
    return {"a": p.name, "b": q.name, **compare(p, q, profiler.n, profiler.max_n)}


def _fmt(weights: dict[str, float]) -> str:
    return ",".join(f"{k}:{v:g}" for k, v in weights.items())


def similarity(
    a: list[str] | str,
    b: list[str] | str | None = None,
    mixture: str | None = None,
    base: str | None = None,
    tokenizer_dir: Path | None = None,
    n: int = 2,
    max_n: int = 4,
    sample_docs: int = 2000,
    window_tokens: int = 512,
    seed: int = 0,
    text_key: str = "text",
    shard_types: dict[str, str] | None = None,
    out: Path | None = None,
    heatmap: Path | None = None,
) -> dict:
    """Word n-gram and token-distribution similarity between corpora, and a mixture's proximity advantage.

    Three modes: ``a`` vs ``b`` (every pair when either is a list); matrix (``a`` a list of at least
    two sources, no ``b``: all pairs, optional ``heatmap``); mixture (``mixture`` set: ``a`` is a
    data_path, ``b`` the target; reports components, base, mixture and the proximity advantage).

    Args:
        a: SOURCE or list of SOURCEs: a shard directory, a data_path, ``DATA_PATH:TYPE`` (or
            ``DATA_PATH:SHARD_ID``), a .json/.jsonl SFT file, or a directory of text files.
        b: SOURCE(s) to compare against (the target in mixture mode). Leave unset for matrix mode.
        mixture: Weights over the types (or shard IDs) of the data_path ``a``, e.g. ``main:0.8,code:0.2``;
            ``a`` may then be ``DATA_PATH:TYPE`` (``data/demo:main``): the data_path and the base.
        base: The reference corpus for the proximity advantage: a type or weights like ``mixture``
            (default: the ``:TYPE`` of ``a``, else ``main``).
        tokenizer_dir: Directory with ``tokenizer.json``; needed to decode token shards and for token metrics.
            Default: ``<data_path>/tokenizer`` when it exists, else token metrics of text sources are skipped.
        n: The n of the reported word n-gram cosine.
        max_n: ``ngram_cosine_avg`` averages the cosine over n = 1..max_n.
        sample_docs: Documents (token shards: windows) sampled per source.
        window_tokens: Length of the token windows sampled from token shards.
        seed: Seed of the document sample; the same seed gives the same sample.
        text_key: Text field of JSON/JSONL records (falls back to instruction + input + output).
        shard_types: Extra shard types for data_path sources, e.g. ``{pubmed: pm}``.
        out: Write results to this ``.json`` (everything) or ``.csv`` (one row per compared pair) file.
        heatmap: Matrix mode: write a heatmap PNG of the pairwise metrics here.

    Returns:
        A dict with ``settings``, ``rows`` (one per compared pair), and ``matrix`` or
        ``proximity_advantage`` depending on the mode.
    """
    _check_settings(n, max_n, sample_docs, window_tokens)
    a_list, b_list = _as_list(a), _as_list(b)
    if not a_list:
        raise MidtrainError("similarity needs at least one source in a.")
    if out is not None and Path(out).suffix.lower() not in (".json", ".csv"):
        raise MidtrainError(f"out must end in .json or .csv, got {out}.")
    if not b_list and mixture is None and len(a_list) < 2:
        raise MidtrainError("Give b to compare a against, or at least two sources in a for a matrix.")
    if heatmap is not None and (b_list or mixture is not None):
        raise MidtrainError("heatmap is drawn in matrix mode only: give several sources in a and no b or mixture.")
    if mixture is not None and len(a_list) == 1:
        a_list[0], base = mixture_base(a_list[0], base)
    sources = {spec: resolve_source(spec, shard_types) for spec in [*a_list, *b_list]}
    if tokenizer_dir is None:
        tokenizer_dir = find_tokenizer_dir(list(sources.values()))
    profiler = _Profiler(load_tokenizer(tokenizer_dir), n, max_n, sample_docs, window_tokens, seed, text_key)
    settings = {
        "n": n,
        "max_n": max_n,
        "sample_docs": sample_docs,
        "window_tokens": window_tokens,
        "seed": seed,
        "tokenizer_dir": None if tokenizer_dir is None else str(tokenizer_dir),
    }
    result: dict = {"settings": settings}
    if mixture is not None:
        if len(a_list) != 1 or len(b_list) != 1:
            raise MidtrainError("With mixture=..., give exactly one a (the data_path) and one b (the target).")
        target = profiler.profile(sources[b_list[0]])
        result.update(mode="mixture", **_mixture_rows(profiler, sources[a_list[0]], target, mixture, base))
    elif b_list:
        result.update(
            mode="pairs",
            rows=[
                _row(profiler.profile(sources[x]), profiler.profile(sources[y]), profiler)
                for x in a_list
                for y in b_list
            ],
        )
    else:
        result.update(mode="matrix", **_matrix(profiler, [sources[s] for s in a_list]))
    result["sources"] = {
        p.name: {"docs": p.docs, "words": p.words, "tokens": p.token_count} for p in profiler.cache.values()
    }
    print(render(result))
    if heatmap is not None:
        result["heatmap"] = str(write_heatmap(result["matrix"], Path(heatmap)))
    if out is not None:
        write_results(Path(out), result, result["rows"])
    return result


def _matrix(profiler: _Profiler, sources: Sequence[Source]) -> dict:
    profiles = [profiler.profile(s) for s in sources]
    k = len(profiles)
    cells = [[compare(p, q, profiler.n, profiler.max_n) for q in profiles] for p in profiles]
    matrix = {"names": [p.name for p in profiles]}
    for m in METRICS:
        if cells[0][0][m] is not None:
            matrix[m] = [[cells[i][j][m] for j in range(k)] for i in range(k)]
    rows = [{"a": profiles[i].name, "b": profiles[j].name, **cells[i][j]} for i in range(k) for j in range(i + 1, k)]
    return {"rows": rows, "matrix": matrix}


# ------------------------------------------------------------------------------------------------ output
def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width text table; floats with 4 decimals, None as '-'."""

    def cell(v: object) -> str:
        if v is None:
            return "-"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in body]
    return "\n".join(lines)


def render(result: dict) -> str:
    """The terminal report of a :func:`similarity` result."""
    s = result["settings"]
    headers = ["a", "b", f"ngram{s['n']}_cos", f"ngram1-{s['max_n']}_cos", "tok_cos", "tok_js", "vocab_overlap"]
    rows = [[r["a"], r["b"], *(r[m] for m in METRICS)] for r in result["rows"]]
    text = [format_table(headers, rows)]
    if "proximity_advantage" in result:
        adv = result["proximity_advantage"]
        text.append("proximity advantage = distance(base -> b) - distance(mixture -> b)  (> 0: mixture is closer)")
        text.append(format_table(list(adv), [list(adv.values())]))
    if s["tokenizer_dir"] is None:
        text.append("token metrics skipped: no tokenizer (pass tokenizer_dir).")
    return "\n".join(text)


def write_results(out: Path, payload: dict, rows: Sequence[dict]) -> Path:
    """Write ``payload`` as JSON (non-finite floats become null) or ``rows`` as CSV, by ``out``'s suffix."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".json":
        out.write_text(json.dumps(to_plain(payload, finite=True), indent=2) + "\n")
    elif out.suffix.lower() == ".csv":
        fieldnames = list(dict.fromkeys(k for r in rows for k in r))
        with out.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise MidtrainError(f"Output file {out} must end in .json or .csv.")
    print(f"wrote {out}")
    return out


def write_heatmap(matrix: dict, path: Path) -> Path:
    """One heatmap per metric of a pairwise matrix, as a PNG."""
    from matplotlib.figure import Figure

    names = matrix["names"]
    metrics = [m for m in METRICS if m in matrix]
    size = max(3.0, 0.6 * len(names) + 2)
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(size * cols, size * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes[len(metrics) :]:
        ax.set_axis_off()
    for ax, m in zip(axes, metrics):
        values = np.array(matrix[m], dtype=float)
        lower_is_closer = m == "token_js"  # dark = far in every panel
        image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis_r" if lower_is_closer else "viridis")
        ax.set_title(m + (" (lower = closer)" if lower_is_closer else ""))
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        for (i, j), v in np.ndenumerate(values):
            dark = (v > 0.5) if lower_is_closer else (v < 0.5)
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if dark else "k")
        fig.colorbar(image, ax=ax, shrink=0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
    return path
