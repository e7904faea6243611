"""torchao's 8-bit / 4-bit / fp8 AdamW: chosen by `optimizer=`, stochastic rounding under bf16-true,
and checkpoints that resume exactly (their quantized states are tensor subclasses)."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from fulltune.optim import optimizer_for_precision, optimizer_keywords
from fulltune.train import fit

from .conftest import compose_config
from .strategy_runs import EXACT, hf_weights, max_abs_diff


@pytest.mark.parametrize("name, cls", [("adamw8bit", "AdamW8bit"), ("adamw4bit", "AdamW4bit"),
                                       ("adamw_fp8", "AdamWFp8")])
@pytest.mark.parametrize("precision, rounding", [("bf16_true", True), ("fp32", False)])
def test_low_bit_adamw_rounds_stochastically_exactly_where_weights_are_bf16(name, cls, precision, rounding,
                                                                         tmp_path, cache_dir):
    cfg = compose_config([f"optimizer={name}", f"precision={precision}"], tmp_path, cache_dir)
    factory = optimizer_for_precision(cfg.optimizer, cfg.precision.value, instantiate(cfg.strategy))
    optimizer = factory([torch.nn.Parameter(torch.zeros(64, 64))])
    assert type(optimizer).__name__ == cls and optimizer.bf16_stochastic_round is rounding
    assert optimizer_keywords(factory)["weight_decay"] == cfg.optimizer.weight_decay


def test_a_run_with_8bit_states_resumes_exactly(tmp_path, cache_dir):
    """Lightning loads checkpoints with a map_location function, with which torch cannot rebuild
    torchao's state subclasses: fulltune saves them as plain tensors (optim.with_plain_state)."""
    run = ["model=tiny", "trainer.accelerator=cpu", "trainer.max_steps=4", "trainer.enable_progress_bar=false",
           "callbacks.progress_bar=null", "eval.task=null", "eval.forgetting=null", "optimizer=adamw8bit",
           "optimizer.lr=3e-3", "save_steps=2", "data.batch_size=8"]
    with torch.compiler.set_stance("force_eager"):  # torchao compiles its step: same math, no compiling
        fit(compose_config(run, tmp_path / "whole", cache_dir))
        checkpoint = tmp_path / "whole" / "checkpoints" / "step000002.ckpt"
        fit(compose_config([*run, f"resume={checkpoint}"], tmp_path / "resumed", cache_dir))
    assert max_abs_diff(hf_weights(tmp_path / "whole" / "hf"), hf_weights(tmp_path / "resumed" / "hf")) <= EXACT
