"""Batch tokenisation for ``midtrain prepare``: litgpt's token IDs, encoded fast.

Token IDs are exactly those of litgpt's ``Tokenizer.encode(text, eos=True)`` (BOS when the
tokenizer's config asks for it), but documents are encoded in batches through the Rust
``tokenizers`` library (or sentencepiece), optionally in parallel worker processes.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

import numpy as np

from midtrain.errors import MidtrainError
from midtrain.rundir import tokenizer_fingerprint

BATCH_DOCS = 128
BATCH_CHARS = 1 << 18


@dataclass(frozen=True)
class TokenizerSpec:
    """What a worker needs to reproduce litgpt's ``Tokenizer.encode(text, eos=True)`` (picklable)."""

    directory: str
    backend: str  # "huggingface" | "sentencepiece"
    model_file: str
    use_bos: bool
    bos_id: int | None
    eos_id: int
    vocab_size: int  # including added tokens: every ID is below it
    fingerprint: str


def load_tokenizer_spec(tokenizer_dir: Path) -> TokenizerSpec:
    """Resolve BOS/EOS handling with litgpt's own ``Tokenizer`` (so semantics match training)."""
    from litgpt.tokenizer import Tokenizer

    tokenizer_dir = Path(tokenizer_dir).expanduser()
    if not tokenizer_dir.is_dir():
        raise MidtrainError(f"tokenizer_dir {tokenizer_dir} is not a directory; point it at a litgpt checkpoint dir.")
    try:
        tok = Tokenizer(tokenizer_dir)
    except NotImplementedError as e:
        raise MidtrainError(
            f"tokenizer_dir {tokenizer_dir} holds neither tokenizer.json nor tokenizer.model; point it at a litgpt "
            "checkpoint (or tokenizer) directory."
        ) from e
    if tok.eos_id is None:
        raise MidtrainError(
            f'The tokenizer in {tokenizer_dir} defines no EOS token; add "eos_token" to its tokenizer_config.json '
            "(prepare appends EOS to every document)."
        )
    if tok.use_bos and tok.bos_id is None:
        raise MidtrainError(f"The tokenizer in {tokenizer_dir} asks for BOS (add_bos_token) but defines no bos_token.")
    if tok.backend == "huggingface":
        model_file, vocab = tokenizer_dir / "tokenizer.json", tok.processor.get_vocab_size(with_added_tokens=True)
    else:
        model_file, vocab = tokenizer_dir / "tokenizer.model", tok.processor.vocab_size()
    return TokenizerSpec(
        directory=str(tokenizer_dir.resolve()),
        backend=tok.backend,
        model_file=str(model_file.resolve()),
        use_bos=bool(tok.use_bos),
        bos_id=tok.bos_id,
        eos_id=int(tok.eos_id),
        vocab_size=int(max(vocab, tok.eos_id + 1, (tok.bos_id or 0) + 1)),
        fingerprint=tokenizer_fingerprint(tokenizer_dir),
    )


def finish_ids(ids: list[int], use_bos: bool, bos_id: int | None, eos_id: int) -> tuple[list[int], bool]:
    """Apply litgpt ``Tokenizer.encode(..., eos=True)``'s BOS/EOS rules to raw processor IDs.

    Returns the IDs and whether litgpt's rule *dropped* the EOS: when the text itself already
    encodes to a trailing EOS, litgpt removes it instead of keeping one. Mirrored on purpose (the
    IDs must equal litgpt's) and counted, so the summary can report it.
    """
    if use_bos:
        if not ids or ids[0] != bos_id:
            ids = [bos_id, *ids]
    elif ids and ids[0] == bos_id:
        ids = ids[1:]
    if not ids or ids[-1] != eos_id:
        ids.append(eos_id)
        return ids, False
    return ids[:-1], True


@dataclass
class EncodedBatch:
    """A batch of documents as one flat token array plus per-document lengths."""

    tokens: np.ndarray
    lengths: np.ndarray
    val_mask: np.ndarray | None
    eos_dropped: int


class BatchEncoder:
    """Batch-encode texts with the raw tokenizer backend, then apply litgpt's BOS/EOS rules."""

    def __init__(self, spec: TokenizerSpec):
        self.spec = spec
        if spec.backend == "huggingface":
            from tokenizers import Tokenizer as HFTokenizer

            tok = HFTokenizer.from_file(spec.model_file)
            if tok.padding is not None and tok.padding.get("length") is None:
                tok.no_padding()  # batch-longest padding is a no-op for one text; keep batches identical
            encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # fast: same IDs, no offsets
            self._encode = lambda texts: [e.ids for e in encode(texts)]
        elif spec.backend == "sentencepiece":
            from sentencepiece import SentencePieceProcessor

            sp = SentencePieceProcessor(model_file=spec.model_file)
            self._encode = lambda texts: sp.encode(list(texts))
        else:
            raise MidtrainError(f"Unsupported tokenizer backend {spec.backend!r}.")
        self._dtype = np.uint16 if spec.vocab_size <= 65535 else np.int32

    def encode(self, texts: list[str], val_fraction: float | None = None) -> EncodedBatch:
        """Encode ``texts``; with ``val_fraction`` also mark the documents held out for validation."""
        flat: list[int] = []
        lengths = np.empty(len(texts), dtype=np.int64)
        dropped = 0
        s = self.spec
        for i, ids in enumerate(self._encode(texts)):
            ids, lost = finish_ids(ids, s.use_bos, s.bos_id, s.eos_id)
            dropped += lost
            flat.extend(ids)
            lengths[i] = len(ids)
        mask = None if val_fraction is None else np.array([in_validation(t, val_fraction) for t in texts], bool)
        return EncodedBatch(np.array(flat, dtype=self._dtype), lengths, mask, dropped)


def in_validation(text: str, fraction: float) -> bool:
    """Stable per-document split: a hash of the text, so duplicates land on the same side."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
    return h < fraction * 2.0**64


_WORKER_ENCODER: BatchEncoder | None = None


def _init_worker(spec: TokenizerSpec) -> None:
    global _WORKER_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the worker processes
    _WORKER_ENCODER = BatchEncoder(spec)


def _encode_in_worker(texts: list[str], val_fraction: float | None) -> EncodedBatch:
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER.encode(texts, val_fraction)


def batched(texts: Iterable[str], max_docs: int = BATCH_DOCS, max_chars: int = BATCH_CHARS) -> Iterator[list[str]]:
    """Group texts into batches of at most ``max_docs`` documents or about ``max_chars`` characters."""
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def encode_batches(
    batches: Iterable[list[str]], spec: TokenizerSpec, num_workers: int, val_fraction: float | None = None
) -> Iterator[EncodedBatch]:
    """Encode batches in input order: in this process (``num_workers`` 0) or in worker processes.

    At most ``2 * num_workers`` batches are in flight, so memory stays bounded on huge inputs.
    """
    if num_workers <= 0:
        encoder = BatchEncoder(spec)
        for batch in batches:
            yield encoder.encode(batch, val_fraction)
        return
    with _env(TOKENIZERS_PARALLELISM="false"), _pool(num_workers, spec) as pool:
        pending: deque[Future] = deque()
        try:
            for batch in batches:
                pending.append(pool.submit(_encode_in_worker, batch, val_fraction))
                if len(pending) >= 2 * num_workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


def _pool(num_workers: int, spec: TokenizerSpec) -> ProcessPoolExecutor:
    """Worker pool: forked on Linux, spawned elsewhere.

    Forked workers start instantly; spawned ones re-import the caller's main module (for the CLI that
    means litgpt and Lightning: seconds per worker).
    """
    method = "fork" if sys.platform == "linux" and "fork" in get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(num_workers, mp_context=get_context(method), initializer=_init_worker, initargs=(spec,))


@contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set environment variables (inherited by forked workers) for the duration of the block."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def default_num_workers() -> int:
    """Usable CPU cores of this process."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
