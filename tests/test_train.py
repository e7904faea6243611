"""The whole path on the tiny model: fit, checkpoint, summary, config, HF export equal to training."""

from __future__ import annotations

import json

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from fulltune.module import CausalLMModule
from fulltune.train import fit


def test_tiny_run_learns_and_exports_the_trained_weights(tiny_cfg, tmp_path):
    cfg = tiny_cfg("trainer.max_steps=12", "optimizer.lr=3e-3", "save_steps=6")
    summary = fit(cfg)

    assert summary["global_step"] == 12
    assert summary["params_trainable"] == summary["params_total"] > 0
    assert summary["tokens_seen"] > 0 and summary["wall_time_s"] > 0
    assert summary["task/loss_after"] < summary["task/loss_before"]
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["task/loss_after"] == summary["task/loss_after"]
    run_cfg = OmegaConf.load(tmp_path / "config.yaml")
    assert run_cfg.model.name == "tiny" and "torch" in run_cfg.run.versions and run_cfg.run.git_sha

    # Exported HF dir == the weights of the last checkpoint, through plain transformers.
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    module = CausalLMModule(model=cfg.model, optimizer=None)
    module.configure_model()
    module.load_state_dict(ckpt["state_dict"])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, cfg.model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module.model.eval()(input_ids=ids).logits
        assert torch.allclose(exported(input_ids=ids).logits, expected, atol=1e-5)
    assert exported.generation_config.eos_token_id == exported.config.eos_token_id == 2


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
        assert n_tokens == 4 * 23  # shifted labels: 31 targets per row, 8 masked
        (loss_sum / n_tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append((loss_sum / n_tokens).item())
    assert losses[-1] < 0.7 * losses[0]
