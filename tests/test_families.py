"""A user's own model, of any family, is trained and exported as its own files describe it.

Tiny random models of seven architecture families (tests/families.py) are trained with `model=hf`
on one process in-process and on 2 processes under FSDP2 (one multirun over all families) and
ZeRO-3 (Gemma 2 and the MoE): the losses of the first steps equal the single-process ones, every
export has the source's config.json and exactly the tensors `save_pretrained` writes for the
trained weights, and the reloaded export computes the same logits. `FULLTUNE_ALL_FAMILIES=1` runs
every family under DDP, FSDP2 and ZeRO-3 (docs/benchmarks.md has that table; too slow for the suite).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from fulltune.launch import plan_settings
from fulltune.models import load_tokenizer, resolve_architecture
from fulltune.train import fit

from .conftest import compose_config
from .families import FAMILIES, save_family
from .strategy_runs import TOLERANCE, hf_weights, root, run_command, step_losses

# 2 optimizer steps of 8 rows per rank (16 on one process), prompts masked; no evaluators, no checkpoints.
FAMILY_RUN = [
    "model=hf",
    "~experiment",
    "trainer.accelerator=cpu",
    "trainer.max_steps=2",
    "trainer.enable_progress_bar=false",
    "callbacks.progress_bar=null",
    "callbacks.model_checkpoint=null",
    "callbacks.early_stopping=null",
    "eval.task=null",
    "eval.forgetting=null",
    "+trainer.limit_val_batches=0",
    "optimizer.lr=3e-3",
    "+callbacks.step_loss._target_=tests.strategy_runs.StepLoss",
]
NOT_COMPARED = {"dtype", "torch_dtype", "use_cache", "transformers_version"}  # the export sets these


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory, cache_dir) -> dict[str, Path]:
    """Every family saved as an HF dir, with the tiny tokenizer."""
    tokenizer = load_tokenizer(compose_config(["model=tiny"], root(tmp_path_factory) / "compose", cache_dir).model)
    tokenizer_dir = root(tmp_path_factory) / "tiny-tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    return {name: save_family(name, root(tmp_path_factory) / "families" / name, tokenizer_dir) for name in FAMILIES}


@pytest.fixture(scope="session")
def single_runs(family_dirs, tmp_path_factory, cache_dir) -> dict[str, Path]:
    """Each family trained in-process on one process with both ranks' rows."""
    out = root(tmp_path_factory) / "families-single"
    return {name: (fit(compose_config([*FAMILY_RUN, f"model.pretrained={path}", "data.batch_size=16"],
                                      out / name, cache_dir)), out / name)[1]
            for name, path in family_dirs.items()}


# Every family under FSDP2 (the path that builds the model from its config on the meta device and
# loads shards itself); under ZeRO-3 (transformers' own partitioned loading, in one multirun: its
# second job once hung, then failed on ZeRO-3's process-wide ids) Gemma 2, whose soft-capped head
# gathers its weight inside the loss, and the MoE, whose stored tensors transformers converts. DDP
# loads with `from_pretrained` on every rank, as one process does.
TWO_PROCESS = {"fsdp": list(FAMILIES), "deepspeed_zero3": ["gemma2", "qwen3_moe"]}
if os.environ.get("FULLTUNE_ALL_FAMILIES") == "1":
    TWO_PROCESS = {strategy: list(FAMILIES) for strategy in ("ddp", "fsdp", "deepspeed_zero3")}


def multirun(strategy: str, family_dirs, tmp_path_factory, cache_dir) -> dict[str, Path]:
    """One `train.py -m` of the strategy's families on 2 processes; each family's job dir."""
    out = root(tmp_path_factory) / f"families-{strategy}"
    names = TWO_PROCESS[strategy]
    if not (out / "sweep").is_dir():
        run_command([sys.executable, "train.py", "-m", *FAMILY_RUN, f"strategy={strategy}", "trainer.devices=2",
                     "data.batch_size=8", "model.pretrained=" + ",".join(str(family_dirs[n]) for n in names),
                     f"paths.cache_dir={cache_dir}", f"paths.log_dir={out / 'logs'}",
                     f"hydra.sweep.dir={out / 'sweep'}"], timeout=900)
    return {name: out / "sweep" / f"{job}_{name}-full" for job, name in enumerate(names)}


def config_json(directory: Path) -> dict:
    return {k: v for k, v in json.loads((directory / "config.json").read_text()).items() if k not in NOT_COMPARED}


def assert_exported_as_saved(source: Path, export: Path, tmp_path: Path) -> torch.Tensor:
    """The export's config.json is the source's, and its tensors are exactly what `save_pretrained`
    writes for the weights it holds (loaded by transformers, saved again); its logits on a fixed input."""
    from transformers import AutoModelForCausalLM

    assert config_json(export) == config_json(source)
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    model.save_pretrained(tmp_path / export.parent.name)
    saved, exported = hf_weights(tmp_path / export.parent.name), hf_weights(export)
    assert saved.keys() == exported.keys() == hf_weights(source).keys()
    assert all(torch.equal(saved[k], exported[k]) for k in saved)
    with torch.no_grad():
        return model(input_ids=torch.arange(3, 40).view(1, -1)).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_process_trains_and_exports_the_model_as_its_files_describe_it(family, family_dirs, single_runs,
                                                                           tmp_path):
    run = single_runs[family]
    steps = step_losses(run)["steps"]
    assert len(steps) == 2 and all(3.0 < loss < 9.0 for loss in steps)  # ~ln 512: a working random model
    resolved = json.loads((run / "summary.json").read_text())
    assert resolved["model"] == family  # model=hf: the run is named after the directory
    generation = json.loads((run / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ([0, 2] if family == "llama31" else 2)  # the model's own EOS ids kept
    assert_exported_as_saved(family_dirs[family], run / "hf", tmp_path)


@pytest.mark.parametrize("strategy", list(TWO_PROCESS))
def test_two_processes_train_every_family_like_one_process(strategy, family_dirs, single_runs, tmp_path_factory,
                                                           cache_dir, tmp_path):
    jobs = multirun(strategy, family_dirs, tmp_path_factory, cache_dir)
    for family, job in jobs.items():
        single = single_runs[family]
        gap = max(abs(a - b) for a, b in zip(step_losses(single)["steps"], step_losses(job)["steps"], strict=True))
        logits = assert_exported_as_saved(family_dirs[family], job / "hf", tmp_path)
        reference = assert_exported_as_saved(family_dirs[family], single / "hf", tmp_path / "single")
        logit_gap = (logits - reference).abs().max().item()
        print(f"{strategy} {family}: max |loss - 1 process| = {gap:.1e}, max |reloaded logits - 1 process| = "
              f"{logit_gap:.1e}")
        assert gap <= TOLERANCE and logit_gap <= 1e-4, family


def test_the_weights_config_is_the_architecture_and_a_differing_yaml_is_named(family_dirs, tmp_path, cache_dir,
                                                                               caplog):
    """`model=tiny` (a Llama YAML) pointed at Llama 3.1 weights whose config.json is written as Meta's
    are (`rope_scaling` + `rope_theta`, transformers 4's keys) trains the weights' architecture."""
    from fulltune.models import architecture_config

    weights = tmp_path / "Llama-3.1-style"
    weights.mkdir()
    config = json.loads((family_dirs["llama31"] / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope)
    (weights / "config.json").write_text(json.dumps(config))
    (weights / "model.safetensors").symlink_to(family_dirs["llama31"] / "model.safetensors")
    cfg = compose_config(["model=tiny", "model.source=pretrained", f"model.pretrained={weights}"], tmp_path, cache_dir)
    with caplog.at_level(logging.WARNING, logger="fulltune.models"):
        resolve_architecture(cfg.model)
    assert "rope_parameters" in caplog.text and "tie_word_embeddings: True -> False" in caplog.text
    assert cfg.model.config.rope_scaling.rope_type == "llama3" and cfg.model.config_from == str(weights / "config.json")
    built = architecture_config(cfg.model)
    assert built.rope_parameters["rope_type"] == "llama3" and built.rope_parameters["rope_theta"] == 500000.0
    arch, _ = plan_settings(cfg)
    assert arch.total == sum(t.numel() for t in hf_weights(family_dirs["llama31"]).values())  # untied: lm_head counted


def test_a_dry_run_plans_a_dir_that_holds_only_config_json(family_dirs, tmp_path, cache_dir, capsys):
    """No weights read: the config.json alone plans exactly (the MoE's parameters counted as built)."""
    from fulltune.train import train

    only_config = tmp_path / "Qwen3-MoE-config-only"
    only_config.mkdir()
    (only_config / "config.json").write_text((family_dirs["qwen3_moe"] / "config.json").read_text())
    cfg = compose_config(["model=hf", f"model.pretrained={only_config}", "dry_run=true", "~experiment"],
                         tmp_path, cache_dir)
    assert cfg.run_name == "Qwen3-MoE-config-only-full"
    train(cfg)
    total = sum(t.numel() for t in hf_weights(family_dirs["qwen3_moe"]).values())
    assert f"{total:,} parameters" in capsys.readouterr().out


def test_model_hf_without_weights_is_a_message(tmp_path, cache_dir):
    from fulltune.models import ModelSpecError

    cfg = compose_config(["model=hf", "~experiment"], tmp_path, cache_dir)
    with open_dict(cfg):
        cfg.dry_run = True
    with pytest.raises(ModelSpecError, match="no architecture to build: model.pretrained is not set"):
        resolve_architecture(cfg.model, download=False)
