"""EWC and L2-SP: penalties against hand computations, the Fisher's shape and sign, FSDP2 shards, a run,
and sharded checkpoints of their state that resume to the same penalty."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F

from fulltune.evaluate import mean_token_loss
from fulltune.export import read_checkpoint
from fulltune.models import build_model
from fulltune.module import CausalLMModule
from fulltune.regularizers import EWC, L2SP
from fulltune.safe_load import load_checkpoint_file
from fulltune.train import fit

from .conftest import REPLAY
from .strategy_runs import EQUAL_RUN, from_pretrained, pretrained_tiny, run_train


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
    assert list(ewc.fisher) == list(params)
    for name in params:
        fisher = ewc.fisher[name]
        assert fisher.shape == params[name].shape and fisher.dtype == params[name].dtype
        assert (fisher >= 0).all() and fisher.max() > 0, name

    grads = row_gradients(module.model, batches, 5)
    hand_fisher = {name: torch.stack([g[name] ** 2 for g in grads]).mean(0) for name in params}
    for name in params:
        torch.testing.assert_close(ewc.fisher[name], hand_fisher[name], rtol=1e-4, atol=1e-12)

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
    from torch.distributed.tensor import DTensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    module = tiny_module(cfg)
    for layer in module.model.model.layers:
        fully_shard(layer)
    fully_shard(module.model)
    ewc, penalty = ewc_training_step(module, batches)
    state = ewc.state_dict()  # what a checkpoint of the module holds: this rank's shards, nothing gathered
    tensors = {key: t for key, t in state.items() if key != "anchored"}
    assert tensors and all(isinstance(t, DTensor) and t.to_local().numel() < t.numel() for t in tensors.values())
    restored = EWC(strength=1e4)
    restored.bind(module)  # as configure_model does, before a checkpoint loads
    restored.load_state_dict(state)
    restored.setup(module)  # restored: keeps the checkpoint's θ* and F
    assert restored.penalty(module).item() == pytest.approx(penalty, rel=1e-6)
    shards = {name: (ewc.fisher[name].to_local().numpy().copy(), ewc.params[name].grad.to_local().numpy().copy(),
                     ewc.fisher[name].placements[0].dim) for name in CHECKED}
    queue.put((rank, ewc.sharded, penalty, shards))
    dist.destroy_process_group()


def test_ewc_under_fsdp2_keeps_shards_that_add_up_to_the_unsharded_run(tiny_cfg):
    """Every rank holds the Fisher and anchor of its own shards; the per-rank penalties sum to the
    unsharded penalty, the gradients (task averaged over ranks + local penalty) match, and each rank's
    state dict holds only its shards and loads back to the same penalty."""
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
        torch.testing.assert_close(fisher, expected.fisher[name], rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(grad, expected.params[name].grad, rtol=1e-4, atol=1e-7)


def logged_penalties(run_dir) -> dict[int, float]:
    """`train/penalty` of every logged optimizer step of a run, by step."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/penalty"]) for r in csv.DictReader(f) if r.get("train/penalty")}


def largest_tensor(obj) -> int:
    """Elements of the largest tensor inside nested dicts, lists and tuples (0: none)."""
    if torch.is_tensor(obj):
        return obj.numel()
    if isinstance(obj, dict):
        obj = list(obj.values())
    return max((largest_tensor(item) for item in obj), default=0) if isinstance(obj, list | tuple) else 0


def regularizer_state(state: dict, kind: str) -> dict[str, torch.Tensor]:
    """The `regularizer.<kind>.*` entries of a module state dict, by parameter name."""
    prefix = f"regularizer.{kind}."
    return {k.removeprefix(prefix).replace("/", "."): v for k, v in state.items() if k.startswith(prefix)}


def test_ewc_run_logs_the_penalty_and_checkpoints_the_pretrained_anchor(tiny_cfg, tmp_path):
    """A single-device run: θ* and F are in the checkpoint's module state dict (the callback keeps no
    state), θ* = the untouched weights; a module built for resuming loads them strictly and keeps
    them; the HF export of the checkpoint leaves them out."""
    cfg = tiny_cfg(REPLAY, "regularizer=ewc", "regularizer.num_samples=8", "trainer.max_steps=4",
                   "finetune.lr=3e-3", "save_steps=4", "eval.task=null", "eval.forgetting=null", "precision=fp32")
    summary = fit(cfg)

    penalties = list(logged_penalties(tmp_path).values())
    assert len(penalties) == 4 and penalties[0] == 0.0 and penalties[-1] > 0  # 0 at θ*, grows as θ moves
    assert json.loads((tmp_path / "summary.json").read_text())["train/penalty"] == summary["train/penalty"] > 0

    path = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=False)
    state = ckpt["state_dict"]
    anchors, fishers = regularizer_state(state, "anchor"), regularizer_state(state, "fisher")
    initial = build_model(cfg.model).state_dict()
    assert anchors and anchors.keys() == fishers.keys() and state["regularizer.anchored"]
    for name, anchor in anchors.items():
        torch.testing.assert_close(anchor, initial[name], rtol=0, atol=0)
    assert largest_tensor(ckpt["callbacks"]) <= 1  # scalars (early stopping's scores), no state

    # As Lightning resumes a single-file checkpoint: configure_model, then a strict load_state_dict.
    resumed = CausalLMModule(model=cfg.model, optimizer=None, regularizer=EWC(strength=1e4))
    resumed.configure_model()
    ignored = {f"regularizer.{name}" for name, _ in resumed.regularizer.named_buffers()}
    assert ignored <= set(resumed._ddp_params_and_buffers_to_ignore)  # equal on all ranks: DDP must not broadcast
    resumed.load_state_dict(state)
    resumed.regularizer.setup(resumed)  # restored: nothing re-taken (EWC without data would fail)
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(resumed.regularizer.anchor[name], initial[name], rtol=0, atol=0)
    assert not torch.equal(dict(resumed.model.named_parameters())[name], initial[name])
    assert resumed.regularizer.penalty(resumed).item() > 0
    assert {name for name, _ in read_checkpoint(path)[1]} == set(initial)  # the export leaves them out


def test_fsdp2_checkpoint_holds_each_rank_s_shard_of_the_state_and_resumes_to_the_same_penalty(
    tmp_path, tmp_path_factory, cache_dir,
):
    """strategy=fsdp on 2 processes: the step-2 checkpoint (DCP) keeps θ* and F as one chunk per rank,
    each in that rank's own file, and `meta.pt` holds no whole tensor; a run resumed from it logs the
    penalties of the run that never stopped (so it kept the pretrained anchor, and F)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata
    from transformers import AutoModelForCausalLM

    ewc_run = [*EQUAL_RUN, *from_pretrained(tmp_path_factory, cache_dir), "strategy=fsdp", "trainer.devices=2",
               "regularizer=ewc", "regularizer.num_samples=8", "eval.task=null", "precision=fp32"]
    full = run_train(tmp_path / "full", cache_dir, ewc_run)
    checkpoint = full / "checkpoints" / "step000002.ckpt"

    pretrained = AutoModelForCausalLM.from_pretrained(pretrained_tiny(tmp_path_factory, cache_dir))
    weights, params = set(pretrained.state_dict()), {name for name, _ in pretrained.named_parameters()}
    metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata()
    saved = {k.removeprefix("state_dict."): info for k, info in metadata.state_dict_metadata.items()}
    anchors, fishers = regularizer_state(saved, "anchor"), regularizer_state(saved, "fisher")
    assert anchors.keys() == fishers.keys() == params
    keys = [f"state_dict.{k}" for k in saved if k.startswith(("regularizer.anchor.", "regularizer.fisher."))]
    whole, files = 0, {}  # bytes of θ* and F: in all, and in each rank's file
    for key in keys:
        info = metadata.state_dict_metadata[key]
        assert isinstance(info, TensorStorageMetadata) and len(info.chunks) == 2, key  # one chunk per rank ...
        numel, itemsize = info.size.numel(), info.properties.dtype.itemsize
        whole += numel * itemsize
        assert sum(c.sizes.numel() for c in info.chunks) == numel and all(c.sizes.numel() < numel for c in info.chunks)
        paths = [metadata.storage_data[MetadataIndex(key, c.offsets)].relative_path for c in info.chunks]
        assert len(set(paths)) == 2, key  # ... each in that rank's own file
        for path, chunk in zip(paths, info.chunks, strict=True):
            files[path] = files.get(path, 0) + chunk.sizes.numel() * itemsize
    print(f"EWC state in the DCP checkpoint: {whole} B in all, per rank file {files}")
    assert len(files) == 2 and max(files.values()) < 0.75 * whole
    assert largest_tensor(load_checkpoint_file(checkpoint / "meta.pt")) <= 1  # weights_only=True loads it
    assert {name for name, _ in read_checkpoint(checkpoint)[1]} == weights  # the export leaves them out

    resumed = run_train(tmp_path / "resumed", cache_dir, [*ewc_run, f"resume={checkpoint}", "export=false"])
    expected, got = logged_penalties(full), logged_penalties(resumed)
    assert sorted(got) == sorted(expected)[2:] and min(got.values()) > 0  # re-anchoring would log 0
    for step, penalty in got.items():
        assert penalty == pytest.approx(expected[step], abs=1e-6), step
