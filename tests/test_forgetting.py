"""Forgetting: measured before (once, cached), at every validation and at the end; logged and summarised."""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch

from fulltune.forgetting import cache_key, heldout_loader
from fulltune.preflight import ConfigError
from fulltune.train import fit

from .conftest import REPLAY, TINY_FAST, compose_config


def test_forgetting_is_logged_at_every_validation_and_written_to_the_summary(tiny_cfg, tmp_path):
    cfg = tiny_cfg(REPLAY, "trainer.max_steps=4", "trainer.val_check_interval=2", "finetune.lr=3e-3",
                   "eval.task=null", f"eval.forgetting.cache_dir={tmp_path}/forgetting_cache")
    summary = fit(cfg)

    before, after = summary["forgetting/general_loss_before"], summary["forgetting/general_loss_after"]
    assert summary["forgetting/general"] == pytest.approx(after - before)  # > 0: worse than before
    assert summary["forgetting/general_ppl_after"] == pytest.approx(math.exp(after))
    assert json.loads((tmp_path / "summary.json").read_text())["forgetting/general"] == summary["forgetting/general"]

    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("forgetting/general")]
    at_validation = [r for r in rows if r.get("forgetting/general_loss")]
    assert len(at_validation) == 2  # val_check_interval=2 over 4 steps
    for r in at_validation:
        now = float(r["forgetting/general_loss"])
        assert float(r["forgetting/general"]) == pytest.approx(now - before, abs=1e-5)
        assert now == pytest.approx(float(r["val/replay_loss"]), abs=1e-5)  # the same held-out replay text
    assert float(rows[-1]["forgetting/general_loss_after"]) == pytest.approx(after)  # the end-of-run row


def test_every_kind_of_set_gives_the_same_tokens_for_the_same_text(tiny_cfg):
    """`{source: replay}`, the same file as `{path: ...}`: identical batches (so identical losses);
    `{builtin: python_docs}`: general English, with no setup."""
    from hydra.utils import instantiate

    from fulltune.models import load_tokenizer

    cfg = tiny_cfg(REPLAY)
    datamodule = instantiate(cfg.data, tokenizer=load_tokenizer(cfg.model), seed=0)
    datamodule.setup()
    by_source = heldout_loader(datamodule, {"source": "replay"})
    by_file = heldout_loader(datamodule, {"path": f"{cfg.paths.data_dir}/demo/prose_val.jsonl", "format": "text"})
    assert cache_key(cfg.model, "32-true", by_source) == cache_key(cfg.model, "32-true", by_file)
    docs = heldout_loader(datamodule, {"builtin": "python_docs", "rows": 20})
    assert sum(len(b["input_ids"]) for b in docs) == 20


def test_pretrained_evaluation_is_computed_once_and_reused(tmp_path, cache_dir):
    """The first run measures the untouched model and caches it; a second run of the same model on the
    same set (another method, another LR) reads it back: a planted value proves nothing was recomputed."""
    common = [*TINY_FAST, REPLAY, "trainer.max_steps=2", "eval.task=null",
              f"eval.forgetting.cache_dir={tmp_path}/forgetting_cache"]
    first = fit(compose_config(common, tmp_path / "first", cache_dir))
    (cached,) = (tmp_path / "forgetting_cache").glob("tiny-general-*.json")
    entry = json.loads(cached.read_text())
    assert entry["loss"] == first["forgetting/general_loss_before"]

    cached.write_text(json.dumps({**entry, "loss": 42.0}))
    second = fit(compose_config([*common, "finetune=lora"], tmp_path / "second", cache_dir))
    assert second["forgetting/general_loss_before"] == 42.0
    assert second["forgetting/general"] == pytest.approx(second["forgetting/general_loss_after"] - 42.0)


def test_cache_key_follows_model_precision_and_tokens_not_paths(tiny_cfg):
    cfg = tiny_cfg()
    batches = [{"input_ids": torch.arange(12).view(2, 6), "labels": torch.arange(12).view(2, 6)}]
    other = [{"input_ids": torch.arange(12).view(2, 6), "labels": torch.arange(1, 13).view(2, 6)}]
    key = cache_key(cfg.model, "32-true", batches)
    assert key == cache_key(tiny_cfg("model.cache_dir=/elsewhere").model, "32-true", batches)
    assert len({key, cache_key(cfg.model, "bf16-mixed", batches), cache_key(cfg.model, "32-true", other),
                cache_key(tiny_cfg("model.init_seed=1").model, "32-true", batches)}) == 4


def test_missing_original_data_is_one_clear_error():
    datamodule = SimpleNamespace(val_source_names=["task"])
    with pytest.raises(ConfigError, match=r"no 'replay' validation data \(it has \['task'\]\); add a data.replay"):
        heldout_loader(datamodule, {"source": "replay"})
