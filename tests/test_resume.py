"""Runs killed with a real SIGKILL (tests/faults.py) and continued with `resume=auto`: the same command
picks the interrupted run's newest complete checkpoint, never a half-written one, and the resumed
steps equal an uninterrupted run's within 1e-6 (fp32, CPU; 2 processes where sharded)."""

from __future__ import annotations

import csv
import json
import os
import signal
import sys
import time

import pytest

from fulltune.checkpointing import latest_checkpoint
from fulltune.preflight import ConfigError
from fulltune.report import read_history
from fulltune.resume import resolve_resume
from fulltune.train import fit

from .conftest import compose_config
from .strategy_runs import (
    EQUAL_RUN,
    assert_resumed_exactly,
    from_pretrained,
    run_command,
    single_device_run,
    start_command,
    train_command,
    wait_command,
    wait_for,
)


def test_single_device_run_killed_mid_save_resumes_exactly_with_the_same_command(tmp_path, tmp_path_factory,
                                                                                 cache_dir):
    """SIGKILL once the step-4 checkpoint is written but not yet published; the same command again
    (Hydra gives it a new run dir) finds the interrupted run, continues it in its own dir from step 2,
    logs on in its metrics.csv and W&B run, and trains exactly like a run that never stopped."""
    logs = tmp_path / "logs"
    command = [sys.executable, "train.py", *EQUAL_RUN, *from_pretrained(tmp_path_factory, cache_dir),
               "data.batch_size=16", "logger=wandb", "resume=auto",
               "+logger.kill._target_=tests.faults.KillBeforePublish", "+logger.kill.step=4",
               f"paths.cache_dir={cache_dir}", f"paths.log_dir={logs}"]
    code, output = wait_command(start_command(command))
    assert code == -signal.SIGKILL, output[-4000:]
    (run_dir,) = (logs / "runs").glob("*/*_tiny-full")
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / ".step000004.ckpt.partial").is_file()  # all written, never published
    assert latest_checkpoint(checkpoints) == checkpoints / "step000002.ckpt"

    time.sleep(1)  # the second launch gets a run dir of its own (Hydra names them by the second)
    run_command(command)
    launches = sorted((logs / "runs").glob("*/*_tiny-full"))
    assert len(launches) == 2 and launches[0] == run_dir and not (launches[1] / "config.yaml").exists()
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 4
    assert_resumed_exactly(single_device_run(tmp_path_factory, cache_dir), run_dir, 2, "single device, SIGKILL")
    # no leftovers; save_total_limit=2 kept the two newest; last.ckpt links the newest
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "latest.json", "step000002.ckpt",
                                                             "step000004.ckpt"]
    assert (checkpoints / "last.ckpt").resolve() == (checkpoints / "step000004.ckpt").resolve()
    # metrics.csv kept the first segment (steps 1-4 flushed before the kill) and appended the second
    with (run_dir / "csv" / "metrics.csv").open() as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row["train/loss"]]
    curve = read_history(run_dir / "csv" / "metrics.csv")["train/loss"]
    assert len(steps) > len(set(steps)) and [step for step, _ in curve] == sorted(set(steps)) == [0, 1, 2, 3]
    # one W&B run, logged by both segments under the same id
    ids = {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2 and len(ids) == 1


# (strategy, the fault): SIGKILL of every rank before the publish of a fully written sharded DCP dir,
# before the write of a ZeRO-3 checkpoint, or from outside in the middle of an accumulated step.
SHARDED_FAULTS = {
    "fsdp": ["+logger.kill._target_=tests.faults.KillBeforePublish", "+logger.kill.step=4"],
    "deepspeed_zero3": ["+callbacks.kill._target_=tests.faults.KillBeforeWrite", "+callbacks.kill.step=4"],
    "deepspeed_zero2": ["+callbacks.hold._target_=tests.faults.HoldAtStep", "+callbacks.hold.step=3",
                        "+callbacks.hold.micro=1"],
}


@pytest.mark.parametrize("strategy", list(SHARDED_FAULTS))
def test_sharded_run_killed_resumes_exactly(strategy, run, tmp_path, tmp_path_factory, cache_dir):
    reference = run(strategy)
    shards = reference / "checkpoints" / "step000002.ckpt"
    shards = sorted(shards.glob("*.distcp")) if strategy == "fsdp" else sorted(shards.rglob("*optim_states.pt"))
    sizes = [f.stat().st_size for f in shards]
    assert len(shards) == 2 and max(sizes) < 0.75 * sum(sizes)  # two halves: each rank wrote only its own

    out = tmp_path / "run"
    overrides = [*EQUAL_RUN, *from_pretrained(tmp_path_factory, cache_dir), f"strategy={strategy}",
                 "trainer.devices=2", "resume=auto"]
    proc = start_command([sys.executable, *train_command(out, cache_dir, [*overrides, *SHARDED_FAULTS[strategy]])])
    if "hold" in SHARDED_FAULTS[strategy][0]:
        wait_for(out / "fault-held", proc)
        os.killpg(proc.pid, signal.SIGKILL)
    code, output = wait_command(proc)
    assert code == -signal.SIGKILL, output[-4000:]
    assert latest_checkpoint(out / "checkpoints") == out / "checkpoints" / "step000002.ckpt"
    (out / "release").touch()
    run_command([sys.executable, *train_command(out, cache_dir, [*overrides, *SHARDED_FAULTS[strategy]])])
    assert_resumed_exactly(reference, out, 2, f"{strategy}, SIGKILL")
    assert not list((out / "checkpoints").glob(".*"))  # the staging leftover was cleared by the next save


def test_a_full_disk_stops_the_run_before_the_save_keeping_the_last_checkpoint(tiny_cfg, tmp_path):
    """The disk fills up after the step-2 checkpoint: the step-4 save is refused before anything is written,
    with the sizes, and the step-2 checkpoint stays the one to resume from."""
    cfg = tiny_cfg("trainer.max_steps=4", "save_steps=2", "+callbacks.disk._target_=tests.faults.DiskFullAfterStep",
                   "+callbacks.disk.step=2")
    with pytest.raises(ConfigError, match=r"not enough free disk for the step-4 checkpoint: it needs ~0\.\d+ GB"):
        fit(cfg)
    checkpoints = tmp_path / "checkpoints"
    assert latest_checkpoint(checkpoints) == checkpoints / "step000002.ckpt"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "latest.json", "step000002.ckpt"]
    assert not (tmp_path / "summary.json").exists()

    # that dir holds a run now: a new run is refused there, resume=auto continues it
    fresh = compose_config(["model=tiny"], tmp_path, tmp_path / "cache")
    with pytest.raises(ConfigError, match="already holds a run"):
        resolve_resume(fresh)
    fresh.resume = "auto"
    resolve_resume(fresh)
    assert fresh.resume == str(checkpoints / "step000002.ckpt")
    fresh.resume = str(tmp_path / "missing.ckpt")
    with pytest.raises(ConfigError, match="no such checkpoint"):
        resolve_resume(fresh)

