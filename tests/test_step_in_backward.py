"""The optimizer step inside backward trains exactly as the ordinary step does, resumes exactly,
skips a NaN step, reaches every parameter with the LR schedule, and refuses what it cannot do."""

from __future__ import annotations

import json

import pytest
import torch

from fulltune.optim import warmup_schedule
from fulltune.preflight import ConfigError, preflight
from fulltune.step_in_backward import StepInBackward
from fulltune.train import fit

from .conftest import compose_config
from .strategy_runs import EXACT, hf_weights, max_abs_diff

# 10 optimizer steps, no accumulation (the step in backward refuses it), a warmup + cosine schedule;
# NaN activations in step 3 (the guard must skip it in both); a checkpoint at step 5.
RUN = [
    "model=tiny", "trainer.accelerator=cpu", "trainer.max_steps=10", "trainer.enable_progress_bar=false",
    "callbacks.progress_bar=null", "eval.task=null", "eval.forgetting=null", "optimizer.lr=3e-3",
    "scheduler.warmup_steps=3", "data.batch_size=8", "trainer.gradient_clip_val=null", "save_steps=5",
    "save_total_limit=3",
    "+callbacks.poison._target_=tests.faults.PoisonSteps", "+callbacks.poison.steps=[3]",
]
IN_BACKWARD = "optimizer.step_in_backward=true"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """The ordinary run, the same run stepping in backward, and that run resumed from its step-5 checkpoint."""
    root = tmp_path_factory.mktemp("in_backward")
    out = {}
    for name, extra in (("ordinary", []), ("in_backward", [IN_BACKWARD])):
        out[name] = (root / name, fit(compose_config([*RUN, *extra], root / name, cache_dir)))
    checkpoint = next((root / "in_backward" / "checkpoints").glob("step000005.ckpt"))
    resumed = [*RUN, IN_BACKWARD, f"resume={checkpoint}"]
    out["resumed"] = (root / "resumed", fit(compose_config(resumed, root / "resumed", cache_dir)))
    return out


def test_same_weights_as_the_ordinary_step_after_10_steps_with_a_skipped_nan_step(runs):
    (ordinary, summary), (in_backward, summary_in_backward) = runs["ordinary"], runs["in_backward"]
    gap = max_abs_diff(hf_weights(ordinary / "hf"), hf_weights(in_backward / "hf"))
    print(f"max |weight gap| after 10 steps: {gap:.2e}")
    assert gap <= 1e-6
    assert summary["train/nonfinite_skipped_steps"] == summary_in_backward["train/nonfinite_skipped_steps"] == 1
    assert summary["global_step"] == summary_in_backward["global_step"] == 10


def test_resume_from_a_checkpoint_is_exact(runs):
    gap = max_abs_diff(hf_weights(runs["in_backward"][0] / "hf"), hf_weights(runs["resumed"][0] / "hf"))
    assert gap <= EXACT


def test_the_lr_schedule_reaches_every_per_parameter_optimizer():
    params = [torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(4))]
    groups = [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}]
    optimizer = StepInBackward(groups, factory=lambda g: torch.optim.AdamW(g, lr=1.0))
    schedule = warmup_schedule(optimizer, total_steps=10, warmup_steps=4)
    for step in range(3):
        if step == 1:  # as a resume does: it replaces the inner optimizers' group dicts
            optimizer.load_state_dict(optimizer.state_dict())
        optimizer.step()
        schedule.step()
    lrs = [group["lr"] for inner in optimizer.optimizers for group in inner.param_groups]
    assert lrs == [0.75, 0.75]
    assert [g["weight_decay"] for o in optimizer.optimizers for g in o.param_groups] == [0.1, 0.0]


@pytest.mark.parametrize("extra, reason", [
    ("trainer.accumulate_grad_batches=2", "cannot accumulate"),
    ("trainer.gradient_clip_val=1.0", "no global gradient norm"),
    ("strategy=fsdp", "strategy=fsdp"),
])
def test_combinations_it_cannot_run_are_refused_up_front(extra, reason, tmp_path, cache_dir):
    base = ["model=tiny", "trainer.accelerator=cpu", IN_BACKWARD, "trainer.gradient_clip_val=null"]
    cfg = compose_config([*base, extra], tmp_path, cache_dir)
    with pytest.raises(ConfigError, match=reason):
        preflight(cfg)


def test_ddp_steps_in_backward_on_the_all_reduced_gradients_as_the_ordinary_step_does(run):
    """Two 2-process DDP runs of the shared strategy run (tests/strategy_runs.py), 10 steps without
    accumulation or clipping, one stepping in DDP's reduce hook: the same weights. Step 3 has NaN
    activations on rank 1 only: both ranks must skip it, before any parameter is stepped."""
    ddp = ["trainer.accumulate_grad_batches=1", "trainer.gradient_clip_val=null", "trainer.max_steps=10",
           "+callbacks.poison._target_=tests.faults.PoisonSteps", "+callbacks.poison.rank=1",
           "+callbacks.poison.steps=[3]"]
    ordinary, in_backward = run("ddp", *ddp), run("ddp", *ddp, IN_BACKWARD)
    gap = max_abs_diff(hf_weights(ordinary / "hf"), hf_weights(in_backward / "hf"))
    print(f"DDP: max |weight gap| after 10 steps: {gap:.2e}")
    assert gap <= 1e-6
    sums = json.loads((in_backward / "fault-weight-sums.json").read_text())
    assert sums[0] == sums[1]  # the ranks never diverged
    assert json.loads((in_backward / "summary.json").read_text())["train/nonfinite_skipped_steps"] == 1
