"""Every option of every config group composes and instantiates what it names (no downloads)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate

from fulltune.finetune import apply_finetune
from fulltune.launch import resolve_hardware
from fulltune.models import ModelSpecError, build_model, load_tokenizer, resolve_architecture
from fulltune.optim import optimizer_for_precision
from fulltune.preflight import CONF_DIR, ConfigError, check_command_line

from .conftest import REPO, compose_config

GROUPS = ["model", "data", "finetune", "strategy", "precision", "optimizer", "scheduler", "regularizer",
          "eval", "logger", "callbacks", "trainer", "experiment", "hparams_search", "paths"]
OPTIONS = [
    (group, path.stem)
    for group in GROUPS
    for path in sorted((CONF_DIR / group).glob("*.yaml"))
    if not path.stem.startswith("_")
]


def test_every_group_has_an_option():
    assert {g for g, _ in OPTIONS} == set(GROUPS)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_instantiates(group, option, tmp_path, cache_dir):
    cfg = compose_config([f"{group}={option}"], tmp_path, cache_dir)
    if group == "model" and option == "hf":  # its architecture is its directory's: none given here
        with pytest.raises(ModelSpecError, match="model.pretrained is not set"):
            resolve_architecture(cfg.model, download=False)
    elif group == "model":
        model = build_model(cfg.model, device="meta")
        assert model.config.model_type == cfg.model.config.model_type
    elif group == "data":
        tiny = compose_config(["model=tiny"], tmp_path, cache_dir).model
        assert instantiate(cfg.data, tokenizer=load_tokenizer(tiny), seed=0) is not None
    elif group == "finetune":
        model = apply_finetune(build_model(compose_config(["model=tiny"], tmp_path, cache_dir).model), cfg.finetune)
        assert any(p.requires_grad for p in model.parameters())
    elif group in ("optimizer", "scheduler"):
        optimizer = optimizer_for_precision(cfg.optimizer, "32-true", "auto")([torch.nn.Parameter(torch.zeros(2, 2))])
        instantiate(cfg.scheduler)(optimizer, 10).step()
    elif group == "precision":
        resolve_hardware(cfg)  # `auto` becomes a concrete choice
        assert cfg.precision.value in {"32-true", "bf16-mixed", "16-mixed", "bf16-true"}
    elif group in ("logger", "callbacks"):
        assert all(instantiate(node) is not None for node in cfg[group].values() if node is not None)  # null: off
    elif group in ("strategy", "eval", "trainer"):
        assert instantiate(cfg[group]) is not None


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"Did you mean 'trainer.max_steps'"):
        check_command_line(["model=tiny", "trainer.max_stepz=3"])
    check_command_line(["model=tiny", "trainer.max_steps=3", "+trainer.new_flag=1", "optimizer.lr=1e-5,2e-5"])
    check_command_line(["model=glob(tin*)", "optimizer.lr=range(1,3)", "trainer.max_steps=3"], multirun=True)


@pytest.mark.parametrize(
    ("override", "expected"),
    [("trainer.max_stepz=3", "Did you mean 'trainer.max_steps'"), ("model=llama2_7x", "Available options")],
)
def test_cli_rejects_unknown_keys_and_options(override, expected):
    result = subprocess.run([sys.executable, "train.py", override], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr  # a user error: its message alone
    assert expected in result.stderr + result.stdout
    if "Available" in expected:
        assert "llama2_7b" in result.stderr + result.stdout


def test_help_is_fast_and_imports_no_torch():
    code = "import sys, runpy; sys.argv=['train.py','--help']\ntry: runpy.run_path('train.py', run_name='__main__')\n" \
           "except SystemExit: pass\nassert 'torch' not in sys.modules, 'torch imported by --help'"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
