"""Shared fixtures: configs composed with Hydra's compose API, on CPU, with tmp output paths."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from fulltune.preflight import CONF_DIR

REPO = CONF_DIR.parent


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache (tiny tokenizer, generated demo data, token caches) shared by the whole session."""
    return tmp_path_factory.mktemp("cache")


def compose_config(overrides: list[str], output_dir: Path, cache: Path) -> DictConfig:
    """The run config as `python train.py *overrides` composes it, with paths under tmp dirs."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root_dir = str(REPO)
        cfg.paths.cache_dir = str(cache)
        cfg.paths.log_dir = str(output_dir)
        cfg.paths.output_dir = str(output_dir)
    return cfg


TINY_FAST = [
    "model=tiny",
    "trainer.accelerator=cpu",
    "trainer.max_steps=8",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "callbacks.progress_bar=null",
    "eval.task.num_examples=8",
]


# The demo's generated prose as replay data: its held-out split is the forgetting / EWC data.
REPLAY = (
    "data.replay=[{name:prose,path:${paths.data_dir}/demo/prose_train.jsonl,"
    "val_path:${paths.data_dir}/demo/prose_val.jsonl,format:text}]"
)


@pytest.fixture
def tiny_cfg(tmp_path, cache_dir):
    """A factory: the tiny model's config with extra overrides."""
    return lambda *extra: compose_config([*TINY_FAST, *extra], tmp_path, cache_dir)


@pytest.fixture
def run(tmp_path_factory, cache_dir):
    """`run(strategy, *overrides)`: the shared 2-process run of a strategy (tests/strategy_runs.py),
    started once per session; its output dir."""
    from .strategy_runs import strategy_run

    return functools.partial(strategy_run, tmp_path_factory, cache_dir)
