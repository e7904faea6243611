"""Fail fast: read every row of a source and check it against its format before anything is tokenized.

A bad row gives one error that names the file, the line (or row), the field and what was expected:

    data/train.jsonl:12: field 'output': expected a non-empty string, got null

A file that cannot be read as rows at all (missing, a directory, unreadable, empty, not UTF-8, an
unsupported type) gives one error naming the file and how to fix it, before any row is read.

`on_bad_row: stop` (default) raises `DataError` listing the first problems and their count;
`on_bad_row: skip` drops bad rows and counts them in `dm.stats`.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fulltune.preflight import ConfigError

from .conversations import conversation
from .conversations import short as _short
from .formats import CHAT_TEMPLATES, FORMATS, PLAIN_TEMPLATES, TRAIN_ON

SOURCE_KEYS = {
    "name": "label used in stats and logs (default: the file's stem)",
    "path": "a local file (.jsonl .json .parquet .csv .txt) or a hub dataset name",
    "format": f"one of {', '.join(FORMATS)}",
    "template": "prompt template (alpaca, instruction, chat; messages: auto, tokenizer, chatml or a .jinja file)",
    "columns": "mapping from format field to column name, e.g. {output: response}",
    "split": "hub split for training (default train)",
    "subset": "hub dataset configuration name",
    "val_path": "a separate validation file",
    "val_split": "hub split for validation",
    "val_size": "hold out this many rows of `path` for validation when there is no val_path/val_split",
    "take_rows": "train on the first N rows only (the rest of the file or stream is never read)",
    "take_tokens": "train on the first N tokens only (after chunking; the rest is never read)",
    "sample_by": ".txt files: what one row is: line (default) | paragraph (blank-line blocks) | document",
    "overlong": "text longer than max_length: chunk (into max_length windows) | truncate | drop",
    "concat": "text: join documents with EOS before chunking, so every window is full (default false)",
    "weight": "share within its group (task or replay); null = proportional to size",
    "labels": "classification: the label words; an int label indexes this list",
    "instruction": "classification: the instruction shown before the text ({labels} is filled in)",
    "train_on": "messages: which assistant turns are trained: all_assistant (default) | last_assistant",
}
FIELDS = {
    "alpaca": ("instruction", "input", "output"),
    "messages": ("messages", "tools", "system"),
    "text": ("text",),
    "classification": ("text", "label"),
}
REQUIRED_FIELDS = {"alpaca": ("instruction", "output"), "messages": ("messages",), "text": ("text",),
                   "classification": ("text", "label")}
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")
UNICODE_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),  # UTF-32 LE first: it starts
                (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))   # like UTF-16 LE's mark
SAMPLE_BY = ("line", "paragraph", "document")
OVERLONG = ("chunk", "truncate", "drop")
SHOWN_PROBLEMS = 5
TEXT_ENCODING = "utf-8-sig"  # UTF-8; a byte-order mark (as Windows tools write) is skipped


class DataError(ConfigError):
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
    jinja = fmt == "messages" and str(template).endswith(".jinja")
    if template is not None and fmt != "text" and template not in valid and not jinja:
        more = " or a .jinja file" if fmt == "messages" else ""
        raise DataError(f"{where}: template {template!r} is not one of {', '.join(valid)}{more} for format {fmt}")
    if jinja and not Path(template).is_file():
        raise DataError(f"{where}: template {template!r}: no such file; give the path of a Jinja chat template")
    train_on = source.get("train_on")
    if train_on is not None and (fmt != "messages" or train_on not in TRAIN_ON):
        raise DataError(f"{where}: train_on={train_on!r}: expected one of {', '.join(TRAIN_ON)}, on a messages source")
    if fmt == "classification" and not source.get("labels"):
        raise DataError(f"{where}: a classification source needs `labels`, e.g. labels: [positive, negative]")
    for key in ("take_rows", "take_tokens", "val_size"):
        value = source.get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise DataError(f"{where}: `{key}` must be a positive integer, got {value!r}")
    _check_text_options(source, where)
    weight = source.get("weight")
    if weight is not None and (not isinstance(weight, int | float) or weight <= 0):
        raise DataError(f"{where}: `weight` must be a positive number or null, got {weight!r}")
    unknown = set(source.get("columns") or {}) - set(FIELDS[fmt])
    if unknown:
        raise DataError(f"{where}: columns maps unknown field(s) {sorted(unknown)}; format {fmt} has "
                        f"fields {', '.join(FIELDS[fmt])}")


def _check_text_options(source: dict, where: str) -> None:
    """sample_by, overlong and concat: values, and the formats and files they apply to."""
    sample_by, overlong = source.get("sample_by"), source.get("overlong")
    if sample_by is not None and (sample_by not in SAMPLE_BY or not str(source["path"]).endswith(".txt")):
        raise DataError(f"{where}: sample_by={sample_by!r}: expected one of {', '.join(SAMPLE_BY)}, "
                        "and only for a .txt path (other files have rows already)")
    if overlong is not None and overlong not in OVERLONG:
        raise DataError(f"{where}: overlong={overlong!r}: expected one of {', '.join(OVERLONG)}")
    if source["format"] != "text" and (overlong == "chunk" or source.get("concat")):
        raise DataError(f"{where}: overlong=chunk and concat split text into windows: only for format text "
                        f"(a {source['format']} example cut in two loses its answer); use truncate or drop")


def is_local(path: str) -> bool:
    """A path that names a local file (by existing or by its suffix), not a hub dataset."""
    return os.path.exists(path) or str(path).endswith(LOCAL_SUFFIXES) or str(path).startswith(("/", "."))



def read_rows(path: str, split: str | None = None, subset: str | None = None, sample_by: str | None = None,
              streaming: bool = False) -> Iterator[tuple[str, Any]]:
    """Yield (location, raw row) from a local file or a hub dataset; locations are 'line N' / 'row N'.
    Everything streams (a row at a time) except a .json array; `streaming` reads a hub dataset as a
    stream instead of downloading it whole (for sources that take only their first rows or tokens)."""
    suffix = Path(path).suffix
    if not is_local(path):
        import datasets  # only for hub sources: heavy import

        kwargs = {"streaming": True} if streaming else {}
        for i, row in enumerate(datasets.load_dataset(path, subset, split=split or "train", **kwargs)):
            yield f"row {i}", row
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = (row for batch in pq.ParquetFile(path).iter_batches(batch_size=1024) for row in batch.to_pylist())
        for i, row in enumerate(rows):
            yield f"row {i}", row
    elif suffix == ".csv":
        with open(path, newline="", encoding=TEXT_ENCODING) as f:
            for i, row in enumerate(csv.DictReader(f)):
                yield f"line {i + 2}", row
    elif suffix == ".txt":
        yield from _read_txt(path, sample_by or "line")
    else:
        yield from _read_json(path)


def _read_txt(path: str, sample_by: str) -> Iterator[tuple[str, dict]]:
    """Rows of a text file as `datasets`' text loader cuts them: each non-empty line, each block of
    lines between blank lines (paragraph), or the whole file (document)."""
    with open(path, encoding=TEXT_ENCODING) as f:
        if sample_by == "document":
            yield "line 1", {"text": f.read()}
            return
        block: list[str] = []
        start = 1
        for n, line in enumerate(f, 1):
            if line.strip() and sample_by == "line":
                yield f"line {n}", {"text": line.rstrip("\n")}
            elif line.strip():
                start = n if not block else start
                block.append(line.rstrip("\n"))
            elif block:
                yield f"line {start}", {"text": "\n".join(block)}
                block = []
        if block:
            yield f"line {start}", {"text": "\n".join(block)}


def _read_json(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding=TEXT_ENCODING) as f:
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
            except json.JSONDecodeError as e:  # e.pos, not e.colno: a row cut short fails on its newline
                yield f"line {n}", DataError(f"invalid JSON ({e.msg}, column {e.pos + 1})")


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
        key = columns.get("messages", "messages")
        if "messages" not in row and "messages" not in columns and "conversations" in raw:  # ShareGPT's name
            key, row["messages"] = "conversations", raw["conversations"]
        out = conversation(row, key, problems)
    other = _other_format(raw, fmt) if problems and not row else None
    if other:  # a file mixing formats: say so, not which of this format's fields are missing
        problems = [f"a row of format {other} (fields {', '.join(REQUIRED_FIELDS[other])}) in a source of format "
                    f"{fmt}: one format per file; move these rows to their own file, a source with format: {other}"]
    if raw and not other and not any(f in row for f in REQUIRED_FIELDS[fmt]):  # its own names for the fields
        problems.append(f"this row's fields are {', '.join(map(str, raw))}: map them to the format's with the "
                        f"source's `columns`, e.g. columns: {{{REQUIRED_FIELDS[fmt][0]}: {next(iter(raw))}}}")
    return (None if problems else out), problems


def _other_format(raw: dict, fmt: str) -> str | None:
    """The format whose required fields this row has (the most specific one), other than `fmt`."""
    matches = [f for f, names in REQUIRED_FIELDS.items() if f != fmt and all(n in raw for n in names)]
    return max(matches, key=lambda f: len(REQUIRED_FIELDS[f]), default=None)


def location(path: str, where: str) -> str:
    """'file:12' for a line, 'name row 3' for a row of a table or hub dataset."""
    return f"{path}:{where.split()[-1]}" if where.startswith("line") else f"{path} {where}"


@dataclass
class RowReport:
    """What streaming a file met: good and bad rows, and the first problems (bounded, for the error)."""

    path: str
    format: str
    good: int = 0
    bad: int = 0
    problems: list[str] = field(default_factory=list)
    more_problems: int = 0

    def add(self, where: str, found: list[str]) -> None:
        self.bad += 1
        for p in found:
            if len(self.problems) < SHOWN_PROBLEMS:
                self.problems.append(f"{location(self.path, where)}: {p}")
            else:
                self.more_problems += 1

    def check(self, on_bad_row: str) -> None:
        """Raise DataError for bad rows (with on_bad_row=stop) or when no row was usable."""
        if self.bad and on_bad_row == "stop":
            shown = "\n  ".join(self.problems)
            more = f"\n  ... {self.more_problems} more" if self.more_problems else ""
            raise DataError(f"{self.bad} bad row(s) in {self.path} (format {self.format}):\n  {shown}{more}\n"
                            "Fix the rows, or set data.on_bad_row=skip to drop bad rows (they are counted in stats).")
        if not self.good:
            raise DataError(f"{self.path}: no usable rows (format {self.format}, {self.bad} bad)")


def check_file(path: str, source: dict) -> None:
    """A local source file that can be read at all: a readable, non-empty file of a supported type,
    text in UTF-8 (a UTF-8 BOM is fine; UTF-16/32 are named, with how to convert). Nothing is parsed."""
    what = f"(source {source.get('name', Path(path).stem)!r}, format {source['format']})"
    file = Path(path)
    if file.is_dir():
        raise DataError(f"{path}: a directory, not a file {what}; point the source's path at a file in it "
                        f"({', '.join(LOCAL_SUFFIXES)})")
    if not file.is_file():
        raise DataError(f"{path}: no such file {what}")
    if file.suffix and file.suffix not in LOCAL_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {file.suffix!r} {what}; use one of "
                        f"{', '.join(LOCAL_SUFFIXES)} (decompress or convert it first)")
    try:
        with open(file, "rb") as f:
            head = f.read(4)
    except PermissionError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror}) {what}; give this user read access "
                        f"(chmod a+r {path}) or point the source's path at a readable copy") from err
    if not head:
        raise DataError(f"{path}: the file is empty {what}; point the source's path at the file with the rows")
    if file.suffix == ".parquet" and head != b"PAR1":
        raise DataError(f"{path}: not a Parquet file (it does not start with PAR1) {what}; rename it to what it "
                        "is (.jsonl .csv ...) or write it with pyarrow / pandas .to_parquet")
    for bom, encoding in UNICODE_BOMS:
        if file.suffix != ".parquet" and head.startswith(bom):
            raise DataError(f"{path}: {encoding} text (it starts with the {encoding} byte-order mark) {what}; "
                            f"fulltune reads UTF-8: convert it with `iconv -f {encoding} -t UTF-8 {path} > "
                            f"{file.with_stem(file.stem + '.utf8').name}` and point the source's path at the copy")


def not_utf8_message(path: str) -> str:
    """Where a file stops being UTF-8 (line, column, byte), what it looks like instead, and how to convert.
    Reads line by line: memory stays one line however big the file."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                return _not_utf8_at(path, n, line, err.start)
    return f"{path}: not UTF-8 text; convert it to UTF-8 and point the source's path at the copy"


def _not_utf8_at(path: str, n: int, line: bytes, start: int) -> str:
    try:
        line.decode("cp1252")
        encoding = "CP1252"  # Windows Western; for printable text the same as Latin-1
    except UnicodeDecodeError:
        encoding = "LATIN1"
    column = len(line[:start].decode("utf-8", errors="replace")) + 1
    copy = Path(path).with_stem(Path(path).stem + ".utf8").name
    return (f"{path}:{n}: not UTF-8 text (byte 0x{line[start]:02x} at column {column}); it looks like {encoding}. "
            f"fulltune reads UTF-8: convert the file with `iconv -f {encoding} -t UTF-8 {path} > {copy}` and "
            "point the source's path at the copy (or fix that line)")


def good_rows(source: dict, path: str, split: str | None, report: RowReport) -> Iterator[dict]:
    """Stream the good rows of one file/split in canonical form; bad ones are counted in `report`."""
    if is_local(path):
        check_file(path, source)
    fmt, columns = source["format"], dict(source.get("columns") or {})
    labels = [str(x) for x in source.get("labels") or []]
    streaming = bool(source.get("take_rows") or source.get("take_tokens"))
    try:
        for where, raw in read_rows(path, split, source.get("subset"), source.get("sample_by"), streaming):
            row, found = normalize_row(raw, fmt, columns, labels)
            if found:
                report.add(where, found)
            else:
                report.good += 1
                if fmt == "messages":  # a template that cannot render the row names it
                    row["where"] = location(path, where)
                yield row
    except UnicodeDecodeError as err:
        raise DataError(not_utf8_message(path)) from err


def load_rows(source: dict, path: str, split: str | None, on_bad_row: str) -> tuple[list[dict], int]:
    """All good rows of one file/split in canonical form, and how many bad rows were skipped."""
    report = RowReport(path, source["format"])
    rows = list(good_rows(source, path, split, report))
    report.check(on_bad_row)
    return rows, report.bad
