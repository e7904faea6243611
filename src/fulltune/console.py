"""What a person watching a run reads: a header, a progress bar over the run's optimizer steps,
and a closing table; each event once, without library advertisements or third-party noise."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.callbacks import RichProgressBar

from fulltune.quiet import DropMessages, quiet_loggers

GiB = 2**30
# Lightning's own lines a fulltune run replaces (the header names the devices) or that advertise
NOISE = ("💡 Tip:", "GPU available:", "TPU available:", "HPU available:")
LOG_WIDTH = 400  # columns of the progress line when the output is not a terminal (Rich would wrap at 80)


def quiet_libraries(debug: bool = False) -> None:
    """Print each Lightning event once (Hydra's handler prints it; `lightning` adds a second,
    plain handler of its own) and, unless `debug`, only fulltune's own lines and one progress bar:
    Lightning's advertisements, third-party progress bars (transformers' weight loading and shard
    writing, the GGUF conversion), the library lines of `fulltune.quiet` and warnings libraries
    raise about their own internals (nothing a user can act on) are dropped by their source.
    `debug=true` shows all of them."""
    logging.getLogger("lightning").handlers.clear()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    quiet_loggers(not debug)
    _progress_bars(show=debug)
    if debug:
        return
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, DropMessages) for f in rank_zero.filters):
        rank_zero.addFilter(DropMessages(NOISE))


def _progress_bars(show: bool) -> None:
    """transformers' own bars go through its switch; the GGUF conversion's is a plain tqdm."""
    import functools

    import transformers
    import transformers.modeling_gguf_pytorch_utils as gguf

    quieted = isinstance(gguf.tqdm, functools.partial)
    if show:
        transformers.utils.logging.enable_progress_bar()
        gguf.tqdm = gguf.tqdm.func if quieted else gguf.tqdm
    else:
        transformers.utils.logging.disable_progress_bar()
        gguf.tqdm = gguf.tqdm if quieted else functools.partial(gguf.tqdm, disable=True)


class StepProgressBar(RichProgressBar):
    """One bar for the whole run, counting optimizer steps: its total is the run's step count (the
    LR schedule's length) and its ETA the time those steps will really take. Lightning's bar counts
    the micro-batches of one epoch, which a step cap or accumulation makes wrong."""

    def __init__(self, **kwargs: Any) -> None:
        if not sys.stdout.isatty():  # a log file: the bar and its metrics on one line, however many metrics
            kwargs["console_kwargs"] = {"width": LOG_WIDTH, **kwargs.get("console_kwargs", {})}
        super().__init__(**kwargs)

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.lightning_module.total_optimizer_steps()

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'step':{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer, module) -> None:
        if self.train_progress_bar_id is None:  # one task for every epoch
            super().on_train_epoch_start(trainer, module)
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        """Lightning's, drawn once per micro-batch at the optimizer step (not twice, once at its index)."""
        if not self.is_disabled and self.train_progress_bar_id is None:  # a mid-epoch resume
            self._initialize_train_progress_bar_id()
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, completed=trainer.global_step)
        self._update_metrics(trainer, module)
        self.refresh()


def header(cfg: Any, total: int, trainable: int, plan_bytes: int | None) -> str:
    """One line naming what is about to run."""
    import torch

    trainer = cfg.trainer
    devices = trainer.devices * trainer.num_nodes
    accelerator = "GPU" if torch.cuda.is_available() and trainer.accelerator != "cpu" else "CPU"
    plan = f" · plan {plan_bytes / GiB:.2f} GiB/device" if plan_bytes else ""
    return (f"{cfg.model.name} · {total / 1e6:,.1f}M parameters, {trainable / 1e6:,.1f}M trainable "
            f"({cfg.finetune.method}) · {cfg.strategy.name} · {cfg.precision.value} · "
            f"{devices} × {accelerator}{plan}")


def closing_table(summary: Mapping[str, Any]) -> str:
    """The run's results in one table: task before and after, forgetting, throughput, memory and
    where the outputs are."""
    rows: list[tuple[str, str, str]] = []
    for key in (k for k in summary if k.endswith("_before") and "_ppl_" not in k):
        name, after = key[: -len("_before")], summary.get(key[: -len("_before")] + "_after")
        if after is None:
            continue
        fmt = "{:.1%}" if name.endswith("accuracy") else "{:.4f}"
        note = f"  (forgetting {after - summary[key]:+.4f}; > 0 is worse)" if name.startswith("forgetting/") else ""
        rows.append((name, fmt.format(summary[key]), fmt.format(after) + note))
    width = max([len(r[0]) for r in rows] + [22])
    lines = [f"{'':{width}}  {'before':>8}  after", *(f"{a:{width}}  {b:>8}  {c}" for a, b, c in rows)] if rows else []
    mfu = summary.get("mfu")
    lines += [
        f"{'tokens/s (training)':{width}}  {summary['tokens_per_s']:,.0f} ({summary['tokens_per_s_per_device']:,.0f}"
        f" per device, {summary['step_s']:.2f} s/step, data wait {summary['data_wait_share']:.1%})",
        f"{'TFLOP/s per device':{width}}  {summary['tflops_per_device']:.2f}" + (f" (MFU {mfu:.1%})" if mfu else ""),
        f"{'peak memory':{width}}  {summary['peak_memory_bytes'] / GiB:.2f} GiB " + (
            "(process RSS)" if summary["device_name"] == "cpu" else f"(plan {summary['memory_plan_bytes'] / GiB:.2f})"
            if summary.get("memory_plan_bytes") else ""),
        f"{'time':{width}}  " + ", ".join(f"{k} {v:.{0 if v >= 10 else 1}f} s" for k, v in summary["time_s"].items()),
        f"{'outputs':{width}}  {summary['output_dir']}",
    ]
    return "\n".join(lines)
