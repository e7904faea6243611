"""The whole path on the tiny model: fit, checkpoint, summary, config, HF export equal to training."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import distributions

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from fulltune.module import CausalLMModule
from fulltune.safe_load import load_checkpoint_file
from fulltune.train import fit

from .conftest import REPO


def test_tiny_run_learns_and_exports_the_trained_weights(tiny_cfg, tmp_path):
    cfg = tiny_cfg("trainer.max_steps=12", "trainer.val_check_interval=6", "optimizer.lr=3e-3", "save_steps=6")
    summary = fit(cfg)

    assert summary["global_step"] == 12
    assert summary["params_trainable"] == summary["params_total"] > 0
    assert summary["tokens_seen"] > 0 and summary["wall_time_s"] > 0
    assert summary["task/loss_after"] < summary["task/loss_before"]
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["task/loss_after"] == summary["task/loss_after"]
    run_cfg = OmegaConf.load(tmp_path / "config.yaml")
    assert run_cfg.model.name == "tiny" and run_cfg.run.git_sha
    installed = {d.metadata["Name"]: d.version for d in distributions() if d.metadata["Name"]}
    assert run_cfg.run.versions == installed and "numpy" in installed  # every installed package, not a few

    # Exported HF dir == the weights of the last checkpoint, through plain transformers.
    ckpt = load_checkpoint_file(tmp_path / "checkpoints" / "last.ckpt")  # weights_only=True: a resume runs no code
    module = CausalLMModule(model=cfg.model, optimizer=None)
    module.configure_model()
    module.load_state_dict(ckpt["state_dict"])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, cfg.model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module.model.eval()(input_ids=ids).logits
        assert torch.allclose(exported(input_ids=ids).logits, expected, atol=1e-5)
    assert exported.generation_config.eos_token_id == 2  # the data's completion end: <|im_end|> (one id: an int)


def test_loss_goes_down_on_a_fixed_batch(tiny_cfg):
    """Plain optimisation sanity: ten AdamW steps on one batch lower its token-mean loss."""
    cfg = tiny_cfg()
    module = CausalLMModule(model=cfg.model, optimizer=None)
    module.configure_model()
    ids = torch.randint(3, cfg.model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :8] = -100  # a masked prompt
    batch = {"input_ids": ids, "labels": labels}
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss_sum, n_tokens = module.token_loss_sum(batch)
        assert n_tokens == 4 * 24  # 31 next-token targets per row; positions 1-7 of them masked
        (loss_sum / n_tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append((loss_sum / n_tokens).item())
    assert losses[-1] < 0.7 * losses[0]


def test_dry_run_plans_llama2_7b_without_weights():
    """`dry_run=true` answers from the meta device: exact counts and a per-device plan, in seconds."""
    args = ["model=llama2_7b", "strategy=fsdp", "trainer.devices=8", "dry_run=true", "regularizer=ewc"]
    result = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "6,738,415,616 parameters" in result.stdout
    assert "fsdp x 8" in result.stdout and "regularizer" in result.stdout.lower()
    assert "H100-80GB" in result.stdout and "fits" in result.stdout
