"""EWC and L2-SP: penalties against hand computations, the Fisher's shape and sign, FSDP2 shards, a run."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F

from fulltune.evaluate import mean_token_loss
from fulltune.models import build_model
from fulltune.module import CausalLMModule
from fulltune.regularizers import EWC, L2SP, RegularizerSetup
from fulltune.train import fit

from .conftest import REPLAY


def tiny_module(cfg, finetune=None) -> CausalLMModule:
    module = CausalLMModule(model=cfg.model, optimizer=None, finetune=finetune)
    module.configure_model()
    return module


def random_batches(vocab: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Two batches of 3 rows; the first 5 positions are a masked prompt."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(2):
        ids = torch.randint(3, vocab, (3, 20), generator=gen)
        labels = ids.clone()
        labels[:, :5] = -100
        batches.append({"input_ids": ids, "labels": labels, "window_label_tokens": (labels != -100).sum()})
    return batches


def row_gradients(model: torch.nn.Module, batches: list[dict], n: int) -> list[dict[str, torch.Tensor]]:
    """Per-row gradients of the row's token-mean NLL, written out independently of the module's loss."""
    params = dict(model.named_parameters())
    rows = [(b["input_ids"][i], b["labels"][i]) for b in batches for i in range(len(b["input_ids"]))][:n]
    grads = []
    for ids, labels in rows:
        logp = F.log_softmax(model(input_ids=ids[None]).logits[0, :-1].float(), dim=-1)
        target = labels[1:]
        keep = target != -100
        nll = -logp[keep].gather(1, target[keep, None]).mean()
        grads.append(dict(zip(params, torch.autograd.grad(nll, list(params.values())), strict=True)))
    return grads


def perturb(module: CausalLMModule, seed: int = 1) -> dict[str, torch.Tensor]:
    """Move every trainable parameter by a fixed random delta (each FSDP2 rank adds its shard of it)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if p.requires_grad:
                deltas[name] = 1e-2 * torch.randn(p.shape, generator=gen)
                sharded = isinstance(p, DTensor)
                p += distribute_tensor(deltas[name], p.device_mesh, p.placements) if sharded else deltas[name]
    return deltas


def test_ewc_penalty_matches_a_hand_computation_and_is_zero_at_the_anchor(tiny_cfg):
    cfg = tiny_cfg()
    module = tiny_module(cfg)
    batches = random_batches(cfg.model.config.vocab_size)
    ewc = EWC(strength=1e4, num_samples=5)  # 5 of the 6 rows: stops mid-batch
    ewc.setup(module, batches)

    assert ewc.penalty(module).item() == 0.0
    params = dict(module.model.named_parameters())
    assert ewc.weight.keys() == params.keys()
    for name, fisher in ewc.weight.items():
        assert fisher.shape == params[name].shape and fisher.dtype == params[name].dtype
        assert (fisher >= 0).all() and fisher.max() > 0, name

    grads = row_gradients(module.model, batches, 5)
    hand_fisher = {name: torch.stack([g[name] ** 2 for g in grads]).mean(0) for name in params}
    for name in params:
        torch.testing.assert_close(ewc.weight[name], hand_fisher[name], rtol=1e-4, atol=1e-12)

    deltas = perturb(module)
    expected = 0.5 * 1e4 * sum((hand_fisher[n].double() * deltas[n].double() ** 2).sum() for n in params)
    penalty = ewc.penalty(module)
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-4)
    assert penalty.item() > 0
    penalty.backward()  # d/dθ = strength · F · (θ − θ*)
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(params[name].grad, 1e4 * hand_fisher[name] * deltas[name], rtol=1e-3, atol=1e-10)


def test_l2sp_pulls_only_trainable_params_towards_the_anchor(tiny_cfg):
    cfg = tiny_cfg("finetune=freeze", "finetune.top_layers=1", "finetune.modules=[]")
    module = tiny_module(cfg, cfg.finetune)
    l2sp = L2SP(strength=0.5)
    l2sp.setup(module)
    assert l2sp.penalty(module).item() == 0.0
    assert set(l2sp.anchor) == {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert all(n.startswith("model.layers.1.") for n in l2sp.anchor)
    deltas = perturb(module)
    expected = 0.25 * sum((d.double() ** 2).sum() for d in deltas.values())
    assert l2sp.penalty(module).item() == pytest.approx(expected.item(), rel=1e-5)


CHECKED = ["model.layers.0.self_attn.q_proj.weight", "model.norm.weight", "model.embed_tokens.weight"]


def ewc_training_step(module: CausalLMModule, batches: list[dict]) -> tuple[EWC, float]:
    """Set EWC up, move the weights, then one backward of task loss + penalty in training_step's order
    (the penalty after the forward, when FSDP2 has swapped the root unit's unsharded copies in).
    An evaluation pass first, as the evaluators run one at train start: it leaves the root unsharded."""
    mean_token_loss(module, batches)
    ewc = EWC(strength=1e4, num_samples=5)
    ewc.setup(module, batches)
    perturb(module)  # same deltas on every rank (same seed): each rank adds its shard of them
    loss_sum, n_tokens = module.token_loss_sum(batches[0])
    penalty = ewc.penalty(module)
    (loss_sum / n_tokens + penalty).backward()
    return ewc, penalty.item()


def _sharded_worker(rank: int, world: int, port: int, cfg, batches, queue) -> None:
    """One FSDP2 rank (one unit per decoder layer + the root, as strategy=fsdp shards): local shards out."""
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    module = tiny_module(cfg)
    for layer in module.model.model.layers:
        fully_shard(layer)
    fully_shard(module.model)
    ewc, penalty = ewc_training_step(module, batches)
    state = [ewc.state_dict()]  # every rank gathers; as in a checkpoint, rank 0's copy is what all load
    dist.broadcast_object_list(state, src=0)
    restored = EWC(strength=1e4)
    restored.load_state_dict(state[0])
    assert restored.penalty(module).item() == pytest.approx(penalty, rel=1e-6)  # its own shard back
    shards = {name: (ewc.weight[name].to_local().numpy().copy(), ewc.params[name].grad.to_local().numpy().copy(),
                     ewc.weight[name].placements[0].dim) for name in CHECKED}
    queue.put((rank, ewc.sharded, penalty, shards))
    dist.destroy_process_group()


def test_ewc_under_fsdp2_keeps_shards_that_add_up_to_the_unsharded_run(tiny_cfg):
    """Every rank holds the Fisher and anchor of its own shards; the per-rank penalties sum to the
    unsharded penalty, the gradients (task averaged over ranks + local penalty) match, and the state
    a checkpoint keeps (rank 0's) gives every rank its own shard back."""
    import socket

    import torch.multiprocessing as mp

    cfg = tiny_cfg()
    batches = random_batches(cfg.model.config.vocab_size)
    reference = tiny_module(cfg)
    expected, penalty = ewc_training_step(reference, batches)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_sharded_worker, args=(r, 2, port, cfg, batches, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = sorted((queue.get(timeout=90) for _ in procs), key=lambda r: r[0])
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():  # a rank that failed leaves the other waiting in a collective
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]

    assert all(sharded for _, sharded, _, _ in results)
    assert sum(r[2] for r in results) == pytest.approx(penalty, rel=1e-4)
    for name in CHECKED:
        dim = results[0][3][name][2]
        fisher, grad = (torch.cat([torch.from_numpy(r[3][name][k]) for r in results], dim=dim) for k in (0, 1))
        torch.testing.assert_close(fisher, expected.weight[name], rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(grad, expected.params[name].grad, rtol=1e-4, atol=1e-7)


def test_ewc_run_logs_the_penalty_and_checkpoints_the_pretrained_anchor(tiny_cfg, tmp_path):
    cfg = tiny_cfg(REPLAY, "regularizer=ewc", "regularizer.num_samples=8", "trainer.max_steps=4",
                   "finetune.lr=3e-3", "save_steps=4", "eval.task=null", "eval.forgetting=null")
    summary = fit(cfg)

    with open(tmp_path / "csv" / "metrics.csv") as f:
        penalties = [float(r["train/penalty"]) for r in csv.DictReader(f) if r.get("train/penalty")]
    assert len(penalties) == 4 and penalties[0] == 0.0 and penalties[-1] > 0  # 0 at θ*, grows as θ moves
    assert json.loads((tmp_path / "summary.json").read_text())["train/penalty"] == summary["train/penalty"] > 0

    # The checkpoint keeps θ* = the untouched weights (a resumed run must not re-anchor on trained ones).
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    state = ckpt["callbacks"]["RegularizerSetup"]["regularizer"]
    initial = build_model(cfg.model).state_dict()
    assert state["anchor"].keys() == state["weight"].keys()
    for name, anchor in state["anchor"].items():
        torch.testing.assert_close(anchor, initial[name], rtol=0, atol=0)
    restored = RegularizerSetup(EWC(strength=1.0))
    restored.load_state_dict(ckpt["callbacks"]["RegularizerSetup"])
    assert restored.ready and restored.regularizer.anchor.keys() == state["anchor"].keys()
