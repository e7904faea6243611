"""The LM head as a loss: next-token cross-entropy on label positions only, in chunks.

A plain causal-LM loss materialises fp32 logits for every position over the whole vocabulary,
plus their log-softmax and gradients: for Llama-3-8B at 4 × 4096 tokens that is ~24 GiB per device,
most of it for prompt tokens whose loss is masked anyway. `LabelLossHead` replaces the model's
output layer (same weight Parameter, so tying, sharding and state-dict names are unchanged) and,
while `labels` are set, returns the summed loss instead of logits: only rows whose label is not
-100 reach the head, `chunk_tokens` rows at a time, and each chunk's gradients (for the hidden
states and the head weight) are computed at once, so at most one chunk × vocab block exists.
Everywhere else (generation, export) it is the plain linear layer. A model that soft-caps its
logits (Gemma 2: `cap * tanh(z / cap)`) has the cap applied per chunk instead, inside the head.

The loss is computed inside the head's own forward so that FSDP2 (root unit gathered) and
ZeRO-3 (module hooks gather the weight) hand it a whole weight, as they do for the plain layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig

IGNORE_INDEX = -100


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Σ cross-entropy(softcap(h W^T + b), targets), with both gradients computed chunk by chunk in
    forward (as Liger's fused linear cross-entropy does): backward only scales them, so neither
    logits nor softmax are kept, and the head costs the three matmuls of a plain forward + backward.

    Memory: at most two chunk x vocab fp32 blocks at once (as `logsumexp` alone takes); the weight's
    gradient is accumulated in place (`addmm` into itself; under autocast a 16-bit product is added)
    and scaled in place in backward, then handed over, so no second vocab x hidden copy exists
    (Gemma 2's 256k x 2304 head: 2.4 GB per fp32 copy). `grads=False` (called under `torch.no_grad`:
    evaluation) computes the loss alone: inside `forward` grad mode is always off and
    `needs_input_grad` still says yes for a Parameter, so the caller says it, else every evaluation
    batch would build the weight's gradient too."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens: int, softcap: float | None, grads: bool = True):
        need_h, need_w, need_b = (need and grads for need in ctx.needs_input_grad[:3])
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None  # the head's gradient, in its own dtype
        grad_b = torch.zeros_like(bias) if need_b else None
        autocast = torch.is_autocast_enabled(hidden.device.type)
        for start in range(0, hidden.size(0), chunk_tokens):
            h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
            logits = F.linear(h, weight, bias).float()
            if softcap:
                logits.div_(softcap).tanh_().mul_(softcap)
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not (need_h or need_w or need_b):
                continue
            slope = logits.div(softcap).square_().neg_().add_(1) if softcap else None  # d softcap(z) / dz
            dlogits = logits.sub_(lse[:, None]).exp_()  # softmax, in place
            dlogits[torch.arange(t.numel(), device=t.device), t] -= 1
            if slope is not None:
                dlogits.mul_(slope)
                del slope
            if need_h:
                grad_h[start : start + chunk_tokens] = dlogits.to(weight.dtype) @ weight
            if need_w and autocast:  # the GEMM in autocast's 16-bit dtype (an in-place one would run in fp32)
                grad_w += dlogits.T.to(h.dtype) @ h
            elif need_w:
                torch.addmm(grad_w, dlogits.T.to(h.dtype), h, out=grad_w)  # = addmm_, which FLOP counters miss
            if need_b:
                grad_b += dlogits.sum(0).to(bias.dtype)
        ctx.grads = (grad_h, grad_w, grad_b)  # not saved tensors: backward takes them over (once)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None
        return *(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads), None, None, None, None


class LabelLossHead(nn.Module):
    """The output layer of a causal LM that, inside `with head.labels(labels):`, returns the summed
    next-token loss over label positions (a 0-dim fp32 tensor in the place of the logits)."""

    def __init__(self, linear: nn.Linear, chunk_tokens: int, config: PretrainedConfig) -> None:
        super().__init__()
        self.weight = linear.weight  # the same Parameter: tied embeddings stay tied
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.chunk_tokens = chunk_tokens
        self.config = config
        self._labels: torch.Tensor | None = None
        self._softcap: float | None = None

    @contextmanager
    def labels(self, labels: torch.Tensor) -> Iterator[None]:
        """While set, the head returns the loss, soft-capping the logits itself: the model's own cap
        (applied to what the head returns) is lifted for the forward and restored after it."""
        self._labels, self._softcap = labels, getattr(self.config, "final_logit_softcapping", None)
        if self._softcap:
            self.config.final_logit_softcapping = None
        try:
            yield
        finally:
            if self._softcap:
                self.config.final_logit_softcapping = self._softcap
            self._labels = self._softcap = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._labels is None:
            return F.linear(hidden, self.weight, self.bias)
        targets = self._labels[:, 1:]
        keep = targets != IGNORE_INDEX  # position t predicts token t + 1
        return _ChunkedLinearCrossEntropy.apply(
            hidden[:, :-1][keep], self.weight, self.bias, targets[keep], self.chunk_tokens, self._softcap,
            torch.is_grad_enabled(),
        )


def takes_label_loss_head(model: nn.Module) -> bool:
    """Whether the loss can take the output layer's place: its logits are that layer's, soft-capped
    at most (Gemma 2), not otherwise post-processed (Cohere's logit scale), and it is a plain
    `nn.Linear`."""
    return type(model.get_output_embeddings()) is nn.Linear and getattr(model.config, "logit_scale", 1.0) in (None, 1.0)


def install_label_loss_head(model: nn.Module, chunk_tokens: int) -> LabelLossHead | None:
    """Swap the model's output layer for a `LabelLossHead`; None (nothing changed) where the model
    post-processes its logits beyond soft-capping (Cohere's logit scale) or its head is not a plain
    `nn.Linear`: those keep the full-logits loss, as does `chunk_tokens=0` (the reference, for
    benchmarks)."""
    if chunk_tokens <= 0 or not takes_label_loss_head(model):
        return None
    loss_head = LabelLossHead(model.get_output_embeddings(), chunk_tokens, model.config)
    model.set_output_embeddings(loss_head)
    return loss_head


def full_logits_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference: summed next-token cross-entropy over full fp32 logits."""
    shifted = logits[:, :-1].float()
    return F.cross_entropy(
        shifted.reshape(-1, shifted.size(-1)), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
