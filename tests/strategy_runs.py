"""Real multi-process training runs shared by test_strategies, test_export and test_multinode.

Each run is `python train.py ...` with 2 CPU processes (gloo) on the tiny model, started once per
pytest session and memoised here, so the three test files compare the very same runs. Every run
starts from the same saved HF weights (`pretrained_tiny`): that exercises the sharded loading paths
(meta-device FSDP, ZeRO-3 partitioned loading) and makes all strategies start identically.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch

from fulltune.train import fit

from .conftest import REPO, compose_config

# 4 optimizer steps of 2 micro-batches x 8 rows per rank (unpacked, variable-length, prompts masked);
# a checkpoint every 2 steps; a learning rate high enough that a wrong gradient shows.
EQUAL_RUN = [
    "~experiment",
    "model=tiny",
    "trainer.accelerator=cpu",
    "trainer.max_steps=4",
    "trainer.accumulate_grad_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "callbacks.progress_bar=null",
    "eval.task.num_examples=4",
    "eval.forgetting=null",
    "save_steps=2",
    "optimizer.lr=3e-3",
    "data.batch_size=8",
    "+callbacks.step_loss._target_=tests.strategy_runs.StepLoss",
]
TOLERANCE = 1e-5  # what "equal" means for losses and weights between two runs
EXACT = 1e-6  # what "resumed exactly" means: a resumed run against one that never stopped
_ROOT: list[Path] = []
_RUNS: dict[str, Path] = {}


class StepLoss(L.Callback):
    """Records the exact loss of every optimizer step, label-token weighted over all its micro-batches
    on all ranks (the logged `train/loss` is one micro-batch of rank 0), and each micro-batch's own
    token mean; rank 0 writes them to `<output_dir>/step_losses.json`."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.micro_means: list[float] = []
        self._share = torch.zeros((), dtype=torch.float64)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        # Lightning passes the training_step loss divided by accumulate_grad_batches:
        # loss_sum * world_size / window_label_tokens.
        share = outputs["loss"].detach().double().cpu() / trainer.world_size
        self._share += share
        n_tokens = (batch["labels"][:, 1:] != -100).sum().item()
        self.micro_means.append(float(share * batch["window_label_tokens"].item() / n_tokens))
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.steps.append(float(trainer.strategy.reduce(self._share.clone(), reduce_op="sum")))
            self._share.zero_()

    def on_train_end(self, trainer, module) -> None:
        if trainer.is_global_zero:
            path = Path(trainer.default_root_dir) / "step_losses.json"
            path.write_text(json.dumps({"steps": self.steps, "micro_means": self.micro_means}))


def root(tmp_path_factory) -> Path:
    """One directory for the session's shared runs."""
    if not _ROOT:
        _ROOT.append(tmp_path_factory.mktemp("runs"))
    return _ROOT[0]


def pretrained_tiny(tmp_path_factory, cache_dir: Path) -> Path:
    """The tiny model's initial weights saved as an HF directory (what every shared run fine-tunes)."""
    path = root(tmp_path_factory) / "tiny-hf"
    if not path.is_dir():
        from fulltune.models import build_model

        build_model(compose_config(["model=tiny"], path.parent, cache_dir).model).save_pretrained(path)
    return path


def from_pretrained(tmp_path_factory, cache_dir: Path) -> list[str]:
    return ["model.source=pretrained", f"model.pretrained={pretrained_tiny(tmp_path_factory, cache_dir)}"]


def subprocess_env() -> dict[str, str]:
    """This environment, less a job config a test's own in-process run may have left."""
    env = dict(os.environ)
    env.pop("FULLTUNE_JOB_CONFIG", None)
    return env


def train_command(out_dir: Path, cache_dir: Path, overrides: list[str]) -> list[str]:
    """`train.py` with its output, logs and cache under tmp dirs."""
    return ["train.py", *overrides, f"paths.cache_dir={cache_dir}", f"paths.log_dir={out_dir.parent}",
            f"hydra.run.dir={out_dir}"]


def start_command(command: list[str]) -> subprocess.Popen:
    """Start a command from the repo root in its own process group (the ranks it starts join it)."""
    return subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_command(proc: subprocess.Popen, timeout: int = 300) -> tuple[int, str]:
    """Its exit status and output; on a timeout its whole process group is killed instead of left
    waiting in collectives."""
    try:
        output = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output = proc.communicate()[0]
    return proc.returncode, output


def run_command(command: list[str], timeout: int = 300) -> str:
    """Run a command to success and return its output."""
    code, output = wait_command(start_command(command), timeout)
    assert code == 0, output[-4000:]
    return output


def run_train(out_dir: Path, cache_dir: Path, overrides: list[str]) -> Path:
    """Run `python train.py ...` to completion; fail with the tail of its output otherwise."""
    run_command([sys.executable, *train_command(out_dir, cache_dir, overrides)])
    return out_dir


def strategy_run(tmp_path_factory, cache_dir: Path, strategy: str, *extra: str) -> Path:
    """The shared 2-process run of `strategy` (see EQUAL_RUN); its output dir."""
    key = " ".join([strategy, *extra])
    if key not in _RUNS:
        out = root(tmp_path_factory) / re.sub(r"[^\w.-]", "_", key)
        overrides = [*EQUAL_RUN, *from_pretrained(tmp_path_factory, cache_dir), f"strategy={strategy}",
                     "trainer.devices=2", *extra]
        _RUNS[key] = run_train(out, cache_dir, overrides)
    return _RUNS[key]


def ddp_multirun(tmp_path_factory, cache_dir: Path) -> list[Path]:
    """`train.py -m` of two 2-process DDP jobs of EQUAL_RUN, memoised; their dirs. The sweep is over
    a fault: job 0 gets NaN activations on rank 1 alone in steps 1-2 (tests.faults.PoisonSteps), job 1
    none, so it must equal the standalone ddp run."""
    if "multirun" not in _RUNS:
        out = root(tmp_path_factory) / "multirun"
        run_command([sys.executable, "train.py", "-m", *EQUAL_RUN, *from_pretrained(tmp_path_factory, cache_dir),
                     "strategy=ddp", "trainer.devices=2", "+callbacks.poison._target_=tests.faults.PoisonSteps",
                     "+callbacks.poison.rank=1", "+callbacks.poison.steps=[1,2],[]", f"paths.cache_dir={cache_dir}",
                     f"paths.log_dir={out / 'logs'}", f"hydra.sweep.dir={out / 'sweep'}"])
        _RUNS["multirun"] = out
    return sorted(p for p in (_RUNS["multirun"] / "sweep").iterdir() if p.is_dir())


def single_device_run(tmp_path_factory, cache_dir: Path) -> Path:
    """The shared run of EQUAL_RUN in one process with the 2 ranks' rows (16), in-process: equal to ddp."""
    if "single" not in _RUNS:
        out = root(tmp_path_factory) / "single"
        fit(compose_config([*EQUAL_RUN, *from_pretrained(tmp_path_factory, cache_dir), "data.batch_size=16"],
                           out, cache_dir))
        _RUNS["single"] = out
    return _RUNS["single"]


def hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF safetensors directory (one file or shards)."""
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        weights.update(load_file(file))
    return weights


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def step_losses(run_dir: Path) -> dict[str, list[float]]:
    return json.loads((run_dir / "step_losses.json").read_text())


def assert_same_training(reference: Path, run_dir: Path, label: str) -> None:
    """Same exact per-step losses and same final (exported) weights within TOLERANCE; prints both gaps."""
    expected, got = step_losses(reference)["steps"], step_losses(run_dir)["steps"]
    loss_gap = max(abs(a - b) for a, b in zip(expected, got, strict=True))
    weight_gap = max_abs_diff(hf_weights(reference / "hf"), hf_weights(run_dir / "hf"))
    print(f"{label}: max |loss - reference| = {loss_gap:.2e}, max |weight - reference| = {weight_gap:.2e}")
    assert loss_gap <= TOLERANCE and weight_gap <= TOLERANCE


def assert_resumed_exactly(reference: Path, run_dir: Path, from_step: int, label: str) -> None:
    """The resumed segment's per-step losses equal the reference's from `from_step` on; same final weights."""
    expected, got = step_losses(reference)["steps"][from_step:], step_losses(run_dir)["steps"]
    loss_gap = max(abs(a - b) for a, b in zip(expected, got, strict=True))
    weight_gap = max_abs_diff(hf_weights(reference / "hf"), hf_weights(run_dir / "hf"))
    print(f"{label}: resumed steps {from_step + 1}-{from_step + len(got)}: max |loss - uninterrupted| = "
          f"{loss_gap:.1e}, max |weight - uninterrupted| = {weight_gap:.1e}")
    assert loss_gap <= EXACT and weight_gap <= EXACT


def wait_for(path: Path, proc, timeout: float = 240) -> Path:
    """Until the run being watched writes `path` (it is held there by tests.faults.HoldAtStep); a glob
    pattern may stand for parts of it, for a dir the run names itself. The path found."""
    deadline = time.time() + timeout
    while not (found := sorted(Path(path.anchor).glob(str(path.relative_to(path.anchor))))):
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.time() < deadline, f"no {path}"
        time.sleep(0.1)
    return found[0]
