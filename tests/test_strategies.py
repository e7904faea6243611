"""Every strategy is a config choice that trains exactly like DDP, on 2 CPU processes.

Measured here (tiny model, fp32, 4 steps x 2 accumulated micro-batches, 2 processes): the exact
per-step losses and the final weights of fsdp, fsdp_offload (+ activation checkpointing) and
deepspeed_zero1/2/3 match ddp to ~1e-7 (checked at 1e-5), ddp (2 x 8 rows) matches one process
(16 rows), and 4 x 4 accumulated rows match one batch of 16 with variable-length masked examples.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy

from fulltune.module import CausalLMModule
from fulltune.preflight import ConfigError, check_strategy, preflight
from fulltune.strategies import DeepSpeedStrategy, FSDP2Strategy, optimizer_for
from fulltune.train import fit

from .conftest import compose_config
from .strategy_runs import (
    EQUAL_RUN,
    TOLERANCE,
    assert_same_training,
    from_pretrained,
    single_device_run,
    step_losses,
)

# (strategy, extra overrides): fsdp_offload also recomputes activations (non-reentrant checkpointing)
SHARDED = [("fsdp",), ("fsdp_offload", "model.gradient_checkpointing=true"), ("deepspeed_zero1",),
           ("deepspeed_zero2",), ("deepspeed_zero3",)]


# -- proven equal -------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", SHARDED, ids=[s[0] for s in SHARDED])
def test_sharded_strategy_trains_exactly_like_ddp(strategy, run):
    ddp, other = run("ddp"), run(*strategy)
    assert len(step_losses(other)["steps"]) == 4
    # the end-of-run export (through the sharded checkpoint for these strategies) holds the same weights
    assert_same_training(ddp, other, strategy[0])
    summary = json.loads((other / "summary.json").read_text())
    assert summary["global_step"] == 4 and summary["params_total"] == 106_816


def test_ddp_on_two_processes_equals_one_process_with_twice_the_batch(run, tmp_path_factory, cache_dir):
    assert_same_training(run("ddp"), single_device_run(tmp_path_factory, cache_dir), "1 process x 16 rows")


def test_accumulated_micro_batches_equal_one_big_batch(tmp_path, tmp_path_factory, cache_dir):
    """4 x 4 rows accumulated == 16 rows at once, on examples of very different lengths whose prompts
    are masked: the loss is divided by the label tokens of the whole optimizer step."""
    rng = torch.Generator().manual_seed(0)
    words = "the date of the year in digits please write it out for me now".split()

    def text(low: int, high: int) -> str:
        n = int(torch.randint(low, high, (), generator=rng))
        return " ".join(words[int(i)] for i in torch.randint(len(words), (n,), generator=rng))

    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"instruction": text(2, 30), "output": text(1, 40)}) + "\n" for _ in range(64)))
    toy = [f"data.task=[{{name:toy,path:{data},val_path:{data},format:alpaca,template:instruction}}]",
           "data.replay_ratio=0.0", "trainer.max_steps=3"]
    base = [*EQUAL_RUN, *from_pretrained(tmp_path_factory, cache_dir), *toy]
    for name, batch, accumulate in (("micro", 4, 4), ("whole", 16, 1)):
        overrides = [*base, f"data.batch_size={batch}", f"trainer.accumulate_grad_batches={accumulate}"]
        summary = fit(compose_config(overrides, tmp_path / name, cache_dir))
    assert summary["train/nonpad_fraction"] < 0.9  # padded rows: the examples really differ in length
    assert_same_training(tmp_path / "whole", tmp_path / "micro", "4 x 4 rows accumulated")
    # the check has teeth: averaging the micro-batch means instead would be off by far more
    micro_means, whole = step_losses(tmp_path / "micro")["micro_means"], step_losses(tmp_path / "whole")["steps"]
    naive = [sum(micro_means[i : i + 4]) / 4 for i in range(0, 12, 4)]
    assert max(abs(a - b) for a, b in zip(naive, whole, strict=True)) > 100 * TOLERANCE


# -- configs, derived settings and checks ----------------------------------------------------------------


STRATEGY_KINDS = {
    "auto": str, "ddp": DDPStrategy, "fsdp": FSDP2Strategy, "fsdp_offload": FSDP2Strategy,
    "deepspeed_zero1": DeepSpeedStrategy, "deepspeed_zero2": DeepSpeedStrategy,
    "deepspeed_zero2_offload": DeepSpeedStrategy, "deepspeed_zero3": DeepSpeedStrategy,
    "deepspeed_zero3_offload": DeepSpeedStrategy,
}


@pytest.mark.parametrize("name", STRATEGY_KINDS)
def test_every_strategy_config_builds_its_strategy(name, tmp_path, cache_dir):
    cfg = compose_config([f"strategy={name}", "data.batch_size=3"], tmp_path, cache_dir)
    strategy = instantiate(cfg.strategy)
    assert isinstance(strategy, STRATEGY_KINDS[name])
    if isinstance(strategy, FSDP2Strategy):
        assert strategy.cpu_offload == name.endswith("offload")
    if isinstance(strategy, DeepSpeedStrategy):
        zero = strategy.config["zero_optimization"]
        assert zero["stage"] == int(name.split("zero")[1][0])
        assert ("offload_optimizer" in zero) == name.endswith("offload")
        assert ("offload_param" in zero) == (name == "deepspeed_zero3_offload")
        assert strategy.config["train_micro_batch_size_per_gpu"] == 3


@pytest.mark.parametrize(("precision", "section"), [("bf16_mixed", "bf16"), ("fp16_mixed", "fp16"), ("fp32", None)])
def test_deepspeed_settings_come_from_the_hydra_config(precision, section, tmp_path, cache_dir):
    """Accumulation, clipping, micro-batch and the precision section are derived, never written twice;
    DeepSpeed itself accepts the result."""
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = compose_config(["strategy=deepspeed_zero3_offload", f"precision={precision}", "data.batch_size=3",
                          "trainer.accumulate_grad_batches=4", "trainer.gradient_clip_val=0.5"], tmp_path, cache_dir)
    strategy = instantiate(cfg.strategy)
    trainer = Trainer(strategy=strategy, precision=cfg.precision.value, accelerator="cpu", devices=1,
                      accumulate_grad_batches=4, gradient_clip_val=0.5, logger=False)
    module = CausalLMModule(model=cfg.model, optimizer=instantiate(cfg.optimizer))
    module.trainer = trainer
    strategy.connect(module)
    strategy._init_config_if_needed()
    config = strategy.config
    assert config["gradient_accumulation_steps"] == 4 and config["gradient_clipping"] == 0.5
    assert config["train_micro_batch_size_per_gpu"] == 3
    for name in ("bf16", "fp16"):
        assert (name in config) == (name == section)
    if section == "fp16":
        assert config["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert DeepSpeedConfig(config).train_batch_size == 12


def test_offload_swaps_in_deepspeed_cpu_adam_with_the_same_hyperparameters(tmp_path, cache_dir):
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    cfg = compose_config(["strategy=deepspeed_zero2_offload", "optimizer.lr=1e-4"], tmp_path, cache_dir)
    adamw = instantiate(cfg.optimizer)
    offloaded = optimizer_for(instantiate(cfg.strategy), adamw)
    assert offloaded.func is DeepSpeedCPUAdam and offloaded.keywords["adamw_mode"] is True
    for key in ("lr", "weight_decay", "eps", "betas"):
        assert offloaded.keywords[key] == adamw.keywords[key]
    assert optimizer_for(instantiate(compose_config(["strategy=fsdp_offload"], tmp_path, cache_dir).strategy),
                         adamw) is adamw
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    with pytest.raises(ConfigError, match="Adam/AdamW"):
        optimizer_for(instantiate(cfg.strategy), sgd)


def test_fsdp_shards_one_unit_per_decoder_layer(tmp_path, cache_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from fulltune.models import build_model

    model = build_model(compose_config(["model=tiny"], tmp_path, cache_dir).model)
    strategy = FSDP2Strategy()
    with pytest.raises(ConfigError, match="_no_split_modules"):
        strategy.shard(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        strategy._device_mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
        strategy.shard(model)
        units = [name for name, m in model.named_modules() if isinstance(m, FSDPModule)]
        assert units == ["", "model.layers.0", "model.layers.1"]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("check", "overrides", "message"),
    [
        (check_strategy, ["strategy=fsdp", "precision=fp16_mixed"], "precision=bf16_mixed"),
        (check_strategy, ["strategy=deepspeed_zero3", "finetune=lora"], "use strategy=ddp"),
        (preflight, ["strategy=deepspeed_zero2", "precision=fp16_mixed"], "needs a CUDA GPU.*precision=fp32"),
        (preflight, ["data.packing=true", "model.attn_implementation=flash_attention_2"], "attend across examples"),
    ],
)
def test_impossible_combinations_fail_before_anything_loads(check, overrides, message, tmp_path, cache_dir):
    with pytest.raises(ConfigError, match=message):
        check(compose_config(overrides, tmp_path, cache_dir))


def test_bf16_needs_real_sm80_not_is_bf16_supported(tmp_path, cache_dir, monkeypatch):
    """A T4 (sm75) says `is_bf16_supported()` (emulated); the check reads the compute capability."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    with pytest.raises(ConfigError, match="sm80"):
        preflight(compose_config(["precision=bf16_mixed"], tmp_path, cache_dir))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    preflight(compose_config(["precision=bf16_mixed"], tmp_path, cache_dir))
