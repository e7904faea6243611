"""Penalties that pull the fine-tuned weights back towards the pretrained ones, against forgetting:

    penalty = strength / 2 · Σ_i w_i (θ_i − θ*_i)²       over the trainable parameters

- `L2SP` (Li et al., 2018): w_i = 1, a plain pull towards the starting point θ*.
- `EWC` (Kirkpatrick et al., 2017): w_i = F_i, the diagonal empirical Fisher of the pretrained model
  on original-task data: the mean over `num_samples` sequences (batch rows) of the squared gradient of
  each sequence's token-mean negative log-likelihood. Weights that matter for the original data are
  held firmly, the rest move freely.

θ* and F are taken on the untouched model before the first step (`RegularizerSetup`) and are kept in
checkpoints (whole: Lightning writes callback state from rank 0 alone), so a resumed run still
measures distance to the *pretrained* weights. Extra memory: one copy of the trainable parameters
for L2-SP, two for EWC.

Sharding: θ* and F have the type of their parameter; under FSDP2 they are DTensors with the
parameter's placement, so each rank holds only its shard. A rank's penalty covers its local shard
(`to_local()`) and is added to its own loss: its gradient reaches that shard directly, while the task
gradient is averaged across ranks — together exactly the gradient of (mean task loss + total penalty).
DeepSpeed is refused with a clear error: ZeRO keeps parameters and gradients out of PyTorch's view.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from fulltune.evaluate import eval_mode
from fulltune.preflight import ConfigError


class Regularizer(Protocol):
    """What training needs: `setup` once on the untouched model, then `penalty` added to every
    training loss; the state (anchors, Fisher) goes into checkpoints."""

    sharded: bool  # penalties are per shard: sum them across ranks for the total

    def setup(self, module: L.LightningModule, dataloader: Iterable | None) -> None: ...

    def penalty(self, module: L.LightningModule) -> torch.Tensor: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly sharded) tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _like(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """`local` laid out like `param`: a DTensor with its mesh and placement when it is sharded."""
    if isinstance(param, DTensor):
        return DTensor.from_local(
            local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
        )
    return local


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU (all ranks take part when it is sharded)."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu()


def _laid_out_like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """A whole tensor (as a checkpoint holds it) on `param`'s device, sharded like it; every rank
    holds the same whole tensor, so each keeps its own chunk without communicating."""
    if isinstance(param, DTensor):
        return distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return full.to(param.device)


class _WeightedSquaredDistance(torch.autograd.Function):
    """Σ w (x − a)² (w = 1 when None) that saves no intermediates for backward, which recomputes
    2 w (x − a) from tensors kept anyway: autograd would hold (x − a) and its square, two more copies
    of the trainable parameters."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, anchor: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, anchor, weight)
        term = (x.float() - anchor.float()).square()
        return (term if weight is None else weight.float() * term).sum()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        x, anchor, weight = ctx.saved_tensors
        grad = 2 * grad_output * (x.float() - anchor.float())
        return (grad if weight is None else grad * weight.float()).to(x.dtype), None, None


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters as the optimizer holds them. After a forward, FSDP2 leaves the root
    unit's *unsharded* copies registered on the modules (until a backward); resharding first makes
    `named_parameters()` yield the sharded DTensors."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def batch_rows(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One single-row batch per row of `batch` (0-dim entries such as token counts are dropped)."""
    size = batch["input_ids"].size(0)
    rows = {k: v for k, v in batch.items() if torch.is_tensor(v) and v.ndim > 0 and v.size(0) == size}
    return [{k: v[i : i + 1] for k, v in rows.items()} for i in range(size)]


def diagonal_fisher(module: L.LightningModule, dataloader: Iterable, num_samples: int) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher of the trainable parameters: mean over up to `num_samples` rows of
    (∂ token-mean NLL of the row / ∂θ)², in eval mode (no dropout), one backward per row.

    Every rank must see the same rows (pass an unsharded loader): under FSDP2 the reduce-scattered
    gradient of a row seen by all ranks is that row's gradient, so each local shard is exact.
    """
    model = module.model
    params = trainable_parameters(model)
    sums = {name: torch.zeros_like(_local(p), dtype=torch.float32) for name, p in params}
    with eval_mode(model):
        rows = (row for batch in dataloader
                for row in batch_rows(module.transfer_batch_to_device(batch, module.device, 0)))
        seen = 0
        for row in rows:
            for _, p in params:
                p.grad = None
            loss_sum, n_tokens = module.token_loss_sum(row)
            if n_tokens == 0:
                continue
            (loss_sum / n_tokens).backward()
            for name, p in params:
                if p.grad is not None:  # None: the parameter took no part in this row
                    sums[name] += _local(p.grad).float().square()
            seen += 1
            if seen == num_samples:
                break
        for _, p in params:
            p.grad = None
    if seen == 0:
        raise ValueError("regularizer=ewc: the Fisher data has no label tokens")
    if seen < num_samples:
        rank_zero_warn(f"EWC: the Fisher data has {seen} rows, fewer than num_samples={num_samples}")
    return {name: _like(p, sums.pop(name).div_(seen).to(p.dtype)) for name, p in params}  # no extra copy


class L2SP:
    """strength/2 · Σ (θ − θ*)²: a pull towards the pretrained weights θ* of every trainable parameter."""

    data: Mapping | None = None  # original-task data setup reads (EWC); None: no data needed

    def __init__(self, strength: float) -> None:
        self.strength = strength
        self.params: dict[str, nn.Parameter] = {}  # bound once: FSDP2 swaps what named_parameters() yields
        self.anchor: dict[str, torch.Tensor] = {}
        self.weight: dict[str, torch.Tensor] | None = None
        self.sharded = False

    def setup(self, module: L.LightningModule, dataloader: Iterable | None = None) -> None:
        """Take θ* = the current trainable weights (call it on the untouched model)."""
        self.params = dict(trainable_parameters(module.model))
        self.anchor = {name: p.detach().clone() for name, p in self.params.items()}
        self.sharded = any(isinstance(p, DTensor) for p in self.params.values())

    def penalty(self, module: L.LightningModule) -> torch.Tensor:
        """This rank's penalty (its shards' under FSDP2), differentiable in the parameters."""
        if not self.anchor:
            raise RuntimeError("the regularizer has no anchor yet: call setup(module, dataloader) first")
        if not self.params:  # state restored from a checkpoint: bind it, sharded like the parameters
            self.params = dict(trainable_parameters(module.model))
            self.anchor = {name: _laid_out_like(self.params[name], t) for name, t in self.anchor.items()}
            if self.weight is not None:
                self.weight = {name: _laid_out_like(self.params[name], t) for name, t in self.weight.items()}
            self.sharded = any(isinstance(p, DTensor) for p in self.params.values())
        total = torch.zeros((), device=module.device)
        for name, p in self.params.items():
            weight = None if self.weight is None else _local(self.weight[name])
            total = total + _WeightedSquaredDistance.apply(_local(p), _local(self.anchor[name]), weight)
        return 0.5 * self.strength * total

    def state_dict(self) -> dict:
        """Whole tensors, gathered one at a time to CPU: Lightning writes callback state from rank 0
        alone, also when the weights are saved sharded (FSDP2). Called on every rank."""
        weight = None if self.weight is None else {name: _full(t) for name, t in self.weight.items()}
        return {"anchor": {name: _full(t) for name, t in self.anchor.items()}, "weight": weight}

    def load_state_dict(self, state: dict) -> None:
        """Keep the whole tensors; the first `penalty` binds and shards them like the parameters."""
        self.anchor, self.weight, self.params = dict(state["anchor"]), state["weight"], {}


class EWC(L2SP):
    """strength/2 · Σ F (θ − θ*)², F the diagonal Fisher on `num_samples` rows of original-task data.

    `data` picks those rows like a forgetting set does: `{source: replay}` (the data module's replay
    validation split) or `{path: FILE, format: text}`; prefer data you do not also measure forgetting on.
    """

    def __init__(self, strength: float, num_samples: int = 64, data: Mapping | None = None) -> None:
        super().__init__(strength)
        self.num_samples = num_samples
        self.data = dict(data or {"source": "replay"})

    def setup(self, module: L.LightningModule, dataloader: Iterable | None = None) -> None:
        if dataloader is None:
            raise ValueError("EWC needs data to estimate the Fisher: pass a dataloader")
        super().setup(module)
        self.weight = diagonal_fisher(module, dataloader, self.num_samples)


class RegularizerSetup(L.Callback):
    """Sets the regularizer up on the untouched model just before the first step, and keeps its
    state in checkpoints so a resumed run never re-anchors on fine-tuned weights."""

    def __init__(self, regularizer: Regularizer) -> None:
        self.regularizer = regularizer
        self.ready = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if "DeepSpeed" in type(trainer.strategy).__name__:  # before any weights load
            raise ConfigError(
                f"regularizer={type(self.regularizer).__name__}: not supported with DeepSpeed, whose ZeRO stages "
                "partition parameters and gradients outside PyTorch's view. Use strategy=fsdp (sharded) or ddp."
            )

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.ready:  # restored from a checkpoint
            return
        from fulltune.forgetting import heldout_loader

        data = getattr(self.regularizer, "data", None)
        self.regularizer.setup(module, None if data is None else heldout_loader(trainer.datamodule, data))
        self.ready = True

    def state_dict(self) -> dict:
        return {"regularizer": self.regularizer.state_dict()} if self.ready else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            self.regularizer.load_state_dict(state_dict["regularizer"])
            self.ready = True
