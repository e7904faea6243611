"""CausalLMModule: trains an HF causal LM with a token-normalised loss."""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch
from omegaconf import DictConfig

from fulltune.finetune import apply_finetune, decoder_layers
from fulltune.loss import LabelLossHead, full_logits_loss_sum, install_label_loss_head
from fulltune.models import build_model, resolve_weights
from fulltune.optim import optimizer_keywords, param_groups
from fulltune.regularizers import Regularizer
from fulltune.step_in_backward import StepInBackward
from fulltune.strategies import FSDP2Strategy, load_sharded_weights


class CausalLMModule(L.LightningModule):
    """Wraps `AutoModelForCausalLM` built from a model spec (conf/model/*.yaml).

    The model is built in `configure_model`, so sharded strategies can build it their way, and a
    dry run never touches weights. `optimizer` and `scheduler` are Hydra partials completed here.
    """

    def __init__(
        self,
        model: DictConfig,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler] | None = None,
        finetune: DictConfig | None = None,
        regularizer: Regularizer | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "regularizer"])
        self.spec = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.finetune = finetune
        self.regularizer = regularizer  # a penalty towards the pretrained weights (EWC, L2-SP), or None
        self.model: torch.nn.Module | None = None
        self.last_validation: tuple[int, dict[str, float]] | None = None  # (global step, loss per source)

    def configure_model(self) -> None:
        """Build (and under FSDP, shard) the model once the strategy is set up.

        Under FSDP a pretrained model is built on the meta device and each rank loads only its shards;
        a `source: config` model is initialised in full first so its random weights match DDP's.
        Under ZeRO-3 the strategy's context makes transformers create it partitioned.
        """
        if self.model is not None:
            return
        strategy = self._trainer.strategy if self._trainer is not None else None
        fsdp = isinstance(strategy, FSDP2Strategy)
        on_meta = fsdp and self.spec.source != "config"
        model = build_model(self.spec, device="meta" if on_meta else None)
        if self.spec.gradient_checkpointing:  # non-reentrant: the variant that works under FSDP (transformers #28499)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        install_label_loss_head(model, self.spec.loss_chunk_tokens)
        model = apply_finetune(model, self.finetune)
        if self.spec.get("compile"):  # one compiled graph per decoder layer: the layers share it, and it
            for layer in decoder_layers(model)[1]:  # compiles in seconds where the whole model takes minutes
                layer.compile()
        if fsdp:
            strategy.shard(model)
        if on_meta:
            load_sharded_weights(model, resolve_weights(self.spec), strategy.root_device)
        self.model = model
        if self.regularizer is not None:  # its state's buffers, laid out like the weights, before a checkpoint loads
            self.regularizer.bind(self)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            use_cache=False,
        ).logits

    def token_loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy over label tokens (not -100), and their count. The head
        sees label positions only, in chunks (fulltune.loss): no tokens x vocab logits exist."""
        labels = batch["labels"]
        n_tokens = (labels[:, 1:] != -100).sum()
        head = self.model.get_output_embeddings()
        if not isinstance(head, LabelLossHead):  # a model that post-processes its logits
            return full_logits_loss_sum(self(batch), labels), n_tokens
        with head.labels(labels):
            return self(batch), n_tokens

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss_sum, n_tokens = self.token_loss_sum(batch)
        # Normalise by the label tokens of the whole optimizer step (every micro-batch on every rank):
        # Lightning divides by accumulate_grad_batches and DDP averages over ranks, so scale back up.
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size
        window = batch.get("window_label_tokens", n_tokens * scale)
        self.log("train/loss", loss_sum / n_tokens.clamp(min=1), prog_bar=True)
        self.log("train/nonpad_fraction", batch["nonpad_fraction"])
        loss = loss_sum * scale / window.clamp(min=1)
        if self.regularizer is not None:  # added whole to every micro-batch: Lightning divides by k
            penalty = self.regularizer.penalty(self)
            self.log("train/penalty", penalty.detach(), sync_dist=self.regularizer.sharded, reduce_fx="sum")
            loss = loss + penalty
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(len(self.val_source_names), 2, device=self.device, dtype=torch.float64)
        self.last_validation = None

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        loss_sum, n_tokens = self.token_loss_sum(batch)
        self._val_sums[dataloader_idx] += torch.stack([loss_sum.detach().double(), n_tokens.double()])

    def validation_losses(self) -> dict[str, float]:
        """Token-weighted mean loss per validation source of the validation that just ran, exact across
        ranks: reduced once (every rank calls it), then kept with its step in `last_validation`, so
        evaluations of the same weights (forgetting on a `source` set, the task loss after the last
        step) reuse it instead of running the same batches again."""
        if self.last_validation is None:
            sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
            losses = {name: (loss_sum / n_tokens.clamp(min=1)).item()
                      for name, (loss_sum, n_tokens) in zip(self.val_source_names, sums, strict=False)}
            self.last_validation = (self.global_step, losses)
        return self.last_validation[1]

    def on_validation_epoch_end(self) -> None:
        losses = self.validation_losses()
        for name, loss in losses.items():
            self.log(f"val/{name}_loss", loss, prog_bar=name == "task")
        self.log("val/loss", losses[self.val_source_names[0]])

    @property
    def val_source_names(self) -> list[str]:
        return list(getattr(self.trainer.datamodule, "val_source_names", ["task"]))

    def total_optimizer_steps(self) -> int:
        """Optimizer steps of the whole run, from the data plan, never from
        `trainer.estimated_stepping_batches` (it resets the loaders and loses the mid-epoch resume
        position: pytorch-lightning #20550)."""
        trainer = self.trainer
        per_epoch = math.ceil(
            trainer.datamodule.num_train_batches(trainer.world_size) / trainer.accumulate_grad_batches
        )
        by_epochs = per_epoch * trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        candidates = [s for s in (trainer.max_steps if trainer.max_steps > 0 else None, by_epochs) if s]
        if not candidates:
            raise ValueError("set trainer.max_steps or trainer.max_epochs so the LR schedule has a length")
        return min(candidates)

    def configure_optimizers(self):
        factory = self.optimizer_factory
        weight_decay = optimizer_keywords(factory).get("weight_decay", 0.0)
        optimizer = factory(param_groups(self.model.parameters(), weight_decay))
        if isinstance(optimizer, StepInBackward):  # under DDP its steps run in DDP's reduce hook
            optimizer.attach(self.trainer.strategy.model)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, self.total_optimizer_steps())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
