"""The chunked label-position loss equals cross-entropy over full fp32 logits, value and gradients.

Strategies are proven equal to DDP and DDP to one process (test_strategies.py), so these
single-process equivalences carry over to DDP, FSDP2 and ZeRO-3."""

from __future__ import annotations

import pytest
import torch
from omegaconf import open_dict
from torch.utils.flop_counter import FlopCounterMode

from fulltune.loss import LabelLossHead, full_logits_loss_sum
from fulltune.module import CausalLMModule


def build(cfg, finetune=None, chunk_tokens: int = 7, tied: bool = True) -> CausalLMModule:
    with open_dict(cfg):
        cfg.model.loss_chunk_tokens = chunk_tokens
        cfg.model.config.tie_word_embeddings = tied
    module = CausalLMModule(model=cfg.model, optimizer=None, finetune=finetune)
    module.configure_model()
    return module


def batch(vocab: int, packed: bool) -> dict[str, torch.Tensor]:
    """3 rows of 24 tokens, prompts masked; packed: two examples per row with restarting positions."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 24), generator=gen)
    labels = ids.clone()
    labels[:, :6] = -100
    out = {"input_ids": ids, "labels": labels}
    if packed:
        labels[:, 12:16] = -100  # the second example's prompt
        out["position_ids"] = torch.cat([torch.arange(12), torch.arange(12)]).repeat(3, 1)
    else:
        out["attention_mask"] = torch.ones_like(ids)
        out["attention_mask"][2, 20:] = 0  # a padded row
        labels[2, 20:] = -100
    return out


def loss_and_grads(module: CausalLMModule, b: dict, reference: bool) -> tuple[torch.Tensor, dict]:
    module.model.zero_grad(set_to_none=True)
    if reference:  # the plain path: the model's logits over every position, full vocabulary
        loss = full_logits_loss_sum(module(b), b["labels"])
    else:
        loss, _ = module.token_loss_sum(b)
    (loss / (b["labels"][:, 1:] != -100).sum()).backward()  # the token mean, as training steps it
    grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_chunked_loss_equals_full_logits_cross_entropy(tiny_cfg, packed, tied):
    module = build(tiny_cfg(), tied=tied)
    assert isinstance(module.model.get_output_embeddings(), LabelLossHead)
    assert (module.model.get_output_embeddings().weight is module.model.get_input_embeddings().weight) is tied
    b = batch(module.spec.config.vocab_size, packed)
    loss, grads = loss_and_grads(module, b, reference=False)
    ref_loss, ref_grads = loss_and_grads(module, b, reference=True)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 9 + 2 + (not tied)
    assert abs(loss - ref_loss) <= 1e-6 * ref_loss
    assert max((grads[k] - ref_grads[k]).abs().max().item() for k in grads) <= 1e-6


def test_pinned_loss_of_the_tiny_model(tiny_cfg):
    """An absolute number, so a bug every path shares still shows: the untrained tiny model's
    summed loss on the fixed batch (≈ ln 512 = 6.24 nats per label token)."""
    module = build(tiny_cfg())
    b = batch(module.spec.config.vocab_size, packed=False)
    loss, n_tokens = module.token_loss_sum(b)
    assert n_tokens == 18 + 18 + 14  # positions 6-23 predicted; the padded row ends at 20
    assert loss.item() == pytest.approx(310.1883, abs=1e-3)


def test_lora_gradients_match_and_base_stays_frozen(tiny_cfg):
    module = build(tiny_cfg("finetune=lora"), finetune=tiny_cfg("finetune=lora").finetune)
    module.model.eval()  # LoRA dropout off: both paths must see the same function
    b = batch(module.spec.config.vocab_size, packed=True)
    loss, grads = loss_and_grads(module, b, reference=False)
    ref_loss, ref_grads = loss_and_grads(module, b, reference=True)
    assert grads and all("lora_" in k for k in grads)
    assert abs(loss - ref_loss) <= 1e-6 * ref_loss
    assert max((grads[k] - ref_grads[k]).abs().max().item() for k in grads) <= 1e-6


def test_no_labels_means_plain_logits_and_no_grad_means_no_gradient_buffers(tiny_cfg):
    module = build(tiny_cfg())
    b = batch(module.spec.config.vocab_size, packed=False)
    logits = module(b)
    assert logits.shape == (3, 24, module.spec.config.vocab_size)  # generation and export see a Linear
    counts = {}
    for grad in (True, False):  # evaluation runs under no_grad: the head's gradients are not computed
        with torch.set_grad_enabled(grad), FlopCounterMode(display=False) as flops:
            loss, n_labels = module.token_loss_sum(b)
        counts[grad] = flops.get_total_flops()
    assert loss.item() == pytest.approx(full_logits_loss_sum(logits, b["labels"]).item(), rel=1e-6)
    head = module.model.get_output_embeddings()
    assert counts[True] - counts[False] == 2 * 2 * n_labels.item() * head.in_features * head.out_features
