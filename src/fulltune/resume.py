"""Which checkpoint a run continues from, and in which directory: `resume=auto | PATH | null`.

Hydra gives every launch of a command a new run dir (`outputs/runs/<date>/<time>_<run_name>`), so
`resume=auto` first looks in its own dir (a requeued submitit job, or `hydra.run.dir` given) and then
for the interrupted run of the same command: the newest run dir of this `run_name` whose composed
config (Hydra's `.hydra/config.yaml`) equals this launch's, `resume` and `paths` aside, and that has
a complete checkpoint but no summary.json yet. The run then continues in that dir, so its
checkpoints, metrics.csv and W&B run stay one. A new run never writes into a dir that already holds
another run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fulltune.checkpointing import LATEST, latest_checkpoint
from fulltune.preflight import ConfigError

log = logging.getLogger(__name__)
IGNORED_KEYS = ("resume", "paths")  # what may differ between the launches of one run


def launch_rank() -> int:
    """This process's global rank as its launcher set it (torchrun, SLURM, Lightning's children), before
    any process group exists."""
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def composed_config(run_dir: Path) -> dict[str, Any] | None:
    """The config Hydra composed for a launch (`.hydra/config.yaml`, interpolations unresolved), without
    the keys a resumed segment may change; None outside Hydra (the compose API)."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    return {k: v for k, v in OmegaConf.to_container(OmegaConf.load(path)).items() if k not in IGNORED_KEYS}


def first_difference(a: Any, b: Any, key: str = "") -> str | None:
    """The first dotted key at which two plain configs differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(a.keys() | b.keys()):
            if (found := first_difference(a.get(k), b.get(k), f"{key}.{k}".lstrip("."))) is not None:
                return found
        return None
    return None if a == b else key


def interrupted_run(cfg: DictConfig, output_dir: Path) -> Path | None:
    """The newest unfinished run dir of this same command (same composed config) with a complete checkpoint."""
    this = composed_config(output_dir)
    if this is None:
        return None
    log_dir = Path(cfg.paths.log_dir)
    pattern = f"*_{cfg.run_name}"
    found = []
    for run in [*log_dir.glob(f"runs/*/{pattern}"), *log_dir.glob(f"multirun/*/*/{pattern}")]:
        if (run.resolve() == output_dir.resolve() or (run / "summary.json").exists()
                or latest_checkpoint(run / "checkpoints") is None or (other := composed_config(run)) is None):
            continue
        if (differs := first_difference(other, this)) is None:
            found.append(run)
        else:
            log.info("resume=auto: %s is another command's run (%s differs)", run, differs)
    return max(found, key=lambda run: (run / "checkpoints" / LATEST).stat().st_mtime, default=None)


def holds_a_run(directory: Path) -> bool:
    return (directory / "config.yaml").exists() or (directory / "checkpoints").exists()


def resolve_resume(cfg: DictConfig) -> None:
    """Settle `cfg.resume` to a checkpoint path or None and `cfg.paths.output_dir` to the run dir.

    Only the first rank decides: the others get the settled config (`train.job_scope`) or, started on
    their own (torchrun, SLURM), see the same files.
    """
    output_dir = Path(cfg.paths.output_dir)
    resume = cfg.resume
    if resume == "auto":
        own = latest_checkpoint(output_dir / "checkpoints")
        run_dir = output_dir if own is not None else interrupted_run(cfg, output_dir)
        if run_dir is None:  # in its own dir too: what is there is the run it was asked to continue
            log.info("resume=auto: no interrupted run of this command with a checkpoint; starting fresh")
            cfg.resume = None
        else:
            cfg.resume = str(latest_checkpoint(run_dir / "checkpoints"))
            cfg.paths.output_dir = str(run_dir)
            log.info("resume=auto: continuing %s from %s", run_dir, cfg.resume)
        return
    if resume is not None:
        path = Path(resume)
        if not path.exists():
            raise ConfigError(f"resume={resume}: no such checkpoint. Pass a checkpoint file or directory "
                              "(<run dir>/checkpoints/step*.ckpt), or resume=auto to continue this command's "
                              "interrupted run.")
        if output_dir.resolve() in path.resolve().parents:
            return  # continuing this very dir's run
    if launch_rank() == 0 and holds_a_run(output_dir):
        raise ConfigError(f"{output_dir} already holds a run (config.yaml / checkpoints/): a new run would "
                          "overwrite its files. Pass resume=auto to continue it, or choose another "
                          "hydra.run.dir.")
