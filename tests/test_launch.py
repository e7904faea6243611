"""What a run settles before launch: devices, precision, the demo job's caps, intervals, the memory gate."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from omegaconf import open_dict

from fulltune.launch import auto_precision, check_memory, resolve_hardware
from fulltune.preflight import ConfigError
from fulltune.train import fit, optimizer_step_intervals

from .conftest import REPO, compose_config


def test_headline_command_has_no_demo_cap_and_resolves_devices_and_precision(tmp_path, cache_dir):
    """`python train.py strategy=fsdp model=llama2_7b`: the trainer's own epochs, every device, auto
    precision (one process and fp32 on this CPU machine)."""
    cfg = compose_config(["strategy=fsdp", "model=llama2_7b"], tmp_path, cache_dir)
    assert (cfg.trainer.max_steps, cfg.trainer.max_epochs, cfg.eval.task.num_examples) == (-1, 1, 64)
    assert (cfg.trainer.devices, cfg.precision.value) == ("auto", "auto")
    resolve_hardware(cfg)
    assert (cfg.trainer.devices, cfg.precision.value, cfg.precision.tf32) == (1, "32-true", False)


def test_the_bare_command_is_still_the_demo_job(tmp_path, cache_dir):
    demo = compose_config([], tmp_path, cache_dir)
    assert (demo.trainer.max_steps, demo.eval.task.num_examples) == (10, 32)
    assert demo.optimizer.lr == 1e-4  # 5x the method's own LR: LoRA's is 5x its 2e-4
    assert compose_config(["finetune=lora"], tmp_path, cache_dir).optimizer.lr == pytest.approx(1e-3)
    for other in (["model=tiny"], ["data=alpaca"], ["experiment=llama2_7b_full"]):
        assert compose_config(other, tmp_path, cache_dir).trainer.max_steps == -1, other


def test_an_explicit_precision_wins(tmp_path, cache_dir):
    cfg = compose_config(["precision=bf16_true"], tmp_path, cache_dir)
    resolve_hardware(cfg)
    assert cfg.precision.value == "bf16-true" and cfg.precision.tf32 is False


@pytest.mark.parametrize(("gpu", "strategy", "expected"), [
    ("H100-80GB", "ddp", ("bf16-mixed", True)),
    ("A10G", "fsdp", ("bf16-mixed", True)),
    ("T4", "ddp", ("16-mixed", False)),
    ("V100-32GB", "fsdp", ("32-true", False)),  # FSDP2 in Lightning has no fp16 loss scaling
])
def test_auto_precision_follows_compute_capability(tmp_path, cache_dir, gpu, strategy, expected):
    """Dry runs resolve `auto` for the GPU they plan for; real runs for the GPU they find."""
    trainer = compose_config([], tmp_path, cache_dir).trainer
    assert auto_precision(trainer, strategy, plan_for=gpu) == expected
    assert auto_precision(trainer, strategy) == ("32-true", False)  # this machine: CPU


def test_val_check_interval_counts_optimizer_steps(tmp_path, cache_dir):
    cfg = compose_config(["experiment=llama2_7b_full"], tmp_path, cache_dir)
    assert optimizer_step_intervals(cfg.trainer) == {"val_check_interval": 500 * 8, "check_val_every_n_epoch": None}
    with open_dict(cfg):
        cfg.trainer.val_check_interval = 0.5  # a fraction of an epoch is Lightning's own
    assert optimizer_step_intervals(cfg.trainer) == {}


def test_the_seed_card_recipe_runs_on_data_smaller_than_its_intervals(tmp_path, cache_dir):
    """`experiment=llama2_7b_full` (evaluate every 500 steps, accumulate 8) on the tiny model and the
    small demo data: Lightning would refuse a val_check_interval longer than the epoch."""
    cfg = compose_config(["experiment=llama2_7b_full", "model=tiny", "precision=fp32", "trainer.accelerator=cpu",
                          "trainer.max_epochs=1", "data.batch_size=8", "data.max_length=128",
                          "eval.task.num_examples=4", "callbacks.progress_bar=null", "export=false",
                          "+trainer.limit_train_batches=16"],  # 2 optimizer steps: still far below 500
                         tmp_path, cache_dir)
    resolve_hardware(cfg)
    summary = fit(cfg)
    assert summary["global_step"] > 0


def test_mixed_precision_with_clipping_steps_foreach_not_fused(tiny_cfg):
    """Lightning's mixed-precision plugin refuses to clip gradients for a fused AdamW step, the
    default optimizer: under bf16-mixed (what `precision: auto` picks on a GPU) the step is foreach."""
    cfg = tiny_cfg("precision=bf16_mixed", "trainer.max_steps=2", "eval.forgetting=null", "eval.task=null",
                   "export=false")
    resolve_hardware(cfg)
    assert cfg.trainer.gradient_clip_val > 0 and not cfg.optimizer.fused and cfg.optimizer.foreach
    assert fit(cfg)["global_step"] == 2


def test_a_run_that_cannot_fit_stops_in_seconds_with_the_plan():
    """70B from config on this 24 GB machine would try to allocate ~1 TB; the gate stops it first."""
    start = time.time()
    result = subprocess.run([sys.executable, "train.py", "model=llama2_70b", "model.source=config"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "does not fit in memory" in result.stderr and "Traceback" not in result.stderr
    assert "CPU RAM available" in result.stderr and "alternatives" in result.stderr
    assert time.time() - start < 60


def test_plan_check_warn_and_off_let_the_run_go_on(tmp_path, cache_dir, caplog):
    cfg = compose_config(["model=llama2_70b", "model.source=config", "plan_check=warn"], tmp_path, cache_dir)
    resolve_hardware(cfg)
    check_memory(cfg)  # warns, does not raise
    assert "does not fit" in caplog.text
    with open_dict(cfg):
        cfg.plan_check = "stop"
    with pytest.raises(ConfigError, match="does not fit in memory"):
        check_memory(cfg)
    with open_dict(cfg):
        cfg.plan_check = "maybe"
    with pytest.raises(ConfigError, match="stop, warn, off"):
        check_memory(cfg)
