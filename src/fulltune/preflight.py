"""Checks that run before anything heavy: bad keys, impossible combinations, missing hardware.

Each failure is one `ConfigError` naming the key and the fix, never a stack trace from deep inside.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


class ConfigError(ValueError):
    """A user-fixable configuration problem."""


def config_groups() -> set[str]:
    return {p.relative_to(CONF_DIR).as_posix() for p in CONF_DIR.rglob("*") if p.is_dir()}


def check_override_keys(overrides: list[str]) -> None:
    """Fail on `key=value` overrides whose key does not exist, naming the closest valid keys.

    Hydra alone says only "Key 'x' is not in struct"; group options it already lists.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    groups = config_groups()
    selections = [
        f"{o.get_key_element()}={next(iter(o.sweep_iterator())) if o.is_sweep_override() else o.value()}"
        for o in parsed
        if o.key_or_group in groups and not o.is_delete()
    ]
    to_check = [
        o.key_or_group for o in parsed
        if o.key_or_group not in groups and not o.is_add() and not o.is_force_add() and not o.is_delete()
        and not o.key_or_group.startswith("hydra")
    ]
    if not to_check:
        return
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=selections)
    for key in to_check:
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        if isinstance(parent, DictConfig) and leaf in parent:
            continue
        if not isinstance(parent, DictConfig):
            raise ConfigError(f"Unknown config key '{key}': '{parent_key}' is not a config node.")
        close = difflib.get_close_matches(leaf, list(parent.keys()), n=3)
        hint = f" Did you mean {', '.join(repr(f'{parent_key}.{c}'.lstrip('.')) for c in close)}?" if close else ""
        raise ConfigError(
            f"Unknown config key '{key}'.{hint} Valid keys under '{parent_key or '<root>'}': "
            f"{', '.join(sorted(map(str, parent.keys())))}. To add a new key on purpose, write +{key}=..."
        )


def preflight(cfg: DictConfig) -> None:
    """Seconds-long checks before data or weights load."""
    import importlib.util

    import torch

    if cfg.eval.get("harness") and importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(
            "eval=harness needs lm-eval-harness, which is not installed: `pip install 'fulltune[eval]'`, "
            "or drop it with eval=default."
        )

    precision = cfg.precision.value
    if precision.startswith("16") and not torch.cuda.is_available():
        raise ConfigError(
            f"precision={precision} (fp16) needs a CUDA GPU and none is visible. "
            "On CPU use precision=fp32 or precision=bf16_mixed / bf16_true."
        )
    if precision.startswith("bf16") and torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        if major < 8:  # is_bf16_supported() also says yes on GPUs that only emulate bf16 (e.g. T4)
            raise ConfigError(
                f"precision={precision} needs an sm80+ GPU (A100/H100/...); this GPU is sm{major}x. "
                "Use precision=fp16_mixed or precision=fp32."
            )
