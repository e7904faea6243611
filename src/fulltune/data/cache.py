"""Tokenize a source split once (in `num_proc` processes) and keep it on disk, memory-mapped.

The cache key hashes everything the tokens depend on: the tokenizer (vocabulary, special tokens, chat
template), the file (path, size, modification time) or hub dataset name/split, the source settings and
the global settings (max_length, overlong, train_on_prompt, on_bad_row). A second run with the same
inputs opens the arrays without tokenizing; any change tokenizes again into a new directory.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from fulltune.atomic import publish_dir

from .formats import Renderer, encode_batch

CACHE_VERSION = 1  # bump when rendering or encoding changes what a cached example contains
CHUNK_ROWS = 1000
ARRAYS = ("tokens", "mask", "offsets", "completion_start")


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


@dataclass
class TokenStore:
    """A source split's examples: flat token ids and label mask, with per-example offsets."""

    path: Path
    tokens: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray
    completion_start: np.ndarray
    meta: dict

    @classmethod
    def open(cls, path: Path) -> TokenStore:
        arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
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

    @cached_property
    def n_labels(self) -> np.ndarray:
        """Label tokens per example (what the loss sums over)."""
        return np.add.reduceat(self.mask.astype(np.int64), self.offsets[:-1]) if len(self) else np.zeros(0)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.tokens[a:b], self.mask[a:b]


_WORKER: tuple[Renderer, Any] | None = None


def _encode_chunk(rows: list[dict], renderer: Renderer | None = None, tokenizer: Any = None) -> tuple:
    renderer, tokenizer = (renderer, tokenizer) if renderer is not None else _WORKER
    encoded = encode_batch([renderer(r) for r in rows], tokenizer)
    lengths = np.array([len(e.ids) for e in encoded], dtype=np.int64)
    tokens = np.fromiter((t for e in encoded for t in e.ids), dtype=np.int32, count=int(lengths.sum()))
    mask = np.fromiter((m for e in encoded for m in e.mask), dtype=np.uint8, count=int(lengths.sum()))
    starts = np.array([e.completion_start for e in encoded], dtype=np.int32)
    return tokens, mask, lengths, starts


def encode_rows(rows: list[dict], renderer: Renderer, tokenizer: Any, num_proc: int) -> tuple:
    """Render and tokenize rows, in `num_proc` forked processes when there is more than one chunk."""
    global _WORKER
    chunks = [rows[i: i + CHUNK_ROWS] for i in range(0, len(rows), CHUNK_ROWS)]
    if num_proc > 1 and len(chunks) > 1:
        _WORKER = (renderer, tokenizer)  # inherited by the forked workers, never pickled
        try:
            with mp.get_context("fork").Pool(min(num_proc, len(chunks))) as pool:
                parts = pool.map(_encode_chunk, chunks)
        finally:
            _WORKER = None
    else:
        parts = [_encode_chunk(c, renderer, tokenizer) for c in chunks]
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(4))


def build_store(target: Path, rows: list[dict], renderer: Renderer, tokenizer: Any, *, max_length: int,
                overlong: str, num_proc: int, meta: dict, keep_answers: bool) -> TokenStore:
    """Tokenize, apply the length policy, and write the store atomically (ranks may race: first wins)."""
    tokens, mask, lengths, starts = encode_rows(rows, renderer, tokenizer, num_proc)
    over = lengths > max_length
    cut = np.minimum(lengths, max_length) if overlong == "truncate" else lengths
    position = np.arange(len(tokens)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    in_cut = position < np.repeat(cut, lengths)  # truncation: labels past the cut are gone
    label_counts = np.bincount(np.repeat(np.arange(len(rows)), lengths), weights=mask * in_cut,
                               minlength=len(rows))
    keep = ~over if overlong == "drop" else np.ones(len(rows), dtype=bool)
    no_labels = keep & (label_counts == 0)  # e.g. a prompt longer than max_length
    keep &= ~no_labels
    index = np.flatnonzero(keep)
    keep_token = in_cut & np.repeat(keep, lengths)
    meta = {**meta, "examples": int(len(index)), "truncated": int(over.sum()) if overlong == "truncate" else 0,
            "dropped_overlong": int(over.sum()) if overlong == "drop" else 0,
            "dropped_no_labels": int(no_labels.sum())}
    if keep_answers:
        meta["answers"] = [renderer(rows[i]).answer for i in index]
    arrays = {"tokens": tokens[keep_token], "mask": mask[keep_token],
              "offsets": np.concatenate([[0], np.cumsum(cut[index])]).astype(np.int64),
              "completion_start": np.minimum(starts[index], cut[index]).astype(np.int32)}
    with publish_dir(target) as tmp:  # another rank may write the same store at once: first one wins
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array)
        (tmp / "meta.json").write_text(json.dumps(meta))
    return TokenStore.open(target)
