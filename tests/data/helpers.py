"""Shared by the data tests: the tiny tokenizer, small source files, and a datamodule factory."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from fulltune.data import FineTuneDataModule
from fulltune.models import load_tokenizer
from tests.conftest import compose_config


def tiny_tokenizer(cache: Path) -> Any:
    """The tiny model's byte-level BPE: chatml template, pad == eos == <|im_end|> (like SmolLM2)."""
    return load_tokenizer(compose_config(["model=tiny"], cache, cache).model)


def variant(tokenizer: Any, **changes: Any) -> Any:
    """A copy of the tokenizer with attributes changed (e.g. chat_template=None)."""
    tok = copy.deepcopy(tokenizer)
    for key, value in changes.items():
        setattr(tok, key, value)
    return tok


def write_jsonl(path: Path, rows: list[Any]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def alpaca_rows(n: int, start: int = 0) -> list[dict]:
    return [{"instruction": "Add one.", "input": f"{i} plus one", "output": str(i + 1)}
            for i in range(start, start + n)]


def text_rows(n: int, start: int = 0) -> list[dict]:
    return [{"text": " ".join(["the river"] * (1 + i % 7)) + f" number {i}"} for i in range(start, start + n)]


def datamodule(tokenizer: Any, cache: Path, task: list[dict], **kwargs: Any) -> FineTuneDataModule:
    return FineTuneDataModule(tokenizer, task=task, cache_dir=str(cache), **kwargs)
