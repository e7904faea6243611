"""Forgetting: measured before (once, cached), at every validation and at the end; logged and summarised."""

from __future__ import annotations

import csv
import json
import logging
import math
from types import SimpleNamespace

import pytest
import torch

from fulltune.forgetting import cache_key, heldout_loader
from fulltune.preflight import ConfigError
from fulltune.train import fit

from .conftest import REPLAY, TINY_FAST, compose_config


def test_forgetting_is_logged_at_every_validation_and_written_to_the_summary(tiny_cfg, tmp_path, caplog):
    """The default sets: `general`, held-out text nothing trains on, and `replay`, the replay split
    (in-distribution), each logged, summarised and named for what it is in the printed summary."""
    cfg = tiny_cfg(REPLAY, "trainer.max_steps=4", "trainer.val_check_interval=2", "finetune.lr=3e-3",
                   "eval.task=null", f"eval.forgetting.cache_dir={tmp_path}/forgetting_cache")
    with caplog.at_level(logging.INFO):
        summary = fit(cfg)

    for name in ("general", "replay"):
        before, after = summary[f"forgetting/{name}_loss_before"], summary[f"forgetting/{name}_loss_after"]
        assert summary[f"forgetting/{name}"] == pytest.approx(after - before)  # > 0: worse than before
        assert summary[f"forgetting/{name}_ppl_after"] == pytest.approx(math.exp(after))
    assert json.loads((tmp_path / "summary.json").read_text())["forgetting/general"] == summary["forgetting/general"]
    assert summary["forgetting/general_loss_before"] != summary["forgetting/replay_loss_before"]
    assert "forgetting/general, held-out general text" in caplog.text and "never trained on" in caplog.text
    assert "in-distribution replay loss" in caplog.text

    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("forgetting/replay")]
    at_validation = [r for r in rows if r.get("forgetting/replay_loss")]
    assert len(at_validation) == 2  # val_check_interval=2 over 4 steps
    before = summary["forgetting/replay_loss_before"]
    for r in at_validation:
        now = float(r["forgetting/replay_loss"])
        assert float(r["forgetting/replay"]) == pytest.approx(now - before, abs=1e-5)
        assert now == pytest.approx(float(r["val/replay_loss"]), abs=1e-5)  # the same held-out replay text
        assert r["forgetting/general_loss"]
    assert float(rows[-1]["forgetting/replay_loss_after"]) == pytest.approx(summary["forgetting/replay_loss_after"])


def test_every_kind_of_set_gives_the_same_tokens_for_the_same_text(tiny_cfg):
    """`{source: replay}`, the same file as `{path: ...}`: identical batches (so identical losses);
    `{builtin: python_docs}`: general English, with no setup, chunked up to its token budget."""
    from hydra.utils import instantiate

    from fulltune.models import load_tokenizer

    cfg = tiny_cfg(REPLAY)
    datamodule = instantiate(cfg.data, tokenizer=load_tokenizer(cfg.model), seed=0)
    datamodule.setup()
    by_source = heldout_loader(datamodule, {"source": "replay"})
    by_file = heldout_loader(datamodule, {"path": f"{cfg.paths.data_dir}/demo/prose_val.jsonl", "format": "text"})
    assert cache_key(cfg.model, "32-true", by_source) == cache_key(cfg.model, "32-true", by_file)
    docs = heldout_loader(datamodule, {"builtin": "python_docs", "take_tokens": 3000})
    assert sum(int(b["attention_mask"].sum()) for b in docs) == 3000
    assert max(b["input_ids"].shape[1] for b in docs) == datamodule.max_length  # long paragraphs: windows


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
    counted = [{**batches[0], "num_examples": torch.tensor(2), "squared_lengths": torch.tensor(72)}]
    assert key == cache_key(cfg.model, "32-true", counted)  # a batch's bookkeeping is not its loss
    assert len({key, cache_key(cfg.model, "bf16-mixed", batches), cache_key(cfg.model, "32-true", other),
                cache_key(tiny_cfg("model.init_seed=1").model, "32-true", batches)}) == 4


def test_missing_original_data_is_one_clear_error():
    datamodule = SimpleNamespace(val_source_names=["task"])
    with pytest.raises(ConfigError, match=r"no 'replay' validation data \(it has \['task'\]\); add a data.replay"):
        heldout_loader(datamodule, {"source": "replay"})


def test_evaluations_after_a_final_validation_reuse_it_and_equal_the_direct_computation(tmp_path, cache_dir,
                                                                                      monkeypatch):
    """A validation at the last step has measured the task and replay splits on the final weights: the
    task loss after training and the `source: replay` forgetting set take its losses (one pass over
    those batches, not two), and they are the direct float64 computation on the exported weights."""
    from hydra.utils import instantiate

    import fulltune.evaluate
    import fulltune.forgetting
    from fulltune.models import load_tokenizer
    from fulltune.module import CausalLMModule

    passes = []
    counted = fulltune.evaluate.mean_token_loss

    def mean_token_loss(module, loader, share=None):
        passes.append(loader)
        return counted(module, loader, share)

    for where in (fulltune.evaluate, fulltune.forgetting):
        monkeypatch.setattr(where, "mean_token_loss", mean_token_loss)
    overrides = [*TINY_FAST, REPLAY, "precision=fp32", "trainer.max_steps=4", "trainer.val_check_interval=4",
                 "eval.forgetting.cache_dir=null", "finetune.lr=3e-3"]
    summary = fit(compose_config(overrides, tmp_path / "run", cache_dir))
    # before: task, general, replay; at the validation: general alone; after training: none
    assert len(passes) == 4

    cfg = compose_config([*overrides, "model.source=pretrained", f"model.pretrained={tmp_path}/run/hf"],
                         tmp_path / "direct", cache_dir)
    datamodule = instantiate(cfg.data, tokenizer=load_tokenizer(cfg.model), seed=cfg.seed)
    module = CausalLMModule(model=cfg.model, optimizer=None)
    module.configure_model()
    module.eval()
    with torch.no_grad():
        for key, loader in (("task/loss_after", datamodule.val_dataloader()[0]),
                            ("forgetting/replay_loss_after", heldout_loader(datamodule, {"source": "replay"}))):
            sums = [module.token_loss_sum(batch) for batch in loader]
            direct = float(sum(s.double() for s, _ in sums) / sum(n.double() for _, n in sums))
            assert summary[key] == pytest.approx(direct, rel=1e-12), key
