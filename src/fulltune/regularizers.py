"""Penalties that pull the fine-tuned weights back towards the pretrained ones, against forgetting:

    penalty = strength / 2 · Σ_i w_i (θ_i − θ*_i)²       over the trainable parameters

- `L2SP` (Li et al., 2018): w_i = 1, a plain pull towards the starting point θ*.
- `EWC` (Kirkpatrick et al., 2017): w_i = F_i, the diagonal empirical Fisher of the pretrained model
  on original-task data: the mean over `num_samples` sequences (batch rows) of the squared gradient of
  each sequence's token-mean negative log-likelihood. Weights that matter for the original data are
  held firmly, the rest move freely.

State: a regularizer is an `nn.Module` that CausalLMModule holds (`module.regularizer`); θ* and F are
its persistent buffers, so they are part of the module's state dict like the weights. `bind` creates
them in `configure_model`, once the parameters are built and sharded, so they exist before a
checkpoint loads into them; `setup` fills them on the untouched model just before the first step
(`RegularizerSetup`), unless a checkpoint restored them: a resumed run keeps the *pretrained* anchor.
Extra memory: one copy of the trainable parameters for L2-SP, two for EWC.

Sharding: θ* and F have the type and layout of their parameter; under FSDP2 they are DTensors with the
parameter's placement, so each rank holds only its shard, in memory and in checkpoints (Lightning's
FSDP2 path saves the module state dict as DCP: every rank writes its own shards, and a resume reads
them back into the same layout; nothing is gathered). A rank's penalty covers its local shard
(`to_local()`) and is added to its own loss: its gradient reaches that shard directly, while the task
gradient is averaged across ranks — together exactly the gradient of (mean task loss + total penalty).
Under DDP every rank holds the same whole θ* and F; DDP, which broadcasts every buffer from rank 0 at
every forward, is told to leave them out.
DeepSpeed is refused with a clear error: ZeRO keeps parameters and gradients out of PyTorch's view.
The HF export keeps the `model.` entries only, so it never sees this state.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.distributed.tensor import DTensor

from fulltune.evaluate import eval_mode
from fulltune.preflight import ConfigError


class Regularizer(Protocol):
    """What training needs: `bind` in `configure_model` (the state's buffers, laid out like the
    parameters), `setup` before the first step, then `penalty` added to every training loss. The
    state lives in the module's state dict (an `nn.Module` child of the LightningModule)."""

    sharded: bool  # penalties are per shard: sum them across ranks for the total
    anchored: torch.Tensor  # True once θ* is taken (or restored from a checkpoint)
    data: Mapping | None  # original-task data `setup` reads (EWC); None: no data needed

    def bind(self, module: L.LightningModule) -> None: ...

    def setup(self, module: L.LightningModule, dataloader: Iterable | None) -> None: ...

    def penalty(self, module: L.LightningModule) -> torch.Tensor: ...


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly sharded) tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _zeros_like(param: torch.Tensor) -> torch.Tensor:
    """Zeros laid out like `param` (a DTensor with its mesh and placement when it is sharded), without
    a gradient and allocating only this rank's shard."""
    local = torch.zeros_like(_local(param), requires_grad=False)
    if isinstance(param, DTensor):
        return DTensor.from_local(
            local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
        )
    return local


class ParamBuffers(nn.Module):
    """One persistent buffer per parameter name, laid out like that parameter. Buffer names cannot
    hold dots, so `model.norm.weight` is stored as `model/norm/weight`; look tensors up by the
    parameter's own name."""

    def add(self, params: Mapping[str, torch.Tensor]) -> None:
        for name, param in params.items():
            self.register_buffer(name.replace(".", "/"), _zeros_like(param))

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name.replace(".", "/")]

    def __iter__(self) -> Iterator[str]:
        return (key.replace("/", ".") for key in self._buffers)

    def __len__(self) -> int:
        return len(self._buffers)


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


def diagonal_fisher(module: L.LightningModule, dataloader: Iterable, num_samples: int, into: ParamBuffers) -> None:
    """Empirical diagonal Fisher of the trainable parameters, written into `into` (laid out like them):
    mean over up to `num_samples` rows of (∂ token-mean NLL of the row / ∂θ)², in eval mode (no
    dropout), one backward per row. Sums are fp32 (in `into` itself when it is fp32: no extra copy).

    Every rank must see the same rows (pass an unsharded loader): under FSDP2 the reduce-scattered
    gradient of a row seen by all ranks is that row's gradient, so each local shard is exact.
    """
    model = module.model
    params = trainable_parameters(model)
    sums = {}
    for name, _ in params:
        target = _local(into[name]).zero_()
        sums[name] = target if target.dtype == torch.float32 else torch.zeros_like(target, dtype=torch.float32)
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
    for name in list(sums):
        _local(into[name]).copy_(sums.pop(name).div_(seen))  # a no-op copy when the sum is the buffer


class L2SP(nn.Module):
    """strength/2 · Σ (θ − θ*)²: a pull towards the pretrained weights θ* of every trainable parameter."""

    def __init__(self, strength: float) -> None:
        super().__init__()
        self.strength = strength
        self.data: Mapping | None = None
        self.anchor = ParamBuffers()  # θ*
        self.fisher: ParamBuffers | None = None  # the weights w (EWC); None: all 1
        self.register_buffer("anchored", torch.zeros((), dtype=torch.bool))
        self.params: dict[str, nn.Parameter] = {}  # bound by setup: FSDP2 swaps what named_parameters() yields
        self.sharded = False

    def bind(self, module: L.LightningModule) -> None:
        """Create the state (zeros) laid out like the trainable parameters of the built, sharded model.
        Called from `configure_model`, so a checkpoint's state has buffers to load into."""
        if len(self.anchor):
            return
        params = dict(trainable_parameters(module.model))
        for buffers in (self.anchor, self.fisher):
            if buffers is not None:
                buffers.add(params)
        self.sharded = any(isinstance(p, DTensor) for p in params.values())
        prefix = next((name for name, child in module.named_modules() if child is self), None)
        if prefix is not None:  # DDP would broadcast these from rank 0 at every forward; every rank has them
            ignored = set(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))
            ignored.update(f"{prefix}.{name}" for name, _ in self.named_buffers())
            module._ddp_params_and_buffers_to_ignore = sorted(ignored)

    def setup(self, module: L.LightningModule, dataloader: Iterable | None = None) -> None:
        """Bind the parameters the penalty pulls. On a fresh run take θ* now (call it on the untouched
        model); when a checkpoint restored the state, keep it."""
        self.bind(module)
        self.params = dict(trainable_parameters(module.model))
        if not self.anchored:
            self.take(module, dataloader)
            self.anchored.fill_(True)

    def take(self, module: L.LightningModule, dataloader: Iterable | None) -> None:
        """θ* = the current trainable weights."""
        with torch.no_grad():
            for name, p in self.params.items():
                _local(self.anchor[name]).copy_(_local(p))

    def penalty(self, module: L.LightningModule) -> torch.Tensor:
        """This rank's penalty (its shards' under FSDP2), differentiable in the parameters."""
        if not self.params:
            raise RuntimeError("the regularizer is not set up: call setup(module, dataloader) first")
        total = torch.zeros((), device=module.device)
        for name, p in self.params.items():
            weight = None if self.fisher is None else _local(self.fisher[name])
            total = total + _WeightedSquaredDistance.apply(_local(p), _local(self.anchor[name]), weight)
        return 0.5 * self.strength * total


class EWC(L2SP):
    """strength/2 · Σ F (θ − θ*)², F the diagonal Fisher on `num_samples` rows of original-task data.

    `data` picks those rows like a forgetting set does: `{source: replay}` (the data module's replay
    validation split) or `{path: FILE, format: text}`; prefer data you do not also measure forgetting on.
    """

    def __init__(self, strength: float, num_samples: int = 64, data: Mapping | None = None) -> None:
        super().__init__(strength)
        self.num_samples = num_samples
        self.data = dict(data or {"source": "replay"})
        self.fisher = ParamBuffers()

    def take(self, module: L.LightningModule, dataloader: Iterable | None) -> None:
        """θ* and F on the current (untouched) model."""
        if dataloader is None:
            raise ValueError("EWC needs data to estimate the Fisher: pass a dataloader")
        super().take(module, dataloader)
        diagonal_fisher(module, dataloader, self.num_samples, self.fisher)


class RegularizerSetup(L.Callback):
    """Sets the regularizer up just before the first step: θ* (and F) on the untouched model, or,
    after a resume, the checkpoint's own (the module's state dict restored them), never re-anchored."""

    def __init__(self, regularizer: Regularizer) -> None:
        self.regularizer = regularizer

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if "DeepSpeed" in type(trainer.strategy).__name__:  # before any weights load
            raise ConfigError(
                f"regularizer={type(self.regularizer).__name__}: not supported with DeepSpeed, whose ZeRO stages "
                "partition parameters and gradients outside PyTorch's view. Use strategy=fsdp (sharded) or ddp."
            )

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        from fulltune.forgetting import heldout_loader

        data = None if self.regularizer.anchored else self.regularizer.data
        self.regularizer.setup(module, None if data is None else heldout_loader(trainer.datamodule, data))
