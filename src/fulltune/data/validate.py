"""Fail fast: read every row of a source and check it against its format before anything is tokenized.

A bad row gives one error that names the file, the line (or row), the field and what was expected:

    data/train.jsonl:12: field 'output': expected a non-empty string, got null

`on_bad_row: stop` (default) raises `DataError` listing the first problems and their count;
`on_bad_row: skip` drops bad rows and counts them in `dm.stats`.
"""

from __future__ import annotations

import csv
import difflib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .formats import CHAT_TEMPLATES, FORMATS, PLAIN_TEMPLATES, ROLES

SOURCE_KEYS = {
    "name": "label used in stats and logs (default: the file's stem)",
    "path": "a local file (.jsonl .json .parquet .csv .txt) or a hub dataset name",
    "format": f"one of {', '.join(FORMATS)}",
    "template": "prompt template (alpaca, instruction, chat; messages: auto, tokenizer, chatml)",
    "columns": "mapping from format field to column name, e.g. {output: response}",
    "split": "hub split for training (default train)",
    "subset": "hub dataset configuration name",
    "val_path": "a separate validation file",
    "val_split": "hub split for validation",
    "val_size": "hold out this many rows of `path` for validation when there is no val_path/val_split",
    "limit": "use at most this many training rows (the first ones)",
    "weight": "share within its group (task or replay); null = proportional to size",
    "labels": "classification: the label words; an int label indexes this list",
    "instruction": "classification: the instruction shown before the text ({labels} is filled in)",
}
FIELDS = {
    "alpaca": ("instruction", "input", "output"),
    "messages": ("messages",),
    "text": ("text",),
    "classification": ("text", "label"),
}
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")
SHOWN_PROBLEMS = 5


class DataError(ValueError):
    """Bad data or a bad source setting; the message names where and what to fix."""


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def check_source(source: dict, where: str) -> None:
    """Check a source's settings (not its files): unknown keys, format, template, numbers."""
    for key in source:
        if key not in SOURCE_KEYS:
            raise DataError(f"{where}: unknown key {key!r}{_closest(key, list(SOURCE_KEYS))}; "
                            f"valid keys: {', '.join(SOURCE_KEYS)}")
    for key in ("path", "format"):
        if not source.get(key):
            raise DataError(f"{where}: `{key}` is required ({SOURCE_KEYS[key]})")
    fmt = source["format"]
    if fmt not in FORMATS:
        raise DataError(f"{where}: format {fmt!r} is not one of {', '.join(FORMATS)}{_closest(fmt, list(FORMATS))}")
    template = source.get("template")
    valid = CHAT_TEMPLATES if fmt == "messages" else (*PLAIN_TEMPLATES, "chat")
    if template is not None and fmt != "text" and template not in valid:
        raise DataError(f"{where}: template {template!r} is not one of {', '.join(valid)} for format {fmt}")
    if fmt == "classification" and not source.get("labels"):
        raise DataError(f"{where}: a classification source needs `labels`, e.g. labels: [positive, negative]")
    for key in ("limit", "val_size"):
        value = source.get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise DataError(f"{where}: `{key}` must be a positive integer, got {value!r}")
    weight = source.get("weight")
    if weight is not None and (not isinstance(weight, int | float) or weight <= 0):
        raise DataError(f"{where}: `weight` must be a positive number or null, got {weight!r}")
    unknown = set(source.get("columns") or {}) - set(FIELDS[fmt])
    if unknown:
        raise DataError(f"{where}: columns maps unknown field(s) {sorted(unknown)}; format {fmt} has "
                        f"fields {', '.join(FIELDS[fmt])}")


def is_local(path: str) -> bool:
    """A path that names a local file (by existing or by its suffix), not a hub dataset."""
    return os.path.exists(path) or str(path).endswith(LOCAL_SUFFIXES) or str(path).startswith(("/", "."))


def _short(value: Any) -> str:
    if value is None:
        return "null"
    text = json.dumps(value) if isinstance(value, str | int | float | bool | list | dict) else repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{type(value).__name__} {text}" if not isinstance(value, str) else text


def read_rows(path: str, split: str | None = None, subset: str | None = None) -> Iterator[tuple[str, Any]]:
    """Yield (location, raw row) from a local file or a hub dataset; locations are 'line N' / 'row N'."""
    suffix = Path(path).suffix
    if not is_local(path):
        import datasets  # only for hub sources: heavy import

        for i, row in enumerate(datasets.load_dataset(path, subset, split=split or "train")):
            yield f"row {i}", row
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"row {i}", row
    elif suffix == ".csv":
        with open(path, newline="") as f:
            for i, row in enumerate(csv.DictReader(f)):
                yield f"line {i + 2}", row
    elif suffix == ".txt":  # one document per block of lines separated by a blank line
        with open(path) as f:
            block: list[str] = []
            start = 1
            for n, line in enumerate(f, 1):
                if line.strip():
                    start = n if not block else start
                    block.append(line.rstrip("\n"))
                elif block:
                    yield f"line {start}", {"text": "\n".join(block)}
                    block = []
            if block:
                yield f"line {start}", {"text": "\n".join(block)}
    else:
        yield from _read_json(path)


def _read_json(path: str) -> Iterator[tuple[str, Any]]:
    with open(path) as f:
        head = f.read(1024).lstrip()
        f.seek(0)
        if head.startswith("[") and path.endswith(".json"):
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                yield f"line {e.lineno}", DataError(f"invalid JSON ({e.msg}, column {e.colno})")
                return
            for i, row in enumerate(rows):
                yield f"row {i}", row
            return
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"line {n}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"line {n}", DataError(f"invalid JSON ({e.msg}, column {e.colno})")


def _text(row: dict, field: str, problems: list[str], optional: bool = False) -> str:
    value = row.get(field)
    if optional and value in (None, ""):
        return ""
    if not isinstance(value, str) or not value.strip():
        what = "a string" if optional else "a non-empty string"
        got = "nothing (field missing)" if field not in row else _short(value)
        problems.append(f"field '{field}': expected {what}, got {got}")
    return value


def normalize_row(raw: Any, fmt: str, columns: dict, labels: list | None) -> tuple[dict | None, list[str]]:
    """The row in its format's canonical fields, or the problems that make it unusable."""
    if isinstance(raw, DataError):
        return None, [str(raw)]
    if not isinstance(raw, dict):
        return None, [f"expected an object with fields {', '.join(FIELDS[fmt])}, got {_short(raw)}"]
    row = {f: raw[columns.get(f, f)] for f in FIELDS[fmt] if columns.get(f, f) in raw}
    problems: list[str] = []
    if fmt == "alpaca":
        out = {"instruction": _text(row, "instruction", problems), "input": _text(row, "input", problems, True),
               "output": _text(row, "output", problems)}
    elif fmt == "text":
        out = {"text": _text(row, "text", problems)}
    elif fmt == "classification":
        out = {"text": _text(row, "text", problems), "label": row.get("label")}
        label = out["label"]
        if isinstance(label, bool) or not (
            (isinstance(label, int) and 0 <= label < len(labels))
            or (isinstance(label, str) and label in labels)
        ):
            problems.append(f"field 'label': expected one of {labels} or an index 0..{len(labels) - 1}, "
                            f"got {_short(label) if 'label' in row else 'nothing (field missing)'}")
    else:
        out = {"messages": _messages(row.get("messages"), "messages" in row, problems)}
    return (None if problems else out), problems


def _messages(value: Any, present: bool, problems: list[str]) -> list[dict]:
    if not isinstance(value, list) or not value:
        got = _short(value) if present else "nothing (field missing)"
        problems.append(f"field 'messages': expected a non-empty list of {{role, content}} turns, got {got}")
        return []
    turns = []
    for i, turn in enumerate(value):
        field = f"messages[{i}]"
        if not isinstance(turn, dict):
            problems.append(f"field '{field}': expected an object with role and content, got {_short(turn)}")
            continue
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in ROLES:
            problems.append(f"field '{field}.role': expected one of {', '.join(ROLES)}, got {_short(role)}")
        if not isinstance(content, str) or (not content.strip() and role != "system"):
            problems.append(f"field '{field}.content': expected a non-empty string, got {_short(content)}")
        turns.append({"role": ROLES.get(role, role), "content": content})
    if not problems:
        if "assistant" not in {t["role"] for t in turns}:
            problems.append("field 'messages': expected at least one assistant turn (nothing to train on)")
        elif turns[-1]["role"] != "assistant":
            problems.append(f"field 'messages[{len(turns) - 1}]': expected the last turn to be the assistant's, "
                            f"got {turns[-1]['role']}")
    return turns


def load_rows(source: dict, path: str, split: str | None, on_bad_row: str) -> tuple[list[dict], int]:
    """All good rows of one file/split in canonical form, and how many bad rows were skipped."""
    if is_local(path) and not Path(path).is_file():
        raise DataError(f"{path}: no such file (source {source.get('name', path)!r}, format {source['format']})")
    fmt, columns = source["format"], dict(source.get("columns") or {})
    labels = [str(x) for x in source.get("labels") or []]
    rows: list[dict] = []
    problems: list[str] = []
    bad = 0
    for where, raw in read_rows(path, split, source.get("subset")):
        row, found = normalize_row(raw, fmt, columns, labels)
        if found:
            bad += 1
            problems += [f"{path}:{where.split()[-1]}: {p}" if where.startswith("line") else
                         f"{path} {where}: {p}" for p in found]
        else:
            rows.append(row)
    if bad and on_bad_row == "stop":
        shown = "\n  ".join(problems[:SHOWN_PROBLEMS])
        more = f"\n  ... {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        raise DataError(f"{bad} bad row(s) in {path} (format {fmt}):\n  {shown}{more}\n"
                        "Fix the rows, or set data.on_bad_row=skip to drop bad rows (they are counted in stats).")
    if not rows:
        raise DataError(f"{path}: no usable rows (format {fmt}, {bad} bad)")
    return rows, bad
