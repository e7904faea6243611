"""A user's own configs live in their own directory, outside the repo (or the installed package):
an experiment and a model YAML found through `--config-dir` or `hydra.searchpath`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fulltune.preflight import ConfigError, check_command_line

from .conftest import REPO

MODEL = "defaults: [tiny]   # the shipped tiny model, renamed\nname: my_tiny\n"
EXPERIMENT = """# @package _global_
defaults:
  - override /model: my_tiny
trainer:
  max_steps: 2
eval:
  task:
    num_examples: 4
"""


@pytest.fixture
def user_dir(tmp_path) -> Path:
    """A user's config dir beside (not inside) the repo: conf-like groups with one file each."""
    root = tmp_path / "my_configs"
    (root / "model").mkdir(parents=True)
    (root / "experiment").mkdir()
    (root / "model" / "my_tiny.yaml").write_text(MODEL)
    (root / "experiment" / "my_exp.yaml").write_text(EXPERIMENT)
    return root


def test_the_command_line_checks_know_a_users_options(user_dir):
    check_command_line(["experiment=my_exp", "trainer.max_steps=3"], config_dir=str(user_dir))
    check_command_line([f"hydra.searchpath=[file://{user_dir}]", "model=my_tiny"])
    with pytest.raises(ConfigError, match="Did you mean 'my_exp'"):
        check_command_line(["experiment=my_exq"], config_dir=str(user_dir))
    with pytest.raises(ConfigError, match="no conf/model/my_tiny.yaml"):
        check_command_line(["model=my_tiny"])  # without the user's dir, the option does not exist


def test_an_experiment_and_a_model_from_a_users_dir_train_from_outside_the_repo(user_dir, tmp_path, cache_dir):
    """`python /repo/train.py --config-dir DIR experiment=...` from a directory of the user's: the
    experiment picks the user's model, and the run writes under ./outputs of that directory."""
    work = tmp_path / "work"
    work.mkdir()
    args = ["--config-dir", str(user_dir), "experiment=my_exp", f"paths.cache_dir={cache_dir}",
            "trainer.accelerator=cpu", "export=false", "callbacks.progress_bar=null"]
    env = {**os.environ, "PWD": str(work)}
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=work, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    (summary,) = (work / "outputs" / "runs").glob("*/*/summary.json")
    written = json.loads(summary.read_text())
    assert written["model"] == "my_tiny" and written["global_step"] == 2
