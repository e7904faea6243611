"""The mixture: exact ratios, identical on every rank, reshuffled per epoch, resumable mid-epoch."""

from __future__ import annotations

from collections import Counter

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from fulltune.data.mixture import EpochPlan, MixtureSampler, SourcePlan, interleave, select
from tests.data.helpers import alpaca_rows, datamodule, text_rows, tiny_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tok(cache_dir):
    return tiny_tokenizer(cache_dir)


def sources(weights=(3.0, 1.0), seed=0):
    rng = np.random.default_rng(seed)

    def source(name, group, n, weight):
        lengths = rng.integers(10, 200, n)
        return SourcePlan(name, group, weight, lengths, lengths // 2)

    return [source("a", "task", 1000, weights[0]), source("b", "task", 300, weights[1]),
            source("c", "replay", 5000, None), source("d", "replay", 700, None)]


def plan_of(srcs, replay_ratio=0.2, mix_by="samples", seed=7, batch_size=4):
    picks = select(srcs, replay_ratio, mix_by, seed)
    items = interleave(picks, seed)
    rows = [np.array([k]) for k in range(len(items))]
    labels = np.array([srcs[s].n_labels[i] for s, i in items])
    return picks, EpochPlan(items, rows, labels, batch_size, seed)


def test_samples_mix_is_exact_with_weights_and_natural_shares():
    srcs = sources()
    picks, _ = plan_of(srcs)
    counts = [len(p) for p in picks]
    # task: 1300 samples split 3:1; replay: 1300 * 0.2 / 0.8 = 325 split by size 5000:700
    assert counts == [975, 325, 285, 40]
    assert sum(counts[2:]) / sum(counts) == 0.2
    assert len(set(picks[0].tolist())) == 975  # subsampled: no repeats
    assert sorted(Counter(picks[1].tolist()).values()) == [1] * 275 + [2] * 25  # upsampled evenly
    assert len(set(picks[2].tolist())) == 285


def test_tokens_mix_is_exact_within_one_sample():
    srcs = sources(weights=(None, None))
    picks, _ = plan_of(srcs, replay_ratio=0.1, mix_by="tokens")
    tokens = [int(s.lengths[p].sum()) for s, p in zip(srcs, picks, strict=True)]
    assert tokens[0] == srcs[0].lengths.sum() and tokens[1] == srcs[1].lengths.sum()  # natural task: all once
    target = (tokens[0] + tokens[1]) * 0.1 / 0.9
    replay_total = srcs[2].lengths.sum() + srcs[3].lengths.sum()
    for source, got in zip(srcs[2:], tokens[2:], strict=True):
        assert abs(got - target * source.lengths.sum() / replay_total) <= source.lengths.max() / 2
    assert abs(sum(tokens[2:]) / sum(tokens) - 0.1) < 200 / sum(tokens)


def test_two_ranks_split_the_epoch_and_agree_on_step_token_counts():
    srcs = sources()
    _, plan = plan_of(srcs, batch_size=4)
    _, again = plan_of(srcs, batch_size=4)
    assert again.fingerprint == plan.fingerprint  # a rerun with the same seed: the same plan
    world, accumulate = 2, 5
    ranks = [list(MixtureSampler(plan, rank=r, world_size=world, accumulate=accumulate)) for r in range(world)]
    assert len(ranks[0]) == len(ranks[1]) == plan.batches_per_rank(world)
    seen = Counter(row for batches in ranks for rows, _ in batches for row in rows)
    assert sum(seen.values()) == len(plan.rows)  # every row of the epoch exactly once over both ranks
    label_of = {tuple(map(tuple, plan.items[r].tolist())): int(plan.row_labels[k]) for k, r in enumerate(plan.rows)}
    n = len(ranks[0])
    for i in range(n):
        window = range(i // accumulate * accumulate, min(n, (i // accumulate + 1) * accumulate))
        expected = sum(label_of[row] for r in range(world) for j in window for row in ranks[r][j][0])
        assert ranks[0][i][1] == ranks[1][i][1] == expected
    assert n % accumulate != 0  # the last window is incomplete and counted on its own
    assert max(len(rows) for rows, _ in ranks[0]) == 4


def test_each_epoch_reshuffles_and_every_stretch_keeps_the_ratio():
    srcs = sources()
    _, plan = plan_of(srcs, batch_size=1)
    sampler = MixtureSampler(plan)
    epoch0 = [rows[0] for rows, _ in sampler]
    sampler.set_epoch(1)
    epoch1 = [rows[0] for rows, _ in sampler]
    assert epoch0 != epoch1 and Counter(epoch0) == Counter(epoch1)
    replay = np.array([row[0][0] >= 2 for row in epoch1])
    for start in range(0, len(replay) - 100, 50):  # 20% replay in any 100 consecutive samples, +-2
        assert 18 <= replay[start: start + 100].sum() <= 22
    assert plan_of(srcs, seed=8)[1].fingerprint != plan.fingerprint


def test_sampler_state_resumes_mid_epoch_and_refuses_a_changed_plan():
    _, plan = plan_of(sources(), batch_size=8)
    sampler = MixtureSampler(plan, world_size=2, rank=1)
    sampler.set_epoch(3)
    full = list(sampler)
    it = iter(sampler)
    head = [next(it) for _ in range(5)]
    state = sampler.state_dict()
    assert state["epoch"] == 3 and state["yielded"] == 5
    resumed = MixtureSampler(plan, world_size=2, rank=1)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # Lightning sets the same epoch again after restoring
    assert head + list(resumed) == full
    with pytest.raises(ValueError, match="world_size changed"):
        MixtureSampler(plan, world_size=4).load_state_dict(state)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stateful_dataloader_resumes_the_stream_exactly(tok, tmp_path, num_workers):
    task = write_jsonl(tmp_path / "task.jsonl", alpaca_rows(60))
    replay = write_jsonl(tmp_path / "replay.jsonl", text_rows(80))
    kwargs = dict(replay=[{"path": replay, "format": "text"}], replay_ratio=0.25, batch_size=4,
                  num_workers=num_workers, seed=3)
    dm = datamodule(tok, tmp_path / "cache", [{"path": task, "format": "alpaca"}], **kwargs)
    full = [b["input_ids"] for b in dm.train_dataloader()]
    loader = dm.train_dataloader()
    it = iter(loader)
    head = [next(it)["input_ids"] for _ in range(7)]
    state = loader.state_dict()
    fresh = datamodule(tok, tmp_path / "cache", [{"path": task, "format": "alpaca"}], **kwargs).train_dataloader()
    fresh.load_state_dict(state)
    rest = [b["input_ids"] for b in fresh]
    assert len(head) + len(rest) == len(full) == 20  # (60 + 20 replay) / 4
    assert all(torch.equal(a, b) for a, b in zip(head + rest, full, strict=True))


class _Recorder(L.LightningModule):
    """Records each training batch; one parameter so optimisation is trivial."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.batches: list[tuple[int, list[int]]] = []

    def training_step(self, batch, batch_idx):
        first_tokens = batch["input_ids"][:, 0].tolist()
        self.batches.append((self.current_epoch, [*first_tokens, int(batch["window_label_tokens"])]))
        return (self.w * batch["nonpad_fraction"]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_resume_mid_epoch_continues_the_same_stream(tok, tmp_path):
    task = write_jsonl(tmp_path / "task.jsonl", alpaca_rows(16))
    replay = write_jsonl(tmp_path / "replay.jsonl", text_rows(30))

    def run(max_steps, ckpt_path=None, callbacks=()):
        dm = datamodule(tok, tmp_path / "cache", [{"path": task, "format": "alpaca"}],
                        replay=[{"path": replay, "format": "text"}], replay_ratio=0.2, batch_size=4, seed=5)
        module = _Recorder()
        trainer = L.Trainer(max_steps=max_steps, accumulate_grad_batches=2, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=bool(callbacks), callbacks=list(callbacks),
                            default_root_dir=tmp_path, limit_val_batches=0)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return module.batches

    full = run(max_steps=6)  # 5 micro-batches per epoch (16 + 4 replay rows / 4), 2 per step
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    head = run(max_steps=2, callbacks=[ckpt])
    tail = run(max_steps=6, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))
    assert head + tail == full
    assert {epoch for epoch, _ in full} == {0, 1}  # 3 steps per epoch: 2 + 2 + 1 micro-batches
    # accumulation windows: 2 micro-batches share one count; an epoch's 5th micro-batch stands alone
    windows = [w[-1] for _, w in full[:5]]
    assert windows[0] == windows[1] and windows[2] == windows[3] and windows[4] != windows[3]
