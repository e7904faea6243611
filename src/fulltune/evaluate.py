"""Task evaluation before and after training: validation loss and exact-match accuracy.

Evaluation sets are split across ranks (`RankShare`) and the results combined exactly, so every
rank gets the numbers one process would compute over the whole set, in 1/world of the time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from fulltune.models import stop_ids
from fulltune.preflight import ConfigError
from fulltune.strategies import FSDP2Strategy


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model in eval mode (no dropout) for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class RankShare:
    """Which items of an evaluation set (loss batches, generation batches) this rank evaluates.

    Items are dealt round-robin (rank r takes r, r + world, ...) and the results summed or gathered
    back in order. `lockstep`: every forward is a collective (FSDP2 gathers each layer's shards,
    ZeRO-3 its partitions), so all ranks must run as many forwards: a short rank repeats item 0 as a
    filler whose result is dropped, and generation is synced. One process: everything, in order.
    """

    rank: int = 0
    world: int = 1
    lockstep: bool = False

    @classmethod
    def of(cls, trainer: L.Trainer | None) -> RankShare:
        """This rank's share under `trainer`'s strategy (one process without a trainer)."""
        if trainer is None or trainer.world_size == 1:
            return cls()
        strategy = trainer.strategy
        lockstep = isinstance(strategy, FSDP2Strategy) or (
            isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3)
        return cls(trainer.global_rank, trainer.world_size, lockstep)

    def deal(self, items: Iterable) -> Iterator[tuple[Any, bool]]:
        """`(item, is_filler)` for this rank's items, then (lockstep) fillers up to the longest share."""
        first, n = None, 0
        for k, item in enumerate(items):
            if k == 0:
                first = item
            if k % self.world == self.rank:
                yield item, False
            n = k + 1
        short = -(-n // self.world) - len(range(self.rank, n, self.world))  # 0 or 1
        for _ in range(short if self.lockstep else 0):
            yield first, True

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the ranks (in place)."""
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def gather(self, mine: list) -> list:
        """Every rank's results of `deal` (fillers dropped) on every rank, in the items' order."""
        if self.world == 1:
            return mine
        parts: list[list] = [[] for _ in range(self.world)]
        torch.distributed.all_gather_object(parts, mine)
        return [parts[k % self.world][k // self.world] for k in range(sum(map(len, parts)))]


@torch.no_grad()
def greedy_completions(
    model: torch.nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
    stop_token_ids: list[int] | None = None, share: RankShare | None = None,
) -> list[str]:
    """Greedy continuations of token-id prompts (left-padded batches, KV cache on), stopped at
    `stop_token_ids` (the data's completion end, e.g. a chat turn end) or else the tokenizer's EOS,
    and at the model's own EOS ids.

    The ranks of `share` split whole batches, so each batch is padded exactly as in one process and
    the tokens are the same. In lockstep, `synced_gpus=True` keeps a rank whose batch has ended
    stepping until all have; without it the ranks' collectives fall out of step. transformers would
    guess it from FSDP2's module marker or its global ZeRO-3 config; given, it rests on the strategy.
    """
    share = share or RankShare()
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    synced = {"synced_gpus": True} if share.lockstep else {}
    batches = [prompts[start : start + batch_size] for start in range(0, len(prompts), batch_size)]
    stops = stop_ids(model.generation_config, stop_token_ids or [tokenizer.eos_token_id])
    texts = []
    for chunk, filler in share.deal(batches):
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=pad, eos_token_id=stops, use_cache=True, **synced,
        )
        if not filler:
            texts.append(tokenizer.batch_decode(out[:, width:], skip_special_tokens=True))
    return [text for batch in share.gather(texts) for text in batch]


@torch.no_grad()
def mean_token_loss(module: L.LightningModule, loader: Iterable[dict], share: RankShare | None = None) -> float:
    """Token-weighted mean next-token loss over every batch of `loader` (eval mode), on every rank.

    The ranks split the batches (`share`, by default from the module's trainer) and sum (loss, label
    tokens) in float64, so the value is that of one process over the whole loader, without the
    duplicated rows a distributed sampler pads with.
    """
    share = share or RankShare.of(module._trainer)
    totals = torch.zeros(2, dtype=torch.float64, device=module.device)
    with eval_mode(module.model):
        for batch, filler in share.deal(loader):
            loss_sum, n_tokens = module.token_loss_sum(module.transfer_batch_to_device(batch, module.device, 0))
            if not filler:
                totals += torch.stack([loss_sum.double(), n_tokens.double()])
    totals = share.all_sum(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()


def validated_loss(trainer: L.Trainer, module: L.LightningModule, source: str) -> float | None:
    """The loss of validation source `source` when the validation that just ran measured these very
    weights (this optimizer step) on all its batches, in the numbers `mean_token_loss` gives: fp32
    with no autocast (validation steps run under the precision plugin's autocast, callbacks do not).
    None otherwise: the caller measures."""
    last = getattr(module, "last_validation", None)
    if (last is None or last[0] != trainer.global_step or trainer.sanity_checking
            or str(trainer.precision) != "32-true" or trainer.limit_val_batches != 1.0):
        return None
    return last[1].get(source)


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

    def check_data(self, datamodule: L.LightningDataModule) -> None:
        """Raise ConfigError, before training starts, when the data cannot feed this evaluation."""

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.global_step == 0:
            self.results.update({f"{self.prefix}/{k}_before": v for k, v in self.evaluate(trainer, module).items()})

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        after = self.evaluate(trainer, module)
        self.results.update({f"{self.prefix}/{k}_after": v for k, v in after.items()})
        self.results.update(self.derived(after))
        for logger in trainer.loggers:
            logger.log_metrics(self.results, step=trainer.global_step)

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

    def check_data(self, datamodule: L.LightningDataModule) -> None:
        if "task" not in datamodule.val_source_names:  # val_dataloader()[0] would be replay text, or nothing
            raise ConfigError(
                "eval.task scores the task's validation split, and no data.task source has one: give a task "
                "source val_path: FILE (or val_size: N to hold out N of its rows), or drop this evaluation "
                "with eval.task=null")

    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, float]:
        datamodule, share = trainer.datamodule, RankShare.of(trainer)
        loss = validated_loss(trainer, module, "task")  # after a validation at the last step: its task loss
        if loss is None:
            loss = mean_token_loss(module, datamodule.val_dataloader()[0], share)
        examples = datamodule.generation_examples(self.num_examples)
        with eval_mode(module.model) as model:
            predictions = greedy_completions(
                model, datamodule.tokenizer, [e["prompt_ids"] for e in examples], self.max_new_tokens,
                self.batch_size, datamodule.stop_token_ids, share,
            )
        return {"loss": loss, "accuracy": exact_match(predictions, [e["answer"] for e in examples])}
