"""The datamodule as train.py uses it: every data config, the token cache, validation and eval data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate

import fulltune.data.datamodule as datamodule_module
from fulltune.data.inspect import describe
from fulltune.preflight import CONF_DIR
from tests.conftest import compose_config
from tests.data.helpers import alpaca_rows, datamodule, text_rows, tiny_tokenizer, write_jsonl

DATA_CONFIGS = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml"))


@pytest.fixture(scope="module")
def tok(cache_dir):
    return tiny_tokenizer(cache_dir)


@pytest.mark.parametrize("name", DATA_CONFIGS)
def test_every_data_config_builds_batches_of_the_contract(tok, cache_dir, tmp_path, name):
    cfg = compose_config([f"data={name}"], tmp_path, cache_dir)
    dm = instantiate(cfg.data, tokenizer=tok, seed=cfg.seed)
    dm.setup()
    loader = dm.train_dataloader()
    assert len(loader) == dm.num_train_batches(1) > 0
    batch = next(iter(loader))
    keys = {"input_ids", "labels", "position_ids", "window_label_tokens", "nonpad_fraction", "num_examples",
            "squared_lengths"}
    assert set(batch) == keys | (set() if dm.packing else {"attention_mask"})
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape
    assert batch["input_ids"].shape[0] <= cfg.data.batch_size and batch["input_ids"].shape[1] <= cfg.data.max_length
    predicted = (batch["labels"][:, 1:] != -100).sum()
    assert batch["window_label_tokens"].ndim == 0 and batch["window_label_tokens"] == predicted
    assert dm.val_source_names[0] == "task" and len(dm.val_dataloader()) == len(dm.val_source_names)
    if dm.sources["task"][0]["format"] != "text":
        example = dm.generation_examples(3)[0]
        assert example["prompt_ids"] and example["answer"]


def test_demo_config_mixes_replay_and_validates_it_separately(tok, cache_dir, tmp_path):
    cfg = compose_config(["data=demo", "~experiment"], tmp_path, cache_dir)  # data/demo.yaml as is
    dm = instantiate(cfg.data, tokenizer=tok, seed=cfg.seed)
    dm.setup()
    stats = dm.stats
    assert dm.val_source_names == ["task", "replay"]
    assert stats["sources"]["dates"]["epoch_samples"] == 2000 and stats["sources"]["prose"]["epoch_samples"] == 222
    assert abs(stats["replay_fraction_samples"] - cfg.data.replay_ratio) < 1 / 2222
    task_val, replay_val = dm.val_dataloader()
    prose = stats["sources"]["prose"]
    assert prose["val_documents"] == 100 and prose["val_examples"] > 100  # long prose chunked, not cut
    for loader, size in ((task_val, 100), (replay_val, prose["val_examples"])):
        batches = list(loader)
        assert sum(b["input_ids"].shape[0] for b in batches) == size
        assert all(b["window_label_tokens"] == (b["labels"][:, 1:] != -100).sum() for b in batches)


def test_second_setup_hits_the_token_cache(tok, tmp_path, monkeypatch):
    task = write_jsonl(tmp_path / "task.jsonl", alpaca_rows(30))
    sources = [{"path": task, "format": "alpaca", "val_size": 5}]
    first = datamodule(tok, tmp_path / "cache", sources)
    first.setup()

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(datamodule_module, "build_store", no_tokenizing)
    second = datamodule(tok, tmp_path / "cache", sources)
    second.setup()  # same tokenizer, data and settings: no tokenizing
    assert second.stats == first.stats
    for changed in (dict(max_length=64), dict(train_on_prompt=True)):
        with pytest.raises(AssertionError, match="tokenized again"):
            datamodule(tok, tmp_path / "cache", sources, **changed).setup()
    os.utime(task, ns=(0, 0))  # the file changed
    with pytest.raises(AssertionError, match="tokenized again"):
        datamodule(tok, tmp_path / "cache", sources).setup()


def test_parallel_tokenization_gives_the_same_tokens(tok, tmp_path):
    path = write_jsonl(tmp_path / "text.jsonl", text_rows(2500))
    stores = []
    for num_proc in (1, 2):
        dm = datamodule(tok, tmp_path / f"cache{num_proc}", [{"path": path, "format": "text"}], num_proc=num_proc)
        dm.setup()
        stores.append(dm._builder.stores[0])
    assert np.array_equal(stores[0].tokens, stores[1].tokens) and np.array_equal(stores[0].offsets, stores[1].offsets)


def test_generation_examples_are_the_trained_prompts_with_their_answers(tok, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(10))
    val = write_jsonl(tmp_path / "val.jsonl", alpaca_rows(4, start=100))
    reviews = write_jsonl(tmp_path / "reviews.jsonl", [{"text": f"review {i}", "label": i % 2} for i in range(10)])
    dm = datamodule(tok, tmp_path / "cache", [
        {"path": train, "val_path": val, "format": "alpaca", "template": "instruction"},
        {"path": reviews, "format": "classification", "labels": ["good", "bad"], "val_size": 2}])
    examples = dm.generation_examples(10)
    answers = [e["answer"] for e in examples]  # round-robin over the task sources: 4 dates, 2 reviews
    assert [answers[i] for i in (0, 2, 4, 5)] == ["101", "102", "103", "104"]
    assert {answers[1], answers[3]} <= {"good", "bad"}
    store = dm._builder.stores[dm._index.index(("task", 0, "val"))]
    ids, _ = store.example(0)
    assert examples[0]["prompt_ids"] == ids[: len(examples[0]["prompt_ids"])].tolist()
    assert tok.decode(examples[0]["prompt_ids"]).endswith("### Response:\n")
    assert dm.stop_token_ids == [tok.eos_token_id]
    assert dm.stats["sources"]["reviews"]["examples"] == 8  # val_size rows held out of training


def test_inspect_prints_the_plan_and_the_loss_mask(tok, cache_dir, tmp_path):
    cfg = compose_config(["data=demo", "~experiment"], tmp_path, cache_dir)  # data/demo.yaml as is
    text = describe(instantiate(cfg.data, tokenizer=tok, seed=cfg.seed))
    assert "dates" in text and "prose" in text and "replay 10.0% of samples" in text
    assert "### Response:\n[[" in text and "<|im_end|>]]" in text
    rows = [line for line in text.splitlines() if line.startswith(("dates ", "prose "))]
    assert rows[0].split()[:3] == ["dates", "task", "alpaca"] and rows[1].split()[-3] == "222"


def test_validate_checks_rows_without_tokenizing(tok, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [*alpaca_rows(3), {"instruction": "x", "output": 3}])
    dm = datamodule(tok, tmp_path / "cache", [{"path": bad, "format": "alpaca"}], on_bad_row="skip")
    assert dm.validate() == {"bad/train": 3}
    assert not Path(tmp_path / "cache").exists()
    dm.setup()
    assert dm.stats["sources"]["bad"]["bad_rows"] == 1
    meta = json.loads(next((tmp_path / "cache" / "tokenized").glob("*/meta.json")).read_text())
    assert meta["bad_rows"] == 1 and meta["examples"] == 3
