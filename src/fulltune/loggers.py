"""Logger builders where a YAML node alone can't decide (online vs offline W&B), and the end of a
run's logging: the summary as W&B summary metrics, one W&B run closed per job."""

from __future__ import annotations

import netrc
import os
from argparse import Namespace
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, ListConfig, OmegaConf


def wandb_credentials_found() -> bool:
    """An API key in the environment or in ~/.netrc (what `wandb login` writes), for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class ConfigWandbLogger(WandbLogger):
    """A `WandbLogger` that logs OmegaConf values (the module's `model`, `finetune` hyper-parameters)
    as nested config: Lightning would turn them into their `str` and overwrite the resolved config."""

    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:
        params = vars(params) if isinstance(params, Namespace) else dict(params)
        super().log_hyperparams({
            k: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig | ListConfig) else v
            for k, v in params.items()
        })


def wandb_logger(offline: bool | None = None, **kwargs: Any) -> ConfigWandbLogger:
    """A W&B logger with a new W&B run for this job.

    `offline=None` means online only with credentials (`WANDB_API_KEY`, `wandb login`), under a
    `wandb agent` (`WANDB_SWEEP_ID`), or with `WANDB_MODE=online`, so runs without an account still
    log (sync them later with `wandb sync`). A run still open from an earlier job of this process
    (one that failed before `finish_loggers`) is closed as failed first: Lightning would otherwise
    log this job into it.
    """
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=1)
    if offline is None:
        offline = not (wandb_credentials_found() or os.environ.get("WANDB_SWEEP_ID")
                       or os.environ.get("WANDB_MODE") == "online")
    return ConfigWandbLogger(offline=offline, **kwargs)


def finish_loggers(loggers: Iterable[Any], summary: dict[str, Any]) -> None:
    """Set the run's final metrics (summary.json) as W&B summary metrics and close its W&B run, so
    the next job of a multirun gets its own. Other loggers keep summary.json beside their files."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(summary)
            logger.experiment.finish()
