"""Replay at scale: streamed tokenizing in bounded memory, long documents chunked, first-N sources,
one tokenizing process per node."""

from __future__ import annotations

import logging
import multiprocessing as mp
import resource
from pathlib import Path

import numpy as np
import pytest

from fulltune.data import DataError
from fulltune.data.formats import encode_batch, make_renderer
from fulltune.data.validate import load_rows
from tests.data.helpers import alpaca_rows, datamodule, text_rows, tiny_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tok(cache_dir):
    return tiny_tokenizer(cache_dir)


def store(dm, group="task", split="train"):
    dm.setup()
    return dm._builder.stores[dm._index.index((group, 0, split))]


def test_streamed_tokens_equal_encoding_the_whole_file_at_once(tok, tmp_path, monkeypatch):
    """The streamed store (many small chunks) holds exactly the tokens of encoding every row in one
    call, as the data path did before streaming: truncation and masks included."""
    import fulltune.data.cache as cache

    monkeypatch.setattr(cache, "CHUNK_ROWS", 7)  # 300 rows: 43 chunks
    long_answers = [{"instruction": "Add one.", "output": " ".join(f"w{k}" for k in range(20 + i))} for i in range(5)]
    for rows, source, width in ((alpaca_rows(300) + long_answers, {"format": "alpaca", "template": "instruction"}, 64),
                                (text_rows(300), {"format": "text", "overlong": "truncate"}, 12)):
        path = write_jsonl(tmp_path / f"{source['format']}.jsonl", rows)
        got = store(datamodule(tok, tmp_path / "cache", [{"path": path, **source}], max_length=width))
        renderer = make_renderer(source, tok, False)
        whole = encode_batch([renderer(r) for r in load_rows(source, path, None, "stop")[0]], tok)
        assert len(got) == len(whole) and got.meta["truncated"] > 0
        for i, e in enumerate(whole):
            ids, mask = got.example(i)
            assert ids.tolist() == e.ids[:width] and mask.astype(bool).tolist() == e.mask[:width]
            assert got.completion_start[i] == min(e.completion_start, width)


def test_a_long_document_yields_all_its_tokens_as_chunks(tok, tmp_path):
    from fulltune.data.demo import long_documents

    docs = [next(long_documents(3)) for _ in range(1)] + ["a short one"]
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    renderer = make_renderer({"format": "text"}, tok, False)
    full = [e.ids for e in encode_batch([renderer({"text": d}) for d in docs], tok)]
    assert len(full[0]) > 10 * 64

    chunked = store(datamodule(tok, tmp_path / "cache", [{"path": path, "format": "text"}], max_length=64))
    windows = [chunked.example(i) for i in range(len(chunked))]
    assert np.concatenate([ids for ids, _ in windows]).tolist() == full[0] + full[1]
    assert all(len(ids) == 64 for ids, _ in windows[: len(full[0]) // 64])
    assert all(not mask[0] and mask[1:].all() for _, mask in windows)  # all but each window's first token
    meta = chunked.meta
    assert (meta["documents"], meta["chunked"], meta["examples"], meta["tokens"]) == (
        2, 1, -(-len(full[0]) // 64) + 1, len(full[0]) + len(full[1]))

    joined = store(datamodule(tok, tmp_path / "cache", [{"path": path, "format": "text", "concat": True}],
                              max_length=64))
    stream = full[0] + full[1]  # each document already ends with EOS
    assert [len(joined.example(i)[0]) for i in range(len(joined))] == [64] * (len(stream) // 64) + [len(stream) % 64]
    assert np.concatenate([joined.example(i)[0] for i in range(len(joined))]).tolist() == stream

    cut = datamodule(tok, tmp_path / "cache", [{"path": path, "format": "text"}], max_length=64, overlong="truncate")
    cut.setup()
    s = cut.stats["sources"]["docs"]
    assert (s["examples"], s["truncated"], s["tokens"]) == (2, 1, 64 + len(full[1]))


def test_instruction_data_cannot_be_chunked(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", alpaca_rows(5))
    with pytest.raises(DataError, match=r"data.task\[0\]: overlong=chunk .* only for format text"):
        datamodule(tok, tmp_path / "cache", [{"path": path, "format": "alpaca", "overlong": "chunk"}])
    dm = datamodule(tok, tmp_path / "cache", [{"path": path, "format": "alpaca"}])  # data.overlong=chunk
    assert dm.overlong_policy(dm.sources["task"][0]) == "truncate"


def test_take_rows_and_take_tokens_read_only_the_first_part(tok, tmp_path):
    """Reading stops with the chunk of rows (1000) that reaches N: a broken line after it does not
    matter; take_tokens stops at exactly N tokens, and the mixture by tokens is built on that store."""
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [*text_rows(3000), "{not json"])
    task = write_jsonl(tmp_path / "task.jsonl", alpaca_rows(40))
    replay = {"name": "web", "path": corpus, "format": "text", "take_tokens": 1000}
    dm = datamodule(tok, tmp_path / "cache", [{"path": task, "format": "alpaca", "take_rows": 30}],
                    replay=[replay], replay_ratio=0.25, mix_by="tokens")
    dm.setup()
    web = dm.stats["sources"]["web"]
    assert web["tokens"] == 1000 and web["documents"] < 1000
    assert dm.stats["sources"]["task"]["documents"] == 30
    assert dm.stats["replay_fraction_tokens"] == pytest.approx(0.25, abs=0.03)
    again = datamodule(tok, tmp_path / "cache2", [{"path": task, "format": "alpaca", "take_rows": 30}],
                       replay=[replay], replay_ratio=0.25, mix_by="tokens")
    again.setup()
    assert again.plan.fingerprint == dm.plan.fingerprint  # every rank builds the same plan
    whole = datamodule(tok, tmp_path / "cache", [{"path": corpus, "format": "text"}])
    with pytest.raises(DataError, match=r"corpus.jsonl:3001: invalid JSON"):
        whole.setup()


def test_txt_rows_by_line_paragraph_or_document_and_a_chosen_text_column(tok, tmp_path):
    txt = tmp_path / "wiki.txt"
    txt.write_text("Article one.\nArticle two,\nstill two? no: three.\n\nArticle four.\n")
    counts = {by: len(load_rows({"format": "text", "sample_by": by, "path": str(txt)}, str(txt), None, "stop")[0])
              for by in ("line", "paragraph", "document")}
    assert counts == {"line": 4, "paragraph": 2, "document": 1}
    assert [r["text"] for r in load_rows({"format": "text"}, str(txt), None, "stop")[0]][0] == "Article one."
    with pytest.raises(DataError, match="sample_by='lines'"):
        datamodule(tok, tmp_path / "cache", [{"path": str(txt), "format": "text", "sample_by": "lines"}])

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["from parquet"]}), tmp_path / "p.parquet")
    (tmp_path / "c.csv").write_text("id,body\n1,from csv\n")
    write_jsonl(tmp_path / "j.jsonl", [{"body": "from jsonl", "id": 1}])
    for name in ("p.parquet", "c.csv", "j.jsonl"):
        rows, _ = load_rows({"format": "text", "columns": {"text": "body"}}, str(tmp_path / name), None, "stop")
        assert rows == [{"text": f"from {Path(name).suffix.lstrip('.')}"}]


def _peak_growth_kb(tok, tmp: Path, megabytes: dict, out) -> None:
    """In a forked child (its own peak RSS): tokenize corpora of each size in turn and send how much
    each raised the peak."""
    import fulltune.data.cache as cache
    from fulltune.data.demo import write_corpus

    cache.CHUNK_ROWS, cache.CHUNK_CHARS = 20, 50_000
    growth = {}
    for name, size in megabytes.items():
        path = write_corpus(tmp / f"{name}.jsonl", size)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        dm = datamodule(tok, tmp / "cache", [{"path": str(path), "format": "text"}], max_length=256)
        dm.prepare_data()
        growth[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        growth[f"{name}_tokens"] = sum(len(s.tokens) for s in dm._load_stores().values())
    out.send(growth)


def test_peak_memory_stays_bounded_on_a_corpus_larger_than_the_chunk(tok, tmp_path):
    """Chunks of 50 KB: once a 0.75 MB corpus has set the peak, a 3 MB one (60 chunks) raises it by
    less than half its file size (holding its rows as Python objects, as before streaming, took
    ~12x the file: +36 MB)."""
    ctx = mp.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_peak_growth_kb, args=(tok, tmp_path, {"warm": 0.2, "medium": 0.75, "big": 3}, send))
    child.start()
    growth = receive.recv()
    child.join(60)
    assert growth["big_tokens"] > 1_500_000
    assert growth["big"] < 1_500, growth


def _prepare(path: str, cache: str, log_file: str, start: mp.Event) -> None:
    handler = logging.FileHandler(log_file)
    logging.getLogger("fulltune.data.cache").addHandler(handler)
    logging.getLogger("fulltune.data.cache").setLevel(logging.INFO)
    tok = tiny_tokenizer(Path(cache))
    start.wait()
    datamodule(tok, Path(cache) / "shared", [{"path": path, "format": "text"}]).prepare_data()


def test_one_process_tokenizes_and_the_other_waits_for_its_store(tmp_path, cache_dir):
    path = write_jsonl(tmp_path / "text.jsonl", text_rows(20000))
    ctx = mp.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=_prepare, args=(path, str(cache_dir), str(tmp_path / f"log{r}"), start))
             for r in range(2)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    logs = [(tmp_path / f"log{r}").read_text() for r in range(2)]
    assert sorted(log.count("tokenizing") for log in logs) == [0, 1]
    assert len(list((cache_dir / "shared" / "tokenized").glob("*/meta.json"))) == 1
