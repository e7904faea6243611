"""Sweeps end to end: Hydra multiruns of the tiny model run as a user runs them (`python train.py -m`),
their summary.csv/.md, a failing job, and the sweep definitions (W&B sweeps/*.yaml, the
full_vs_lora experiment) checked value by value against the config tree."""

from __future__ import annotations

import csv
import functools
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from fulltune.preflight import CONF_DIR, check_command_line, config_groups
from fulltune.report import write_report
from fulltune.train import train

from .conftest import REPO, compose_config

# Each job: 3 optimizer steps, validated at the last, 4 generated answers; no checkpoint, no export.
TINY_JOB = [
    "model=tiny", "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1",
    "+trainer.limit_val_batches=2", "eval.task.num_examples=4", "trainer.enable_progress_bar=false",
    "callbacks.progress_bar=null", "callbacks.model_checkpoint=null", "+trainer.enable_checkpointing=false",
    "export=false",
]


def run_multirun(sweep_dir: Path, cache: Path, *overrides: str, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess:
    """`python train.py -m TINY_JOB *overrides` with its outputs under `sweep_dir` (one thread: the
    tiny model gains nothing from more on a shared 2-core machine)."""
    command = [sys.executable, "train.py", "-m", *TINY_JOB, *overrides, f"hydra.sweep.dir={sweep_dir}",
               f"paths.cache_dir={cache}", f"paths.log_dir={sweep_dir.parent}"]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@functools.cache
def full_vs_lora_multirun(root: Path, cache: Path) -> Path:
    """finetune=full,lora x optimizer.lr=1e-3,3e-3: four jobs, run once per session (test_report
    reads the same dir)."""
    sweep_dir = root / "full_vs_lora"
    result = run_multirun(sweep_dir, cache, "finetune=full,lora", "optimizer.lr=1e-3,3e-3")
    assert result.returncode == 0, result.stderr[-4000:]
    return sweep_dir


@pytest.fixture(scope="module")
def multirun_dir(tmp_path_factory, cache_dir) -> Path:
    return full_vs_lora_multirun(tmp_path_factory.getbasetemp(), cache_dir)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_multirun_summary_lists_every_job_with_its_overrides_and_metrics(multirun_dir):
    rows = read_csv(multirun_dir / "summary.csv")

    assert [(r["job"], r["status"], r["finetune"], float(r["optimizer.lr"])) for r in rows] == [
        ("0", "ok", "full", 1e-3), ("1", "ok", "full", 3e-3), ("2", "ok", "lora", 1e-3), ("3", "ok", "lora", 3e-3)]
    for row in rows:
        job_summary = json.loads((multirun_dir / row["dir"] / "summary.json").read_text())
        for key in ("val/loss", "task/accuracy_after", "task/loss_after", "forgetting/general", "params_trainable",
                    "peak_memory_bytes", "tokens_per_s"):
            assert float(row[key]) == pytest.approx(job_summary[key]), key
        assert "model=tiny" in row["overrides"] and f"finetune={row['finetune']}" in row["overrides"]
    full, lora = rows[0], rows[2]
    assert int(lora["params_trainable"]) < int(full["params_trainable"]) == int(full["params_total"])

    md = (multirun_dir / "summary.md").read_text()
    assert "4 jobs: 4 ok" in md and "`model=tiny`" in md  # common overrides named once, above the table
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| job | status | finetune | optimizer.lr | val/loss |") and len(table) == 1 + 4


def test_a_failed_job_is_a_failed_row_and_the_jobs_after_it_still_run(tmp_path, cache_dir):
    sweep_dir = tmp_path / "sweep"
    result = run_multirun(sweep_dir, cache_dir, "trainer.max_steps=1", "optimizer.lr=-1,1e-3")

    # Hydra runs every job, then re-raises the first failure: the multirun exits non-zero, as it should.
    assert result.returncode != 0 and "Invalid learning rate" in result.stderr
    failed, ok = read_csv(sweep_dir / "summary.csv")
    assert (failed["status"], failed["optimizer.lr"], failed["error"]) == ("failed", "-1",
                                                                          "ValueError: Invalid learning rate: -1")
    assert "Traceback" in (sweep_dir / failed["dir"] / "error.txt").read_text()
    assert ok["status"] == "ok" and float(ok["task/loss_after"]) > 0
    assert "Invalid learning rate" in (sweep_dir / "summary.md").read_text()
    assert "## Runs without results" in write_report(sweep_dir).read_text()


def parameter_values(spec: dict) -> list:
    """The values a W&B sweep parameter can take: all listed ones, or a distribution's bounds."""
    if "values" in spec:
        return spec["values"]
    if "value" in spec:
        return [spec["value"]]
    return [spec["min"], spec["max"]]


SWEEP_FILES = sorted((REPO / "sweeps").glob("*.yaml"))


def test_the_three_sweeps_exist():
    assert [p.stem for p in SWEEP_FILES] == ["full_vs_lora", "lr", "replay_ratio"]


@pytest.mark.parametrize("sweep_file", SWEEP_FILES, ids=[p.stem for p in SWEEP_FILES])
def test_wandb_sweep_drives_train_py_with_overrides_that_compose(sweep_file, multirun_dir, tmp_path, cache_dir):
    sweep = yaml.safe_load(sweep_file.read_text())
    assert (REPO / sweep["program"]).exists() and sweep["method"] in {"grid", "random", "bayes"}
    assert sweep["metric"]["goal"] in {"minimize", "maximize"}
    reported = json.loads(next(multirun_dir.glob("*/summary.json")).read_text())
    assert sweep["metric"]["name"] in reported, "the sweep optimises a metric runs do not report"
    command = sweep["command"]
    assert "${args_no_hyphens}" in command and "${args}" not in command  # Hydra rejects --key=value
    fixed = [c for c in command if not c.startswith("${")]

    names = list(sweep["parameters"])
    for combination in itertools.product(*(parameter_values(sweep["parameters"][n]) for n in names)):
        # exactly the argv items the W&B agent builds (wandb's own function), then Hydra on them
        args = create_sweep_command_args({"args": {n: {"value": v} for n, v in zip(names, combination, strict=True)}})
        overrides = [*fixed, *args["args_no_hyphens"]]
        check_command_line(overrides)  # what train.py checks before Hydra: every key is a real one
        cfg = compose_config(overrides, tmp_path, cache_dir)
        for name, value in zip(names, combination, strict=True):
            if name not in config_groups():  # a group's option is checked by composing it at all
                composed = OmegaConf.select(cfg, name)
                composed = OmegaConf.to_container(composed) if OmegaConf.is_config(composed) else composed
                assert composed == value, f"{sweep_file.name}: {name}={value!r} composed as {composed!r}"


def test_full_vs_lora_experiment_sweeps_runs_that_compose_and_dry_run(tmp_path, cache_dir, capsys):
    params = OmegaConf.load(CONF_DIR / "experiment" / "full_vs_lora.yaml").hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    grid = list(itertools.product(*([f"{o.key_or_group}={v}" for v in o.sweep_string_iterator()] for o in parsed)))

    assert len(grid) == 6
    for overrides in grid:
        cfg = compose_config(["experiment=full_vs_lora", *overrides, "dry_run=true"], tmp_path, cache_dir)
        assert train(cfg) is None
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("model=")]
    full, _, lora, _, qlora, _ = lines  # one parameter line per run, in grid order (the memory plan follows each)
    assert lines == [full, full, lora, lora, qlora, qlora] and full.startswith("model=smollm2_135m: ")
    assert "trainable (100.00%)" in full and "trainable (100.00%)" not in lora and qlora == lora
    assert "(NF4) in decoder Linears" in out  # the QLoRA rows' plan counts a 4-bit base
