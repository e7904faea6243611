"""Task evaluation before and after training: validation loss and exact-match accuracy."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info


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
    model = module.model
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=module.device)
    for batch in loader:
        loss_sum, n_tokens = module.token_loss_sum(module.transfer_batch_to_device(batch, module.device, 0))
        totals += torch.stack([loss_sum.double(), n_tokens.double()])
    model.train(was_training)
    return (totals[0] / totals[1].clamp(min=1)).item()


def exact_match(predictions: list[str], answers: list[str]) -> float:
    """Fraction of predictions equal to their answer, ignoring surrounding whitespace."""
    return sum(p.strip() == a.strip() for p, a in zip(predictions, answers, strict=False)) / max(len(answers), 1)


class TaskEvaluation(L.Callback):
    """Measures the task before the first step and after the last: loss on the task validation set
    and exact-match accuracy of greedy generation. Results land in `results` and summary.json."""

    def __init__(self, num_examples: int = 64, max_new_tokens: int = 16, batch_size: int = 32) -> None:
        self.num_examples = num_examples
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.results: dict[str, float] = {}

    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, float]:
        datamodule = trainer.datamodule
        loss = mean_token_loss(module, datamodule.val_dataloader()[0])
        model = module.model
        was_training = model.training
        model.eval()
        examples = datamodule.generation_examples(self.num_examples)
        predictions = greedy_completions(
            model, datamodule.tokenizer, [e["prompt_ids"] for e in examples], self.max_new_tokens, self.batch_size,
            datamodule.stop_token_ids,
        )
        model.train(was_training)
        answers = [e["answer"] for e in examples]
        self.last_predictions = list(zip(predictions, answers, strict=False))
        return {"loss": loss, "accuracy": exact_match(predictions, answers)}

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.fit_loop.epoch_loop.global_step == 0:  # a resumed run keeps its first measurement
            self.results.update({f"task/{k}_before": v for k, v in self.evaluate(trainer, module).items()})

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.results.update({f"task/{k}_after": v for k, v in self.evaluate(trainer, module).items()})
        for logger in trainer.loggers:
            logger.log_metrics(self.results, step=trainer.global_step)
        rank_zero_info(
            "task {:>8} {:>8}\n  loss {loss_before:8.4f} {loss_after:8.4f}\n  acc  {accuracy_before:8.1%} "
            "{accuracy_after:8.1%}".format(
                "before", "after", **{k.split("/")[1]: v for k, v in self.results.items()}
            )
        )

    def state_dict(self) -> dict:
        return {"results": self.results}

    def load_state_dict(self, state_dict: dict) -> None:
        self.results = dict(state_dict["results"])
