"""Task evaluation before and after training: validation loss and exact-match accuracy."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model in eval mode (no dropout) for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def greedy_completions(
    model: torch.nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
    stop_token_ids: list[int] | None = None,
) -> list[str]:
    """Greedy continuations of token-id prompts (left-padded batches, KV cache on), stopped at
    `stop_token_ids` (the data's completion end, e.g. a chat turn end) or else the tokenizer's EOS."""
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    texts = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=pad, eos_token_id=stop_token_ids or tokenizer.eos_token_id, use_cache=True,
        )
        texts += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return texts


@torch.no_grad()
def mean_token_loss(module: L.LightningModule, loader) -> float:
    """Token-weighted mean next-token loss over every batch of `loader` on this rank (eval mode).

    Every rank walks the whole loader, so sharded models (FSDP2) see the same batches on all ranks
    and the value is exact and identical everywhere, with no sampler padding.
    """
    totals = torch.zeros(2, dtype=torch.float64, device=module.device)
    with eval_mode(module.model):
        for batch in loader:
            loss_sum, n_tokens = module.token_loss_sum(module.transfer_batch_to_device(batch, module.device, 0))
            totals += torch.stack([loss_sum.double(), n_tokens.double()])
    return (totals[0] / totals[1].clamp(min=1)).item()


def exact_match(predictions: list[str], answers: list[str]) -> float:
    """Fraction of predictions equal to their answer, ignoring surrounding whitespace."""
    return sum(p.strip() == a.strip() for p, a in zip(predictions, answers, strict=False)) / max(len(answers), 1)


class BeforeAfterEvaluation(L.Callback):
    """Scores the untouched model before the first step and the trained one after the last:
    `<prefix>/<metric>_before|_after` (plus what `derived` adds) in `results`, every logger and
    summary.json. `results` travel in checkpoints, so a resumed run keeps its first measurement."""

    prefix: str

    def __init__(self) -> None:
        self.results: dict[str, float] = {}

    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, float]:
        raise NotImplementedError

    def derived(self, after: dict[str, float]) -> dict[str, float]:
        """Results computed from the before and after scores (none by default)."""
        return {}

    def describe(self, after: dict[str, float]) -> str:
        raise NotImplementedError

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.global_step == 0:
            self.results.update({f"{self.prefix}/{k}_before": v for k, v in self.evaluate(trainer, module).items()})

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        after = self.evaluate(trainer, module)
        self.results.update({f"{self.prefix}/{k}_after": v for k, v in after.items()})
        self.results.update(self.derived(after))
        for logger in trainer.loggers:
            logger.log_metrics(self.results, step=trainer.global_step)
        rank_zero_info(self.describe(after))

    def state_dict(self) -> dict:
        return {"results": self.results}

    def load_state_dict(self, state_dict: dict) -> None:
        self.results = dict(state_dict["results"])


class TaskEvaluation(BeforeAfterEvaluation):
    """The fine-tuning task before and after: loss on the task validation set and exact-match
    accuracy of greedy generation."""

    prefix = "task"

    def __init__(self, num_examples: int = 64, max_new_tokens: int = 16, batch_size: int = 32) -> None:
        super().__init__()
        self.num_examples = num_examples
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, float]:
        datamodule = trainer.datamodule
        loss = mean_token_loss(module, datamodule.val_dataloader()[0])
        examples = datamodule.generation_examples(self.num_examples)
        with eval_mode(module.model) as model:
            predictions = greedy_completions(
                model, datamodule.tokenizer, [e["prompt_ids"] for e in examples], self.max_new_tokens,
                self.batch_size, datamodule.stop_token_ids,
            )
        return {"loss": loss, "accuracy": exact_match(predictions, [e["answer"] for e in examples])}

    def describe(self, after: dict[str, float]) -> str:
        return "task {:>8} {:>8}\n  loss {loss_before:8.4f} {loss_after:8.4f}\n  acc  {accuracy_before:8.1%} " \
            "{accuracy_after:8.1%}".format("before", "after", **{k.split("/")[1]: v for k, v in self.results.items()})
