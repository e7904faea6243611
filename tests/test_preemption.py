"""Preemption with real signals: SIGTERM (or SLURM's SIGUSR1, submitit's SIGUSR2) arrives in the middle
of an accumulated step; the step finishes, a checkpoint is saved, the run exits so the launcher can
requeue it, and `resume=auto` continues exactly."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from fulltune.checkpointing import latest_checkpoint
from fulltune.report import read_history

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

HOLD_IN_STEP_2 = ["+callbacks.hold._target_=tests.faults.HoldAtStep", "+callbacks.hold.step=2",
                  "+callbacks.hold.micro=1"]  # before the second micro-batch of step 2


def test_sigterm_to_rank_0_finishes_the_step_saves_and_the_run_continues_exactly(run, tmp_path, tmp_path_factory,
                                                                                 cache_dir):
    """2-process DDP. Segment 1: SIGTERM to rank 0 alone mid-step 2; both ranks finish step 2, save it
    (save_steps=3: no regular checkpoint yet) and exit with 128 + 15. Segment 2, the same command
    (resume=auto), continues from step 2; its steps equal the uninterrupted DDP run's, and metrics.csv
    holds both segments. (A SIGKILL mid-save is test_resume's.)"""
    out = tmp_path / "run"
    overrides = [*EQUAL_RUN, *from_pretrained(tmp_path_factory, cache_dir), "strategy=ddp", "trainer.devices=2",
                 "save_steps=3", "resume=auto", *HOLD_IN_STEP_2]
    command = [sys.executable, *train_command(out, cache_dir, overrides)]
    proc = start_command(command)
    wait_for(out / "fault-held", proc)
    proc.send_signal(signal.SIGTERM)
    (out / "release").touch()
    code, output = wait_command(proc)
    assert code == 128 + signal.SIGTERM, output[-4000:]
    assert "SIGTERM: saved" in output and "Traceback" not in output
    checkpoints = out / "checkpoints"
    assert latest_checkpoint(checkpoints) == checkpoints / "step000002.ckpt"

    run_command(command)
    assert_resumed_exactly(run("ddp"), out, 2, "ddp, SIGTERM")
    curve = read_history(out / "csv" / "metrics.csv")["train/loss"]
    assert [step for step, _ in curve] == [0, 1, 2, 3]


def test_submitit_requeues_a_preempted_job_and_it_continues_exactly(tmp_path, tmp_path_factory, cache_dir):
    """The submitit launcher (its local twin) runs the job: pickled, in another process, in the sweep
    dir printed at submit time (not one its own `${now:}` would give). Submitit's preemption signal
    (SIGUSR2) arrives mid-step 2: the step finishes and is saved, then submitit's own handler requeues
    the job (its controller starts it again), and the requeued job continues in its dir exactly."""
    command = [sys.executable, "train.py", "-m", "hydra/launcher=submitit_local", *EQUAL_RUN,
               *from_pretrained(tmp_path_factory, cache_dir), "data.batch_size=16", "resume=auto", *HOLD_IN_STEP_2,
               f"paths.cache_dir={cache_dir}", f"paths.log_dir={tmp_path}"]
    proc = start_command(command)
    held = wait_for(tmp_path / "multirun" / "*" / "*" / "0_tiny-full" / "fault-held", proc)
    job = held.parent
    os.kill(int(held.read_text()), signal.SIGUSR2)
    (job / "release").touch()
    code, output = wait_command(proc)
    assert code == 0, output[-4000:]
    printed = next(line.split(" : ")[-1] for line in output.splitlines() if "sweep output dir" in line).strip()
    assert Path(printed) == job.parent and job.parent.parent.parent == tmp_path / "multirun"
    logs = "".join(p.read_text() for p in (job.parent / ".submitit").rglob("*_log.*"))
    assert "SIGUSR2: saved" in logs and "Requeued job" in logs
    assert_resumed_exactly(single_device_run(tmp_path_factory, cache_dir), job, 2, "submitit, SIGUSR2 + requeue")
