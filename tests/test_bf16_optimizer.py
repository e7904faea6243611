"""bf16-true keeps its updates: the default optimizer rounds stochastically where the weights are bf16."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from torchao.optim import _AdamW

from fulltune.optim import optimizer_for_precision, param_groups, warmup_schedule
from fulltune.preflight import ConfigError

from .conftest import compose_config

LR, STEPS = 2e-5, 50  # each step is ~1/6 of the bf16 ulp at 0.02 (2**-13): round-to-nearest drops all of them


def drift(overrides: list[str], dtype: torch.dtype, tmp_path, cache_dir) -> torch.Tensor:
    """How far 0.02-valued weights move in STEPS steps of a positive gradient, per element."""
    cfg = compose_config([*overrides, f"optimizer.lr={LR}"], tmp_path, cache_dir)
    factory = optimizer_for_precision(cfg.optimizer, cfg.precision.value, "auto")
    weight = torch.nn.Parameter(torch.full((64, 64), 0.02, dtype=dtype))
    start = weight.detach().float().clone()
    optimizer = factory(param_groups([weight], factory.keywords["weight_decay"]))
    generator = torch.Generator().manual_seed(0)
    with torch.compiler.set_stance("force_eager"):  # torchao compiles its step: same math, no minute of compiling
        for _ in range(STEPS):
            weight.grad = (torch.rand(weight.shape, generator=generator) + 0.5).to(dtype)
            optimizer.step()
    return weight.detach().float() - start


def test_stochastic_rounding_moves_bf16_weights_like_fp32_and_plain_adamw_does_not(tmp_path, cache_dir):
    fp32 = drift(["precision=fp32"], torch.float32, tmp_path, cache_dir)
    compensated = drift(["precision=bf16_true"], torch.bfloat16, tmp_path, cache_dir)
    plain = drift(["precision=bf16_true", "optimizer.bf16_compensation=off"], torch.bfloat16, tmp_path, cache_dir)
    assert fp32.mean() == pytest.approx(-LR * STEPS, rel=0.05)
    assert (compensated.mean() - fp32.mean()).abs() < 0.1 * fp32.mean().abs()
    assert (compensated != 0).float().mean() > 0.9
    assert torch.count_nonzero(plain) == 0


@pytest.mark.parametrize(
    ("overrides", "compensated"),
    [
        (["precision=bf16_true"], True),
        (["precision=bf16_true", "strategy=fsdp"], True),  # torchao steps FSDP2's bf16 DTensor shards
        (["precision=bf16_true", "strategy=deepspeed_zero2"], False),  # DeepSpeed steps fp32 master weights
        (["precision=bf16_mixed"], False),
        (["precision=fp32"], False),
    ],
)
def test_default_compensates_exactly_where_weights_are_bf16(overrides, compensated, tmp_path, cache_dir):
    cfg = compose_config(overrides, tmp_path, cache_dir)
    factory = optimizer_for_precision(cfg.optimizer, cfg.precision.value, instantiate(cfg.strategy))
    assert cfg.optimizer.bf16_compensation == ("stochastic_rounding" if compensated else "off")  # as config.yaml
    assert "bf16_compensation" not in factory.keywords
    assert factory.func is (_AdamW if compensated else torch.optim.AdamW)
    optimizer = factory([torch.nn.Parameter(torch.zeros(2, 2))])
    assert float(optimizer.defaults["lr"]) == cfg.optimizer.lr
    scheduler = warmup_schedule(optimizer, total_steps=10, warmup_steps=4)  # torchao keeps lr as a tensor
    optimizer.step()
    scheduler.step()
    assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(cfg.optimizer.lr / 4)


def test_the_choice_is_said_once(tmp_path, cache_dir, caplog):
    for choice, said in [("auto", "torchao AdamW with bf16 stochastic rounding"),
                         ("off", "updates under half a bf16 ulp are lost")]:
        cfg = compose_config(["precision=bf16_true", f"optimizer.bf16_compensation={choice}"], tmp_path, cache_dir)
        caplog.clear()
        optimizer_for_precision(cfg.optimizer, cfg.precision.value, "auto")
        messages = [record.getMessage() for record in caplog.records]
        assert len(messages) == 1 and said in messages[0]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["optimizer.bf16_compensation=kahan"], "use one of auto, stochastic_rounding, off"),
        (["precision=fp32", "optimizer.bf16_compensation=stochastic_rounding"], "needs bf16 weights"),
        (["precision=bf16_true", "strategy=deepspeed_zero2", "optimizer.bf16_compensation=stochastic_rounding"],
         "DeepSpeed"),
        (["precision=bf16_true", "optimizer._target_=torch.optim.SGD"], "only AdamW has a stochastic-rounding"),
        (["precision=bf16_true", "+optimizer.amsgrad_v2=true"], "takes no amsgrad_v2"),
    ],
)
def test_combinations_that_would_lose_updates_are_refused_with_the_fix(overrides, match, tmp_path, cache_dir):
    cfg = compose_config(overrides, tmp_path, cache_dir)
    with pytest.raises(ConfigError, match=match):
        optimizer_for_precision(cfg.optimizer, cfg.precision.value, instantiate(cfg.strategy))
