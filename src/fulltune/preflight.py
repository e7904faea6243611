"""Checks that run before anything heavy: bad keys, impossible combinations, missing hardware.

Each failure is one `ConfigError` naming the key and the fix, never a stack trace from deep inside.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override

# the config tree: shipped inside an installed wheel as fulltune/conf, at the top level of a clone
_PACKAGE = Path(__file__).resolve().parent
CONF_DIR = _PACKAGE / "conf" if (_PACKAGE / "conf").is_dir() else _PACKAGE.parents[1] / "conf"


class ConfigError(ValueError):
    """A user-fixable configuration problem."""


def config_groups(roots: Sequence[Path] = ()) -> set[str]:
    """The config groups of the shipped tree and of a user's own config dirs (`roots`)."""
    return {p.relative_to(root).as_posix() for root in (CONF_DIR, *roots) for p in root.rglob("*") if p.is_dir()}


def user_config_dirs(parsed: Sequence[Override], config_dir: str | None) -> list[str]:
    """A user's own config dirs, where Hydra looks beside the shipped tree: `--config-dir DIR` and
    the `hydra.searchpath=[...]` entries (`file://DIR`, or `pkg://module` for a package's)."""
    dirs = [f"file://{Path(config_dir).absolute()}"] if config_dir else []
    for o in parsed:
        if o.key_or_group == "hydra.searchpath" and isinstance(o.value(), list):
            dirs += [str(d) for d in o.value()]
    return dirs


def check_command_line(overrides: list[str], multirun: bool = False, config_dir: str | None = None) -> None:
    """What Hydra would fail on with a trace of its own, checked before it runs: unknown keys and
    group options (each named with the closest valid ones), and a run dir (`hydra.run.dir`, or
    `hydra.sweep.dir` for a multirun) it could not create, e.g. under a read-only `paths.log_dir`.
    Options and keys may come from a user's own config dirs (`config_dir`, `hydra.searchpath`).

    Hydra alone says only "Key 'x' is not in struct", and creates the run dir before fulltune's code
    runs. Sweep overrides are checked at their first value.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType

    parsed = OverridesParser.create().parse_overrides(overrides)
    searchpath = user_config_dirs(parsed, config_dir)
    roots = [Path(d.removeprefix("file://")) for d in searchpath if d.startswith("file://")]
    search = [f"hydra.searchpath=[{','.join(searchpath)}]"] if searchpath else []
    parsed = [o for o in parsed if o.key_or_group != "hydra.searchpath"]
    groups = config_groups(roots)
    for o in parsed:
        if o.key_or_group in groups and not o.is_delete() and not o.key_or_group.startswith("hydra"):
            check_group_option(o, roots)

    def first_choice(o: Override) -> str:
        value = next(iter(o.sweep_iterator())) if o.is_sweep_override() else o.value()
        return f"{o.get_key_element()}={value}"

    parsed = [o for o in parsed if o.value_type != ValueType.GLOB_CHOICE_SWEEP]  # group globs: Hydra expands them
    to_check = [
        o.key_or_group for o in parsed
        if o.key_or_group not in groups and not o.is_add() and not o.is_force_add() and not o.is_delete()
        and not o.key_or_group.startswith("hydra")
    ]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        if to_check:  # named against the config the group choices give, before the values could fail it
            selections = [first_choice(o) for o in parsed if o.key_or_group in groups and not o.is_delete()]
            cfg = compose("train", overrides=[*search, *selections])
            for key in to_check:
                check_key(cfg, key)
        run_dir_key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        try:
            cfg = compose("train", overrides=[*search, *(first_choice(o) if o.is_sweep_override() else o.input_line
                                                         for o in parsed)], return_hydra_config=True)
            run_dir, log_dir = str(OmegaConf.select(cfg, run_dir_key)), str(cfg.paths.log_dir)
        except Exception:  # noqa: BLE001 - what else Hydra refuses (or resolves only when it runs), it reports
            return
    if Path(run_dir).absolute().is_relative_to(Path(log_dir).absolute()):
        check_writable("paths.log_dir", log_dir)
    else:
        check_writable(run_dir_key, run_dir)


def check_key(cfg: DictConfig, key: str) -> None:
    """`key` exists in the composed config; otherwise name the closest keys beside it."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if isinstance(parent, DictConfig) and leaf in parent:
        return
    if not isinstance(parent, DictConfig):
        raise ConfigError(f"Unknown config key '{key}': '{parent_key}' is not a config node.")
    close = difflib.get_close_matches(leaf, list(parent.keys()), n=3)
    hint = f" Did you mean {', '.join(repr(f'{parent_key}.{c}'.lstrip('.')) for c in close)}?" if close else ""
    raise ConfigError(
        f"Unknown config key '{key}'.{hint} Valid keys under '{parent_key or '<root>'}': "
        f"{', '.join(sorted(map(str, parent.keys())))}. To add a new key on purpose, write +{key}=..."
    )


def check_group_option(override: Override, roots: Sequence[Path] = ()) -> None:
    """`group=option` names a file conf/<group>/<option>.yaml (each one, for a choice sweep), shipped or
    in a user's config dir (`roots`): Hydra would say so only after a stack of its own frames, with
    exit code 1."""
    from hydra.core.override_parser.types import ValueType

    if override.value_type == ValueType.ELEMENT:
        values = [override.value()]
    elif override.value_type in (ValueType.CHOICE_SWEEP, ValueType.SIMPLE_CHOICE_SWEEP):
        values = list(override.sweep_string_iterator())
    else:
        return  # glob and range sweeps: Hydra expands them
    group = override.key_or_group
    options = sorted({p.relative_to(root / group).with_suffix("").as_posix() for root in (CONF_DIR, *roots)
                      for p in (root / group).rglob("*.yaml") if not p.name.startswith("_")})
    for value in values:
        if value is not None and str(value) not in ("null", *options):
            close = difflib.get_close_matches(str(value), options, n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"{group}={value}: no such option (no conf/{group}/{value}.yaml).{hint} "
                              f"Available options: {', '.join(options)}.")


def preflight(cfg: DictConfig) -> None:
    """Seconds-long checks before data or weights load."""
    import importlib.util

    import torch

    from fulltune.step_in_backward import check_step_in_backward

    if cfg.eval.get("harness") and importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(
            "eval=harness needs lm-eval-harness, which is not installed: `pip install 'fulltune[eval]'`, "
            "or drop it with eval=default."
        )

    attention = str(cfg.model.get("attn_implementation") or "")
    if cfg.data.get("packing") and "flash" in attention and cfg.data.batch_size > 1:
        raise ConfigError(
            f"model.attn_implementation={attention} with data.packing=true and data.batch_size="
            f"{cfg.data.batch_size}: transformers finds the examples of a packed row from its position ids "
            "only when a micro-batch is one row, so these rows would attend across examples. Use "
            "model.attn_implementation=sdpa (its block-diagonal mask keeps them apart), or data.batch_size=1 "
            "with a longer data.max_length.")
    check_strategy(cfg)
    check_step_in_backward(cfg)
    check_devices(cfg.trainer)
    check_gpu(cfg.get("gpu"))
    if not cfg.get("dry_run"):
        for key in ("paths.output_dir", "paths.cache_dir"):
            check_writable(key, OmegaConf.select(cfg, key))

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


def check_devices(trainer: DictConfig) -> None:
    """GPUs asked for exist: Lightning would say so only after the data and the model were set up."""
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if trainer.accelerator in ("gpu", "cuda") and not visible:
        raise ConfigError(
            f"trainer.accelerator={trainer.accelerator} but no CUDA GPU is visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). Run on a GPU node, or "
            "use trainer.accelerator=auto (or cpu)."
        )
    devices = trainer.devices
    if visible and trainer.accelerator in ("auto", "gpu", "cuda") and isinstance(devices, int) and devices > visible:
        raise ConfigError(
            f"trainer.devices={devices} but {visible} GPU(s) are visible on this node. Set trainer.devices="
            f"{visible} (or auto: every visible GPU); for more, add nodes with trainer.num_nodes."
        )


def check_gpu(name: str | None) -> None:
    """`gpu=` names a GPU the plan knows: a dry run would otherwise fail on it only after building the model."""
    from fulltune.memory import GPUS, gpu_bytes

    if name is None:
        return
    try:
        gpu_bytes(str(name))
    except ValueError:
        close = difflib.get_close_matches(str(name), list(GPUS), n=2, cutoff=0.5)
        hint = f" Did you mean {' or '.join(f'gpu={c}' for c in close)}?" if close else ""
        raise ConfigError(f"gpu={name}: not a GPU the memory plan knows.{hint} Known: {', '.join(GPUS)}.") from None


def check_writable(key: str, path: str) -> None:
    """A directory the run will write (or create) is writable by this user: otherwise the run would
    stop only at its first save, after the data was tokenized and the weights loaded."""
    target = Path(path).expanduser().absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{key}={path}: {existing} is a file, not a directory. Point {key} at a directory.")
    if not os.access(existing, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        raise ConfigError(
            f"{key}={path}: {existing} is not writable by this user (read-only or someone else's). Point {key} "
            "at a writable directory, or fix its permissions."
        )


def check_strategy(cfg: DictConfig) -> None:
    """Strategy x precision x install combinations that cannot run, each as one message with the fix."""
    import importlib.util

    name, precision = cfg.strategy.name, cfg.precision.value
    family = name.split("_", 1)[0]
    if family == "fsdp" and precision == "16-mixed":
        raise ConfigError(f"strategy={name} does not support precision=fp16_mixed (FSDP2 has no fp16 loss scaling "
                          "in Lightning); use precision=bf16_mixed (sm80+ GPUs) or a deepspeed_zero* strategy.")
    if family in ("fsdp", "deepspeed") and cfg.finetune.method in ("lora", "qlora"):
        raise ConfigError(f"finetune={cfg.finetune.method} with strategy={name} is not supported (sharded loading and "
                          "export handle plain weights only); LoRA's trainable state is small: use strategy=ddp.")
    if family == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"strategy={name} needs DeepSpeed: pip install --no-build-isolation 'fulltune[deepspeed]' "
                          "(after torch), or use strategy=fsdp / ddp.")
