"""What trains under each method: LoRA adapters only (merged on export), freeze's named params only."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from fulltune.finetune import apply_finetune, count_params
from fulltune.models import build_model
from fulltune.module import CausalLMModule
from fulltune.preflight import ConfigError
from fulltune.train import fit

from .conftest import compose_config

NO_EVAL = ["eval.task=null", "eval.forgetting=null"]  # what trains is the question here, not how well


def changed_params(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {name for name, value in before.items() if not torch.equal(value, after[name])}


def test_lora_trains_only_adapters_and_the_merged_export_equals_the_adapted_model(tiny_cfg, tmp_path):
    cfg = tiny_cfg("finetune=lora", "finetune.r=4", "finetune.alpha=8", "finetune.lr=1e-2",
                   "trainer.max_steps=4", "save_steps=4", *NO_EVAL)
    summary = fit(cfg)

    # r·(in + out) per adapted projection; the tiny model: hidden 64, 2 of 4 heads for k/v (out 32), 2 layers
    adapters = 2 * 4 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64))
    initial = build_model(cfg.model).state_dict()
    base_total = count_params(build_model(cfg.model))[0]
    assert summary["params_trainable"] == adapters
    assert summary["params_total"] == base_total + adapters

    module = CausalLMModule(model=cfg.model, optimizer=None, finetune=cfg.finetune)
    module.configure_model()
    module.load_state_dict(torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"])
    trained = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert all(p.abs().sum() > 0 for n, p in trained.items() if ".lora_B." in n)  # B left zero: nothing learned
    base = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p
            for n, p in module.model.named_parameters() if not p.requires_grad}
    assert not changed_params(initial, {**initial, **base})  # every base weight as initialised

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert not any("lora" in n for n in exported.state_dict())
    assert "model.layers.0.self_attn.q_proj.weight" in changed_params(initial, exported.state_dict())
    ids = torch.randint(0, cfg.model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = module.model.eval()(input_ids=ids).logits
        assert torch.allclose(exported(input_ids=ids).logits, adapted, atol=1e-5)


@pytest.mark.parametrize(("r", "adapters"), [(16, 16_777_216), (64, 67_108_864)])
def test_lora_on_llama2_7b_adds_the_seed_tables_parameter_counts(r, adapters, tmp_path, cache_dir):
    """LoRA on q/k/v/o of LLaMA-2 7B (built on the meta device): 16.8M (r=16) and 67.1M (r=64)
    trainable, the seed notes' 18M and 70M."""
    cfg = compose_config(["model=llama2_7b", "finetune=lora", f"finetune.r={r}"], tmp_path, cache_dir)
    total, trainable = count_params(apply_finetune(build_model(cfg.model, device="meta"), cfg.finetune))
    assert (total, trainable) == (6_738_415_616 + adapters, adapters)


def test_freeze_trains_exactly_the_named_params(tiny_cfg, tmp_path):
    cfg = tiny_cfg("finetune=freeze", "finetune.top_layers=1", "finetune.modules=[model.norm]",
                   "finetune.lr=1e-2", "trainer.max_steps=3", *NO_EVAL)
    initial = build_model(cfg.model).state_dict()
    named = {n for n in initial if n.startswith("model.layers.1.") or n == "model.norm.weight"}
    model = apply_finetune(build_model(cfg.model), cfg.finetune)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == named

    summary = fit(cfg)
    assert summary["params_trainable"] == sum(initial[n].numel() for n in named)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").state_dict()
    assert changed_params(initial, exported) == named


def test_freeze_rejects_names_and_depths_the_model_does_not_have(tiny_cfg):
    cfg = tiny_cfg("finetune=freeze", "finetune.top_layers=1")
    with pytest.raises(ConfigError, match="matches no module"):
        apply_finetune(build_model(cfg.model), OmegaConf.merge(cfg.finetune, {"modules": ["model.nrom"]}))
    with pytest.raises(ConfigError, match="has 2 decoder layers"):
        apply_finetune(build_model(cfg.model), OmegaConf.merge(cfg.finetune, {"top_layers": 3}))
    with pytest.raises(ConfigError, match="linear layers are named"):
        apply_finetune(build_model(cfg.model), tiny_cfg("finetune=lora", "finetune.target_modules=[qproj]").finetune)


def test_learning_rate_defaults_follow_the_method(tmp_path, cache_dir):
    """Method-aware defaults make a comparison fair out of the box; an explicit optimizer.lr wins."""
    lr = {m: compose_config([f"finetune={m}", "~experiment"], tmp_path, cache_dir).optimizer.lr  # the demo: 5x
          for m in ("full", "lora", "freeze")}
    assert lr["full"] == 2e-5 and lr["lora"] == pytest.approx(10 * lr["full"]) and lr["full"] < lr["freeze"]
    assert compose_config(["finetune=lora", "optimizer.lr=1e-3"], tmp_path, cache_dir).optimizer.lr == 1e-3


def test_qlora_trains_adapters_on_an_nf4_base_and_exports_them_merged_into_the_dequantized_base(tiny_cfg, tmp_path):
    """bitsandbytes' 4-bit layers run on this CPU (bitsandbytes >= 0.49): the real QLoRA path, end to end."""
    pytest.importorskip("bitsandbytes", reason="finetune=qlora needs bitsandbytes (pip install 'fulltune[qlora]')")
    cfg = tiny_cfg("finetune=qlora", "finetune.r=4", "finetune.alpha=8", "finetune.lr=1e-2",
                   "trainer.max_steps=3", "save_steps=3", *NO_EVAL)
    summary = fit(cfg)
    adapters = 2 * 4 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64))
    assert summary["params_trainable"] == adapters
    assert summary["params_total"] == count_params(build_model(cfg.model))[0] + adapters  # 4-bit codes: 2 per byte

    module = CausalLMModule(model=cfg.model, optimizer=None, finetune=cfg.finetune)
    module.configure_model()
    module.load_state_dict(torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"])
    base = module.model.get_base_model().model.layers[0]
    assert type(base.mlp.up_proj).__name__ == "NF4Linear" and base.mlp.up_proj.weight.dtype == torch.uint8
    assert base.mlp.up_proj.weight.quant_state.quant_type == "nf4"
    ids = torch.randint(0, cfg.model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert not any("lora" in n or "absmax" in n for n in exported.state_dict())
    with torch.no_grad():
        adapted = module.model.eval()(input_ids=ids).logits
        assert torch.allclose(exported(input_ids=ids).logits, adapted, atol=1e-5)
