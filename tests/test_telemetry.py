"""Telemetry counts what the steps really did: FLOPs as torch's own counter sees them, tokens as the
data module serves them, time split into parts that add up, totals that survive a resume."""

from __future__ import annotations

import csv
import itertools
import json
import sys

import pytest
import torch
from hydra.utils import instantiate
from torch.utils.flop_counter import FlopCounterMode

from fulltune.memory import describe
from fulltune.models import load_tokenizer
from fulltune.module import CausalLMModule
from fulltune.telemetry import model_flops, peak_tflops
from fulltune.train import fit

from .strategy_runs import run_command, train_command


@pytest.mark.parametrize("chunk_tokens", [1024, 0])
def test_model_flops_equal_torch_flop_counter(tiny_cfg, chunk_tokens):
    """Eager attention makes every FLOP a matmul torch counts: the linear layers and LM head (`mm`,
    `addmm`) exactly as the formula says, attention (`bmm`) twice its causal half."""
    cfg = tiny_cfg("model.attn_implementation=eager", f"model.loss_chunk_tokens={chunk_tokens}")
    module = CausalLMModule(model=cfg.model, optimizer=None)
    module.configure_model()
    batch_size, length = 2, 32
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.model.config.vocab_size, (batch_size, length), generator=generator)
    labels = ids.clone()
    labels[:, :10] = -100  # a prompt: no loss, and (chunked) no LM head there
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(length).repeat(batch_size, 1)}
    with FlopCounterMode(display=False) as counter:
        loss_sum, n_labels = module.token_loss_sum(batch)
        loss_sum.backward()
    counted = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}

    arch = describe(module.model)
    tokens = batch_size * length
    attention = 6 * arch.layers * arch.q_dim * batch_size * length**2
    gemms = counted["aten.mm"] + counted.get("aten.addmm", 0)  # the chunked head accumulates its weight's grad
    assert gemms == model_flops(arch, tokens, int(n_labels), batch_size * length**2, chunk_tokens > 0) - attention
    assert counted["aten.bmm"] == 2 * attention


def test_known_gpus_have_their_dense_bf16_peak():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA GeForce GTX 1080") is None


def test_accounting_of_a_resumed_run_equals_the_uninterrupted_one(tiny_cfg, tmp_path):
    """8 steps at once vs 4 + a resume to 8: the same tokens (those the data module serves for 8
    steps), time parts that add up to no more than the wall, a progress bar over optimizer steps."""
    common = ("trainer.accumulate_grad_batches=2", "trainer.log_every_n_steps=2", "eval.forgetting=null",
              "save_steps=4", "export=false")

    def run(name: str, *extra: str) -> dict:
        cfg = tiny_cfg(*common, *extra)
        cfg.paths.output_dir = str(tmp_path / name)
        return fit(cfg)

    whole = run("whole", "trainer.enable_progress_bar=true",
                "callbacks.progress_bar={_target_:fulltune.console.StepProgressBar}")
    run("first", "trainer.max_steps=4")
    resumed = run("first", f"resume={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}")

    cfg = tiny_cfg(*common)
    datamodule = instantiate(cfg.data, tokenizer=load_tokenizer(cfg.model), seed=cfg.seed)
    datamodule.setup("fit")
    served = list(itertools.islice(datamodule.train_dataloader(), 16))  # 8 steps x 2 micro-batches
    tokens = sum(float(b["nonpad_fraction"]) * b["input_ids"].numel() for b in served)
    labels = sum(int((b["labels"][:, 1:] != -100).sum()) for b in served)
    for summary in (whole, resumed):
        assert summary["global_step"] == 8
        assert summary["tokens_seen"] == round(tokens) and summary["label_tokens_seen"] == labels
        parts = summary["time_s"]  # rounded to 0.01 s
        train_s = (parts["train"] - 0.005, parts["train"] + 0.005)
        assert tokens / train_s[1] <= summary["tokens_per_s"] <= tokens / train_s[0]  # over training time only
        assert all(v >= 0 for v in parts.values())
        assert parts["setup"] + parts["train"] + parts["evaluation"] + parts["checkpoint"] <= parts["wall"] + 0.05
        assert parts["checkpoint"] > 0 and parts["evaluation"] > 0
    logged = list(csv.DictReader((tmp_path / "whole" / "csv" / "metrics.csv").open()))
    assert {int(r["step"]) for r in logged if r.get("perf/tokens_per_s")} == {2, 4, 6, 8}


def test_the_checkpoint_written_when_training_ends_is_checkpoint_time(tiny_cfg, tmp_path):
    """With no save during training, ModelCheckpoint writes last.ckpt in `on_train_end`, after the step
    totals: its seconds are the checkpoint's, not the evaluation's."""
    cfg = tiny_cfg("trainer.max_steps=2", "eval.forgetting=null", "eval.task=null", "export=false")
    cfg.paths.output_dir = str(tmp_path / "run")
    parts = fit(cfg)["time_s"]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert parts["checkpoint"] > 0
    assert parts["setup"] + parts["train"] + parts["evaluation"] + parts["checkpoint"] <= parts["wall"] + 0.05


def test_console_prints_each_event_once_with_a_header_and_a_closing_table(tmp_path, cache_dir):
    out = run_command([sys.executable, *train_command(tmp_path / "run", cache_dir, [
        "model=tiny", "trainer.accelerator=cpu", "trainer.max_steps=4", "trainer.val_check_interval=4",
        "eval.task.num_examples=4", "eval.forgetting=null"])])
    assert out.count("Seed set to 1234") == 1
    for noise in ("Tip:", "set_vital", "LeafSpec", "GPU available", "Writing model shards", "Loading weights",
                  "Setting accelerator", "fontManager", "cutlass", "_pytree"):
        assert noise not in out
    assert "tiny · " in out and "parameters" in out and "× CPU" in out  # the header
    (bar,) = [line for line in out.splitlines() if "4/4" in line]  # the bar counts the run's optimizer steps
    assert "train/loss" in bar and "val/task_loss" in bar  # and its metrics stay on its line in a log file
    assert "tokens/s (training)" in out and "task/loss" in out  # the closing table
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["time_s"]["train"] > 0


def test_library_lines_are_dropped_by_source_and_shown_with_debug(caplog):
    """What `quiet_libraries` drops by logger or message comes back with debug=true."""
    import logging
    import warnings

    import transformers

    from fulltune.console import quiet_libraries

    lines = [("DeepSpeed", logging.WARNING, "Setting accelerator to CPU. If you have GPU or other accelerator..."),
             ("matplotlib.font_manager", logging.INFO, "generated new fontManager"),
             ("torchao", logging.WARNING, "Failed to load _C_cutlass_90a.abi3.so"),
             ("DeepSpeed", logging.WARNING, "a DeepSpeed warning about the run")]

    def shown() -> list[str]:
        caplog.clear()
        for name, level, message in lines:
            logger, own = logging.getLogger(name), []
            if not logger.propagate:  # DeepSpeed's, once deepspeed is imported
                own = [caplog.handler]
                logger.addHandler(caplog.handler)
            logger.log(level, message)
            for handler in own:
                logger.removeHandler(handler)
        return [r.getMessage() for r in caplog.records]

    # Python warnings, raised where the libraries raise them (optimizer=adamw8bit: torch's AOT autograd cache on
    # torchao's states, Lightning's lr_monitor on torchao's tensor LR), and one about the run
    raised = [("OptimState8bit does not implement _stable_hash_for_caching. For PT2-compatible tensor subclasses...",
               "torch._functorch._aot_autograd.autograd_cache"),
              ("To copy construct from a tensor, it is recommended to use sourceTensor.detach().clone()...",
               "lightning.pytorch.callbacks.lr_monitor"),
              ("a Lightning warning about the run", "lightning.pytorch.trainer.trainer")]

    def warned(debug: bool) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            quiet_libraries(debug=debug)
            for message, module in raised:
                warnings.warn_explicit(message, UserWarning, module.replace(".", "/") + ".py", 1, module=module)
        return [str(w.message) for w in caught]

    with caplog.at_level(logging.INFO):
        try:
            quiet_libraries()
            assert shown() == ["a DeepSpeed warning about the run"]
            assert not transformers.utils.logging.is_progress_bar_enabled()
            assert warned(debug=False) == ["a Lightning warning about the run"]
            quiet_libraries(debug=True)
            assert shown() == [message for _, _, message in lines]
            assert transformers.utils.logging.is_progress_bar_enabled()
            assert warned(debug=True) == [message for message, _ in raised]
        finally:
            quiet_libraries()
