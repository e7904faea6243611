"""The LM head as a loss: next-token cross-entropy on label positions only, in chunks.

A plain causal-LM loss materialises fp32 logits for every position over the whole vocabulary,
plus their log-softmax and gradients: for Llama-3-8B at 4 × 4096 tokens that is ~24 GiB per device,
most of it for prompt tokens whose loss is masked anyway. `LabelLossHead` replaces the model's
output layer (same weight Parameter, so tying, sharding and state-dict names are unchanged) and,
while `labels` are set, returns the summed loss instead of logits: only rows whose label is not
-100 reach the head, `chunk_tokens` rows at a time, and each chunk's gradients (for the hidden
states and the head weight) are computed at once, so at most one chunk × vocab block exists.
Everywhere else (generation, export) it is the plain linear layer.

The loss is computed inside the head's own forward so that FSDP2 (root unit gathered) and
ZeRO-3 (module hooks gather the weight) hand it a whole weight, as they do for the plain layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Σ cross-entropy(h W^T + b, targets), with both gradients computed chunk by chunk in forward
    (as Liger's fused linear cross-entropy does): backward only scales them, so neither logits
    nor softmax are kept, and the head costs the three matmuls of a plain forward + backward.
    `grads=False` (called under `torch.no_grad`: evaluation) computes the loss alone: inside
    `forward` grad mode is always off and `needs_input_grad` still says yes for a Parameter, so
    the caller says it, else every evaluation batch would build the weight's gradient too."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens: int, grads: bool = True):
        need_h, need_w, need_b = (need and grads for need in ctx.needs_input_grad[:3])
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None  # the head's gradient, in its own dtype
        grad_b = torch.zeros_like(bias) if need_b else None
        for start in range(0, hidden.size(0), chunk_tokens):
            h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
            logits = F.linear(h, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not (need_h or need_w or need_b):
                continue
            dlogits = logits.sub_(lse[:, None]).exp_()  # softmax, in place
            dlogits[torch.arange(t.numel(), device=t.device), t] -= 1
            if need_h:
                grad_h[start : start + chunk_tokens] = dlogits.to(weight.dtype) @ weight
            if need_w:
                grad_w += dlogits.T.to(h.dtype) @ h
            if need_b:
                grad_b += dlogits.sum(0).to(bias.dtype)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in (grad_h, grad_w, grad_b)]
        return *scaled, None, None, None


class LabelLossHead(nn.Module):
    """The output layer of a causal LM that, inside `with head.labels(labels):`, returns the summed
    next-token loss over label positions (a 0-dim fp32 tensor in the place of the logits)."""

    def __init__(self, linear: nn.Linear, chunk_tokens: int) -> None:
        super().__init__()
        self.weight = linear.weight  # the same Parameter: tied embeddings stay tied
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.chunk_tokens = chunk_tokens
        self._labels: torch.Tensor | None = None

    @contextmanager
    def labels(self, labels: torch.Tensor) -> Iterator[None]:
        self._labels = labels
        try:
            yield
        finally:
            self._labels = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._labels is None:
            return F.linear(hidden, self.weight, self.bias)
        targets = self._labels[:, 1:]
        keep = targets != IGNORE_INDEX  # position t predicts token t + 1
        return _ChunkedLinearCrossEntropy.apply(
            hidden[:, :-1][keep], self.weight, self.bias, targets[keep], self.chunk_tokens, torch.is_grad_enabled()
        )


def takes_label_loss_head(model: nn.Module) -> bool:
    """Whether the model's logits are its output layer's, so the loss can take that layer's place:
    not where it post-processes them (Gemma's soft-capping, Cohere's logit scale) or its head is not
    a plain `nn.Linear`."""
    config = model.config
    return type(model.get_output_embeddings()) is nn.Linear and not getattr(config, "final_logit_softcapping", None) \
        and getattr(config, "logit_scale", 1.0) in (None, 1.0)


def install_label_loss_head(model: nn.Module, chunk_tokens: int) -> LabelLossHead | None:
    """Swap the model's output layer for a `LabelLossHead`; None (nothing changed) where the model
    post-processes its logits (Gemma's soft-capping, Cohere's logit scale) or its head is not a
    plain `nn.Linear`: those keep the full-logits loss, as does `chunk_tokens=0` (the reference,
    for benchmarks)."""
    if chunk_tokens <= 0 or not takes_label_loss_head(model):
        return None
    loss_head = LabelLossHead(model.get_output_embeddings(), chunk_tokens)
    model.set_output_embeddings(loss_head)
    return loss_head


def full_logits_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference: summed next-token cross-entropy over full fp32 logits."""
    shifted = logits[:, :-1].float()
    return F.cross_entropy(
        shifted.reshape(-1, shifted.size(-1)), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
