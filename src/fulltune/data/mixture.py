"""The training stream: task and replay sources mixed in exact proportions, identical on every rank.

Semantics (U = samples, or tokens with `mix_by: tokens`; a sample's tokens = its sequence length):

- The task group's budget per epoch is its natural size: every task example once, sum over task sources.
- The replay group's budget is `task_budget * replay_ratio / (1 - replay_ratio)`, so replay is exactly
  `replay_ratio` of the epoch's U. With `replay_ratio: 0` replay sources are not trained on but their
  validation data still gives `val/replay_loss` (forgetting measured, not countered).
- Inside a group, a source's budget is `group_budget * weight / sum(weights)`; `weight: null` on every
  source of a group means natural shares (each example once). A source over its size repeats its
  examples (each k or k+1 times), under its size takes a seeded subset.
- Samples: budgets are apportioned to whole samples (largest remainder), so the group totals are exact.
  Tokens: a source takes examples until its token total is as close to its budget as one sample allows.
- The epoch's multiset of examples is drawn once from `seed`; every epoch trains on the same
  examples in a new order (seeded by seed and epoch). That keeps the number of optimizer steps per
  epoch fixed, which the LR schedule needs.
- The order is a stratified shuffle: each source's rows are shuffled and spread evenly along the
  epoch, so any stretch of training (a short run, the first 100 steps) sees the configured mixture.
  (A packed row counts for the source of its first example; rows are packed from that stratified
  stream in chunks, so one row mixes sources.)
- Rows (one example, or several packed) are cut into micro-batches of at most `batch_size` rows,
  as even as possible, their number a multiple of the world size; rank r takes micro-batches
  r, r+W, r+2W... Every rank computes the same plan, so each micro-batch also carries the label-token
  count of its whole optimizer step (all accumulation micro-batches on all ranks).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from torch.utils.data.distributed import DistributedSampler


@dataclass
class SourcePlan:
    """What the mixture needs of one source: lengths and label counts of its training examples."""

    name: str
    group: str  # "task" | "replay"
    weight: float | None
    lengths: np.ndarray
    n_labels: np.ndarray


def _apportion(total: int, shares: np.ndarray) -> np.ndarray:
    """Whole numbers proportional to `shares` that sum exactly to `total` (largest remainder)."""
    raw = total * shares / shares.sum()
    out = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - out), kind="stable")
    out[order[: total - out.sum()]] += 1
    return out


def _draw(n: int, rng: np.random.Generator) -> Iterator[int]:
    """Example indices of one source: seeded permutations, one after another."""
    while True:
        yield from rng.permutation(n).tolist()


def _take_samples(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    if count == n:
        return np.arange(n)
    draw = _draw(n, rng)
    return np.array([next(draw) for _ in range(count)], dtype=np.int64)


def _take_tokens(lengths: np.ndarray, budget: float, rng: np.random.Generator) -> np.ndarray:
    if np.isclose(budget, lengths.sum()):
        return np.arange(len(lengths))
    draw, taken, total = _draw(len(lengths), rng), [], 0
    while True:
        i = next(draw)
        if total + lengths[i] / 2 > budget:  # taking it would overshoot more than stopping undershoots
            return np.array(taken, dtype=np.int64)
        taken.append(i)
        total += int(lengths[i])


def select(sources: list[SourcePlan], replay_ratio: float, mix_by: str, seed: int) -> list[np.ndarray]:
    """Per source, the example indices of one epoch (with repeats when upsampled)."""
    rng = np.random.default_rng([seed, 0])
    unit = (lambda s: float(s.lengths.sum())) if mix_by == "tokens" else (lambda s: float(len(s.lengths)))
    task_budget = sum(unit(s) for s in sources if s.group == "task")
    budgets = {"task": task_budget, "replay": task_budget * replay_ratio / (1 - replay_ratio)}
    picks: list[np.ndarray] = [np.zeros(0, np.int64)] * len(sources)
    for group, budget in budgets.items():
        members = [i for i, s in enumerate(sources) if s.group == group]
        if not members or budget == 0:
            continue
        natural = np.array([unit(sources[i]) for i in members])
        weights = np.array([sources[i].weight or 0.0 for i in members])
        shares = natural if sources[members[0]].weight is None else weights
        if mix_by == "samples":
            counts = _apportion(round(budget), shares)
            for i, c in zip(members, counts, strict=True):
                picks[i] = _take_samples(len(sources[i].lengths), int(c), rng)
        else:
            for i, share in zip(members, shares / shares.sum(), strict=True):
                picks[i] = _take_tokens(sources[i].lengths, budget * share, rng)
    return picks


def stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A shuffle that spreads each label evenly: the k-th of n items of a label (in random order)
    lands near position k/n, so every stretch of the stream has the mixture's proportions, not only
    the whole epoch."""
    keys = np.empty(len(labels))
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        keys[members] = (np.arange(len(members)) + rng.random(len(members))) / len(members)
    return np.argsort(keys, kind="stable")


def interleave(picks: list[np.ndarray], seed: int) -> np.ndarray:
    """All picks as (source, example) pairs in stratified order (the order packing fills rows in)."""
    items = np.concatenate([np.stack([np.full(len(idx), s, dtype=np.int64), idx], axis=1)
                            for s, idx in enumerate(picks)])
    return items[stratified_order(items[:, 0], np.random.default_rng([seed, 1]))]


@dataclass
class EpochPlan:
    """Rows of items (fixed for the run) and how an epoch orders and batches them."""

    items: np.ndarray  # (N, 2): source, example
    rows: list[np.ndarray]  # item indices per row
    row_labels: np.ndarray  # label tokens per row
    batch_size: int
    seed: int
    fingerprint: str = field(init=False)
    row_source: np.ndarray = field(init=False)  # the source of each row's first example

    def __post_init__(self) -> None:
        self.row_source = self.items[[row[0] for row in self.rows], 0] if self.rows else np.zeros(0, np.int64)
        h = hashlib.sha256(self.items.tobytes())
        h.update(np.concatenate(self.rows).tobytes() if self.rows else b"")
        h.update(f"{self.batch_size}/{self.seed}".encode())
        self.fingerprint = h.hexdigest()[:16]

    def num_micro_batches(self, world_size: int) -> int:
        """Global micro-batches per epoch: enough for batch_size rows each, a multiple of world_size."""
        n = -(-len(self.rows) // self.batch_size)
        return -(-n // world_size) * world_size

    def batches_per_rank(self, world_size: int) -> int:
        return self.num_micro_batches(world_size) // world_size

    def epoch_batches(self, epoch: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's row order and micro-batch boundaries into it."""
        order = stratified_order(self.row_source, np.random.default_rng([self.seed, 2, epoch]))
        n = self.num_micro_batches(world_size)
        if n > len(self.rows):
            raise ValueError(f"{len(self.rows)} training rows cannot fill {n} micro-batches "
                             f"({world_size} ranks): use more data or fewer ranks")
        bounds = (np.arange(n + 1) * len(self.rows)) // n
        return order, bounds


class MixtureSampler(DistributedSampler):
    """Yields this rank's micro-batches of the epoch plan, each with its optimizer-step label count.

    Subclasses `DistributedSampler` only so that Lightning keeps it as the distributed sampler instead
    of wrapping it; it shards by itself (every rank computes the same plan). Stateful: the
    `StatefulDataLoader` saves (epoch, batches yielded), and resuming continues mid-epoch.
    """

    def __init__(self, plan: EpochPlan, rank: int = 0, world_size: int = 1, accumulate: int = 1) -> None:
        # DistributedSampler.__init__ needs a dataset and a process group; nothing of it is used
        self.plan, self.rank, self.num_replicas, self.accumulate = plan, rank, world_size, accumulate
        self.epoch = 0
        self._start = 0  # where the next iteration starts (set when resuming)
        self._yielded = 0
        self._cache: tuple[int, list, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.plan.batches_per_rank(self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._start, self._yielded = epoch, 0, 0

    def rank_batches(self, epoch: int) -> tuple[list[list[np.ndarray]], np.ndarray]:
        """This rank's micro-batches (rows of items) and each one's window label-token count."""
        if self._cache is None or self._cache[0] != epoch:
            order, bounds = self.plan.epoch_batches(epoch, self.num_replicas)
            labels = np.add.reduceat(self.plan.row_labels[order], bounds[:-1])
            world, per_rank = self.num_replicas, len(self)
            window = np.arange(per_rank) // self.accumulate  # per-rank batch i -> its optimizer step
            global_window = np.repeat(window, world)  # global micro-batch j = i * world + rank
            window_tokens = np.bincount(global_window, weights=labels).astype(np.int64)[window]
            mine = range(self.rank, len(bounds) - 1, world)
            batches = [[self.plan.rows[r] for r in order[bounds[j]: bounds[j + 1]]] for j in mine]
            self._cache = (epoch, batches, window_tokens)
        return self._cache[1], self._cache[2]

    def __iter__(self) -> Iterator[tuple]:
        start, self._start = self._start, 0
        self._yielded = start
        return self._iterate(self.epoch, start)

    def _iterate(self, epoch: int, start: int) -> Iterator[tuple]:
        batches, window_tokens = self.rank_batches(epoch)
        for i in range(start, len(batches)):
            self._yielded = i + 1
            rows = tuple(tuple(map(tuple, self.plan.items[row].tolist())) for row in batches[i])
            yield rows, int(window_tokens[i])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "yielded": self._yielded, "plan": self.plan.fingerprint,
                "world_size": self.num_replicas, "accumulate": self.accumulate}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        changed = [k for k in ("plan", "world_size", "accumulate") if state.get(k) != mine[k]]
        if changed:
            raise ValueError(
                f"cannot resume the data stream mid-epoch: {', '.join(changed)} changed since the checkpoint "
                "(data, batch_size, seed, devices or accumulate_grad_batches); keep them as they were")
        self.epoch, self._start, self._yielded = state["epoch"], state["yielded"], state["yielded"]
