"""Tokenize a source split once (in `num_proc` processes) and keep it on disk, memory-mapped.

Rows stream in and token arrays stream out, a chunk of rows at a time (`CHUNK_ROWS` rows or
`CHUNK_CHARS` characters): memory is set by the chunk, never by the corpus.

The cache key hashes everything the tokens depend on: the tokenizer (vocabulary, special tokens, chat
template), the file (path, size, modification time) or hub dataset name/split, the source settings and
the global settings (max_length, overlong, train_on_prompt, on_bad_row). A second run with the same
inputs opens the arrays without tokenizing; any change tokenizes again into a new directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from fulltune.atomic import publish_dir

from .formats import Renderer, encode_batch

log = logging.getLogger(__name__)
CACHE_VERSION = 4  # bump when rendering or encoding changes what a cached example contains
CHUNK_ROWS = 1000
CHUNK_CHARS = 4_000_000
DTYPES = {"tokens": np.int32, "mask": np.uint8, "offsets": np.int64, "completion_start": np.int32, "n_labels": np.int32}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about the tokenizer that changes token ids."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = {k: str(v) for k, v in tokenizer.special_tokens_map.items()}
    h.update(json.dumps([type(tokenizer).__name__, special, str(getattr(tokenizer, "chat_template", None))],
                        sort_keys=True).encode())
    return h.hexdigest()[:16]


def file_fingerprint(path: str) -> list:
    """Identity of the input: a local file's path/size/mtime, or the hub name."""
    if os.path.exists(path):
        st = os.stat(path)
        return [os.path.abspath(path), st.st_size, st.st_mtime_ns]
    return [path]


def cache_key(parts: dict) -> str:
    text = json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _open_array(path: Path, dtype: type) -> np.ndarray:
    """A raw array file, memory-mapped (numpy cannot map an empty file)."""
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)


@dataclass
class TokenStore:
    """A source split's examples: flat token ids and label mask, with per-example offsets."""

    path: Path
    tokens: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray
    completion_start: np.ndarray
    n_labels: np.ndarray  # label tokens per example (what the loss sums over), counted when written
    meta: dict

    @classmethod
    def open(cls, path: Path) -> TokenStore:
        arrays = {name: _open_array(path / f"{name}.bin", dtype) for name, dtype in DTYPES.items()}
        return cls(path, meta=json.loads((path / "meta.json").read_text()), **arrays)

    def __getstate__(self) -> dict:  # worker processes reopen the memory maps instead of copying arrays
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(TokenStore.open(state["path"]).__dict__)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @cached_property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.tokens[a:b], self.mask[a:b]


_WORKER: tuple[Renderer, Any] | None = None


def _encode_chunk(rows: list[dict], renderer: Renderer | None = None, tokenizer: Any = None) -> tuple:
    renderer, tokenizer = (renderer, tokenizer) if renderer is not None else _WORKER
    rendered = [renderer(r) for r in rows]
    encoded = encode_batch(rendered, tokenizer)
    lengths = np.array([len(e.ids) for e in encoded], dtype=np.int64)
    tokens = np.fromiter((t for e in encoded for t in e.ids), dtype=np.int32, count=int(lengths.sum()))
    mask = np.fromiter((m for e in encoded for m in e.mask), dtype=np.uint8, count=int(lengths.sum()))
    starts = np.array([e.completion_start for e in encoded], dtype=np.int32)
    return tokens, mask, lengths, starts, [r.answer for r in rendered]


def row_chunks(rows: Iterable[dict]) -> Iterator[list[dict]]:
    """Consecutive rows, CHUNK_ROWS at a time or fewer when their text passes CHUNK_CHARS: the unit
    that is tokenized at once, so it (not the corpus) sets the peak memory."""
    chunk: list[dict] = []
    chars = 0
    for row in rows:
        chunk.append(row)
        chars += len(row.get("text") or "")
        if len(chunk) >= CHUNK_ROWS or chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def encode_chunks(chunks: Iterable[list[dict]], renderer: Renderer, tokenizer: Any, num_proc: int) -> Iterator[tuple]:
    """Render and tokenize chunks in order, in `num_proc` forked processes with at most two chunks
    each in flight (so reading never runs ahead of tokenizing)."""
    global _WORKER
    if num_proc == 1:
        for chunk in chunks:
            yield _encode_chunk(chunk, renderer, tokenizer)
        return
    _WORKER = (renderer, tokenizer)  # inherited by the forked workers, never pickled
    try:
        with mp.get_context("fork").Pool(num_proc) as pool:
            pending: deque = deque()
            for chunk in chunks:
                pending.append(pool.apply_async(_encode_chunk, (chunk,)))
                if len(pending) >= 2 * num_proc:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
    finally:
        _WORKER = None


class _StoreWriter:
    """Applies the length policy to each encoded document and appends the examples it gives to the
    store's raw arrays on disk, counting what it did.

    chunk: a document longer than max_length becomes consecutive max_length windows (the last one
    shorter); concat: documents run on into one stream (EOS between them) cut into full windows;
    truncate: the first max_length tokens; drop: the document is left out. A window's first token is
    never a label (nothing before it in the window predicts it). `take_tokens` stops at exactly that
    many tokens."""

    def __init__(self, directory: Path, max_length: int, overlong: str, concat: bool, take_tokens: int | None,
                 keep_answers: bool) -> None:
        self.files = {name: open(directory / f"{name}.bin", "wb") for name in DTYPES}  # noqa: SIM115 (close())
        self.files["offsets"].write(np.zeros(1, np.int64).tobytes())
        self.max_length, self.overlong, self.concat, self.take_tokens = max_length, overlong, concat, take_tokens
        self.answers: list | None = [] if keep_answers else None
        self.counts = dict.fromkeys(("documents", "examples", "tokens", "truncated", "chunked", "dropped_overlong",
                                     "dropped_no_labels"), 0)
        self.carry = (np.zeros(0, np.int32), np.zeros(0, np.uint8))  # concat: the start of the next window

    @property
    def full(self) -> bool:
        return self.take_tokens is not None and self.counts["tokens"] >= self.take_tokens

    def add(self, tokens: np.ndarray, mask: np.ndarray, lengths: np.ndarray, starts: np.ndarray,
            answers: list) -> None:
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        for d in range(len(lengths)):
            if self.full:
                return
            ids, labels = tokens[bounds[d]: bounds[d + 1]], mask[bounds[d]: bounds[d + 1]]
            self.counts["documents"] += 1
            if self.concat:
                self._run_on(ids, labels)
                continue
            n, width = len(ids), self.max_length
            if n > width and self.overlong == "drop":
                self.counts["dropped_overlong"] += 1
                continue
            self.counts["truncated" if self.overlong == "truncate" else "chunked"] += n > width
            ends = [width] if self.overlong == "truncate" and n > width else range(width, n + width, width)
            for a, b in ((e - width, min(e, n)) for e in ends):
                self._write(ids[a:b], labels[a:b], int(min(starts[d], b)) if a == 0 else 0, answers[d])

    def _run_on(self, ids: np.ndarray, labels: np.ndarray) -> None:
        ids, labels = np.concatenate([self.carry[0], ids]), np.concatenate([self.carry[1], labels])
        full = len(ids) // self.max_length * self.max_length
        for a in range(0, full, self.max_length):
            self._write(ids[a: a + self.max_length], labels[a: a + self.max_length], 0, None)
        self.carry = ids[full:], labels[full:]

    def _write(self, ids: np.ndarray, labels: np.ndarray, completion_start: int, answer: str | None) -> None:
        if self.take_tokens is not None:
            room = self.take_tokens - self.counts["tokens"]
            ids, labels = ids[:room], labels[:room]
        labels = labels.copy()
        labels[:1] = 0
        if not labels.any():  # e.g. a prompt longer than max_length, or a one-token tail
            self.counts["dropped_no_labels"] += 1
            return
        self.counts["examples"] += 1
        self.counts["tokens"] += len(ids)
        self.files["tokens"].write(ids.astype(np.int32).tobytes())
        self.files["mask"].write(labels.astype(np.uint8).tobytes())
        self.files["offsets"].write(np.array([self.counts["tokens"]], np.int64).tobytes())
        self.files["completion_start"].write(np.array([min(completion_start, len(ids))], np.int32).tobytes())
        self.files["n_labels"].write(np.array([labels.sum()], np.int32).tobytes())
        if self.answers is not None:
            self.answers.append(answer)

    def close(self) -> dict:
        """Write what concat still holds and close the files: the counts for the store's meta."""
        if self.concat and len(self.carry[0]) and not self.full:
            self._write(*self.carry, 0, None)
        for f in self.files.values():
            f.close()
        return {**self.counts, **({"answers": self.answers} if self.answers is not None else {})}


@contextmanager
def build_lock(target: Path) -> Iterator[None]:
    """One builder per store: every other process that needs it (the other ranks of a node, or of
    any node sharing the cache) blocks here, with no timeout however long tokenizing takes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_store(target: Path, rows: Iterable[dict], renderer: Renderer, tokenizer: Any, *, max_length: int,
                overlong: str, concat: bool = False, take_tokens: int | None = None, num_proc: int = 1,
                keep_answers: bool = False, finish: Callable[[], dict] = dict, label: str = "") -> TokenStore:
    """Stream `rows` through the tokenizer into the store at `target`, chunk by chunk; `finish()`,
    called once the rows are consumed, may raise (bad rows) or add to the meta; `label` names the
    source in the log. Written atomically;
    a process that finds another building the same store waits and opens its result."""
    with build_lock(target):
        if (target / "meta.json").exists():
            return TokenStore.open(target)
        log.info("tokenizing %s into %s", label, target)
        with publish_dir(target) as tmp:
            writer = _StoreWriter(tmp, max_length, overlong, concat, take_tokens, keep_answers)
            try:
                for part in encode_chunks(row_chunks(rows), renderer, tokenizer, num_proc):
                    writer.add(*part)
                    if writer.full:
                        break
            finally:
                counts = writer.close()
            meta = {**finish(), **counts}
            meta["rows"] = meta["documents"] + meta.get("bad_rows", 0)
            (tmp / "meta.json").write_text(json.dumps(meta))
    return TokenStore.open(target)
