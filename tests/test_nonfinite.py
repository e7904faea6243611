"""A NaN loss and NaN gradients injected into chosen steps (tests.faults.PoisonSteps): the step is
skipped, counted and logged, on every rank when only one sees them; too many in a row stop the run
with a message."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from fulltune.export import read_checkpoint
from fulltune.preflight import ConfigError
from fulltune.train import fit

from .strategy_runs import ddp_multirun, hf_weights, max_abs_diff, pretrained_tiny

POISON = "+callbacks.poison._target_=tests.faults.PoisonSteps"
KEY = "train/nonfinite_skipped_steps"


def test_a_nan_step_is_skipped_counted_and_logged(tiny_cfg, tmp_path):
    summary = fit(tiny_cfg("trainer.max_steps=3", "save_steps=1", "save_total_limit=-1", POISON,
                           "+callbacks.poison.steps=[2]"))
    assert summary["train/nonfinite_skipped_steps"] == 1.0 and summary["global_step"] == 3
    step = {n: torch.load(tmp_path / "checkpoints" / f"step00000{n}.ckpt", weights_only=False) for n in (1, 2, 3)}
    # step 2 changed nothing: the same weights and optimizer moments as after step 1; step 3 trained on
    for key, before in step[1]["state_dict"].items():
        assert torch.equal(before, step[2]["state_dict"][key]) and torch.isfinite(step[3]["state_dict"][key]).all()
    moments = [(s["optimizer_states"][0]["state"][0]["exp_avg"]) for s in step.values()]
    assert torch.equal(moments[0], moments[1]) and not torch.equal(moments[1], moments[2])
    with (tmp_path / "csv" / "metrics.csv").open() as f:
        logged = [float(row[KEY]) for row in csv.DictReader(f) if row[KEY]]
    assert logged == [0.0, 1.0, 1.0]


def test_consecutive_nan_steps_stop_the_run_keeping_the_last_checkpoint(tiny_cfg, tmp_path):
    cfg = tiny_cfg("trainer.max_steps=6", "save_steps=1", "max_nonfinite_steps=2", POISON,
                   "+callbacks.poison.steps=[3,4,5]")
    with pytest.raises(ConfigError, match=r"2 optimizer steps in a row \(steps 3-4\) had a NaN/Inf loss or gradient "
                                          r"norm.*last complete checkpoint is \S+step000003.ckpt"):
        fit(cfg)
    assert not (tmp_path / "summary.json").exists()


def test_a_nan_on_one_ddp_rank_skips_the_step_on_every_rank(tmp_path_factory, cache_dir):
    """2-process DDP (job 0 of the shared multirun): NaN activations on rank 1 alone in steps 1 and 2.
    Neither rank steps: the step-2 checkpoint holds the pretrained weights exactly and no optimizer
    state; steps 3-4 train on; both skips are logged, and the two ranks end with the same weights."""
    job = ddp_multirun(tmp_path_factory, cache_dir)[0]
    summary = json.loads((job / "summary.json").read_text())
    assert summary["train/nonfinite_skipped_steps"] == 2.0 and summary["global_step"] == 4
    step2 = torch.load(job / "checkpoints" / "step000002.ckpt", weights_only=False)
    assert step2["optimizer_states"][0]["state"] == {}
    pretrained = hf_weights(pretrained_tiny(tmp_path_factory, cache_dir))
    trained = {name: load() for name, load in read_checkpoint(job / "checkpoints" / "step000002.ckpt")[1]}
    assert max_abs_diff(pretrained, {k: v for k, v in trained.items() if k in pretrained}) == 0.0
    assert 0 < max_abs_diff(pretrained, hf_weights(job / "hf")) < float("inf")
    sums = json.loads((job / "fault-weight-sums.json").read_text())
    assert len(sums) == 2 and sums[0] == sums[1]
    with (job / "csv" / "metrics.csv").open() as f:
        logged = [float(row[KEY]) for row in csv.DictReader(f) if row[KEY]]
    assert logged == [1.0, 2.0, 2.0, 2.0]


def test_fp16_loss_scale_skips_are_logged_and_left_to_the_scaler(tiny_cfg, tmp_path):
    """fp16 loss scaling with torch's GradScaler (run here on CPU through Lightning's own fp16 plugin;
    users' fp16 runs are on GPUs): a first scale too large overflows the first steps' gradients, the
    scaler skips those steps and halves the scale each time. The guard logs the scale and the skips,
    and leaves them to the scaler: it counts none itself, and Adam stepped only on the other steps."""
    import functools

    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.plugins.precision import MixedPrecision

    from fulltune.models import load_tokenizer
    from fulltune.module import CausalLMModule
    from fulltune.resilience import NonFiniteGuard

    cfg = tiny_cfg()
    module = CausalLMModule(model=cfg.model, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
                            scheduler=instantiate(cfg.scheduler))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    guard = NonFiniteGuard()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=8, plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
                        callbacks=[guard], logger=CSVLogger(tmp_path, name="", version=""), log_every_n_steps=1,
                        limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, datamodule=instantiate(cfg.data, tokenizer=load_tokenizer(cfg.model), seed=0))

    with (tmp_path / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss_scale")]
    scales = [float(r["train/loss_scale"]) for r in rows]
    skips = [float(r["train/loss_scale_skips"]) for r in rows]
    halvings = sum(b == a / 2 for a, b in zip([2.0**24, *scales[:-1]], scales, strict=True))
    assert 0 < halvings < 8 and skips[-1] == halvings and scales[-1] == 2.0**24 / 2**halvings
    assert guard.skipped == 0 and all(float(r[KEY]) == 0 for r in rows)
    adam_steps = {int(s["step"]) for s in trainer.optimizers[0].state.values()}
    assert adam_steps == {8 - halvings}
