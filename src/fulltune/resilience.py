"""Non-finite numbers: a NaN/Inf loss or gradient norm skips the optimizer step instead of
spreading NaN into the weights; a run that keeps producing them stops with a message."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from fulltune.checkpointing import latest_checkpoint
from fulltune.preflight import ConfigError

log = logging.getLogger(__name__)


class NonFiniteGuard(L.Callback):
    """Skip every optimizer step whose loss (any micro-batch, any rank) or gradient norm is not finite.

    The decision is reduced over ranks before the step, so under DDP and FSDP2 every rank skips the
    same steps. A skip drops the gradients (`grad = None`): the optimizer leaves those parameters and
    their moments untouched, while the data position and the LR schedule move on (what an fp16
    loss-scale skip does too). After `max_consecutive` skipped steps in a row the run stops.

    `optimizer.step_in_backward=true` steps each parameter during backward: the decision is made from
    the loss before backward starts (reduced over ranks), and a skipped step's gradients are dropped
    as they arrive. A finite loss whose gradient overflows is stepped there (no norm exists before it).

    fp16: the loss scaler owns gradient overflows (it skips them and lowers the scale); they are
    logged as `train/loss_scale_skips`, and only a non-finite loss counts here. DeepSpeed keeps its
    gradients in its own partitions and steps inside its engine: a non-finite loss is counted and
    stops the run after `max_consecutive`, the skip itself is DeepSpeed's (its fp16 loss scaler).
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self._bad_loss: torch.Tensor | None = None
        self._last_scale: float | None = None
        self.loss_scale_skips = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # restored by now when resuming
        self._last_scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()  # a tensor: no device sync per micro-batch
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        if getattr(optimizer, "in_backward", False):  # the step runs inside this backward: decide now, on every rank
            if trainer.world_size > 1:
                self._bad_loss = trainer.strategy.reduce(self._bad_loss.float(), reduce_op="max") > 0
            optimizer.skip = bool(self._bad_loss)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        device = trainer.strategy.root_device
        bad = self._bad_loss.float() if self._bad_loss is not None else torch.zeros((), device=device)
        self._bad_loss = None
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads and getattr(trainer.precision_plugin, "scaler", None) is None:
            local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP2: this rank's shard
            squares = torch.stack([n.float().square() for n in torch._foreach_norm(local)]).sum()
            bad = torch.maximum(bad, (~torch.isfinite(squares)).float().to(bad.device))
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad.to(device), reduce_op="max")
        if not bool(bad):
            self.consecutive = 0
            return
        for p in pl_module.parameters():
            p.grad = None
        self.skipped += 1
        self.consecutive += 1
        if trainer.is_global_zero:
            log.warning("step %d: non-finite loss or gradient norm, optimizer step skipped (%d in a row, %d in all)",
                        trainer.global_step + 1, self.consecutive, self.skipped)
        if self.consecutive >= self.max_consecutive:
            self._stop(trainer)

    def _stop(self, trainer: L.Trainer) -> None:
        first = trainer.global_step + 2 - self.consecutive
        callback = trainer.checkpoint_callback
        kept = latest_checkpoint(Path(callback.dirpath)) if callback is not None and callback.dirpath else None
        raise ConfigError(
            f"{self.consecutive} optimizer steps in a row (steps {first}-{trainer.global_step + 1}) had a NaN/Inf "
            f"loss or gradient norm and were skipped (max_nonfinite_steps={self.max_consecutive}); the run "
            f"stopped. Its last complete checkpoint is {kept or 'none'} (skipped steps never reach the weights). "
            "Check the data of those steps, lower optimizer.lr, or train in bf16/fp32 rather than fp16; then "
            "rerun with resume=auto."
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        metrics = {"train/nonfinite_skipped_steps": float(self.skipped)}
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scale = scaler.get_scale()
            if self._last_scale is not None and scale < self._last_scale:
                self.loss_scale_skips += 1
            self._last_scale = scale
            metrics |= {"train/loss_scale": scale, "train/loss_scale_skips": float(self.loss_scale_skips)}
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        if engine is not None and getattr(engine, "skipped_steps", None) is not None:
            metrics["train/loss_scale_skips"] = float(engine.skipped_steps)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive, "loss_scale_skips": self.loss_scale_skips}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = state_dict["skipped"]
        self.consecutive = state_dict["consecutive"]
        self.loss_scale_skips = state_dict["loss_scale_skips"]
