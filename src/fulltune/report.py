"""Compare the runs of a sweep: full fine-tuning against LoRA (or any other axis the sweep varied).

    python -m fulltune.report outputs/multirun/<date>/<time>          # report.md + PNGs in that dir
    python -m fulltune.report --wandb ENTITY/PROJECT --group G        # publish a W&B Report

The local report needs no account: it reads each job's summary.json, config and csv/metrics.csv
and writes report.md (the comparison table in the shape of the seed notes' table: method ·
trainable params (%) · peak memory · throughput · task metric · forgetting), loss_curves.png and
task_vs_forgetting.png. The W&B report reads the runs of a W&B group through the public API and
saves a Report (wandb-workspaces) with the same table and live panels; it needs an API key and
network access.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from fulltune.preflight import ConfigError
from fulltune.sweep import forgetting_sets, load_jobs, markdown_table, varying_keys

LOSS_KEYS = ("train/loss", "val/loss")
# What labels a W&B run (which has no Hydra overrides) when runs differ in it.
WANDB_LABEL_KEYS = ("optimizer.lr", "data.replay_ratio", "scheduler.warmup_ratio", "regularizer._target_", "seed")
DEFAULT_TASK_METRIC = "task/accuracy_after"


@dataclass
class Run:
    """One run as the report sees it, from a multirun job dir or from W&B."""

    name: str
    method: str                       # e.g. "full FT", "LoRA r=16"
    params: dict[str, Any]            # what may tell runs of one method apart (overrides, config values)
    summary: dict[str, Any]
    status: str = "ok"
    error: str | None = None
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> (step, value)


def method_label(finetune: Mapping[str, Any]) -> str:
    """How the seed notes name a method: full FT, LoRA (r=64), freeze (top 4 layers)."""
    method = finetune.get("method")
    if method in ("lora", "qlora"):
        return f"{'QLoRA' if method == 'qlora' else 'LoRA'} (r={finetune.get('r')})"
    if method == "freeze":
        return f"freeze (top {finetune.get('top_layers')} layers)"
    return "full FT" if method == "full" else str(method)


def read_history(metrics_csv: Path) -> dict[str, list[tuple[int, float]]]:
    """The loss curves of a run from its CSVLogger file (rows hold only what was logged at that step).
    A resumed run's file holds each segment in turn, and the steps an interrupted segment ran past its
    last checkpoint twice: the later row (the segment that went on) is the one kept, so it reads as one curve."""
    history: dict[str, dict[int, float]] = {}
    if not metrics_csv.exists():
        return {}
    with metrics_csv.open() as f:
        for row in csv.DictReader(f):
            for key in LOSS_KEYS:
                if row.get(key):
                    history.setdefault(key, {})[int(row["step"])] = float(row[key])
    return {key: sorted(points.items()) for key, points in history.items()}


def load_runs(sweep_dir: Path) -> list[Run]:
    """Every job of a Hydra multirun, finished or failed."""
    runs = []
    for job in load_jobs(sweep_dir):
        finetune = OmegaConf.to_container(job.config().finetune)
        runs.append(Run(
            name=job.dir.name, method=method_label(finetune),
            params={k: v for k, v in job.override_dict.items() if k != "finetune"},
            summary=job.summary, status=job.status, error=job.error,
            history=read_history(job.dir / "csv" / "metrics.csv"),
        ))
    if not runs:
        raise ConfigError(f"{sweep_dir}: no Hydra jobs here (no */.hydra/overrides.yaml); give a multirun dir")
    return runs


def run_labels(runs: list[Run]) -> list[str]:
    """Method plus what else the sweep varied, e.g. 'LoRA (r=16), lr=0.001'."""
    varied = varying_keys([r.params for r in runs])
    return [", ".join([r.method, *(f"{k.rsplit('.', 1)[-1]}={r.params[k]}" for k in varied if k in r.params)])
            for r in runs]


def human_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def format_metric(key: str, value: float) -> str:
    return f"{value:.1%}" if "accuracy" in key else f"{value:.3f}"


def task_cell(summary: dict[str, Any], key: str) -> str:
    """The task metric after training, with its value before when the run measured it."""
    if key not in summary:
        return "–"
    before = key.removesuffix("_after") + "_before"
    after = format_metric(key, summary[key])
    return f"{format_metric(key, summary[before])} → {after}" if before in summary and before != key else after


def comparison_table(runs: list[Run], task_metric: str = DEFAULT_TASK_METRIC) -> str:
    """The markdown table: method · run · trainable params (%) · peak memory · throughput · task metric ·
    forgetting per set (loss after − before on original-task data, nats; > 0 = forgot)."""
    done = [(r, label) for r, label in zip(runs, run_labels(runs), strict=True) if r.status == "ok"]
    sets = forgetting_sets([r.summary for r, _ in done])
    metric_name = task_metric.removeprefix("task/").removesuffix("_after")
    head = ["method", "run", "trainable params", "peak memory", "throughput", f"task {metric_name}",
            *(f"forgetting: {s}" for s in sets)]
    rows = []
    for run, label in sorted(done, key=lambda d: method_order(d[0].method)):
        s = run.summary
        cells = [
            run.method, label.removeprefix(run.method).removeprefix(", ") or "–",
            f"{human_count(s['params_trainable'])} ({s['params_trainable'] / s['params_total']:.1%})",
            f"{s['peak_memory_bytes'] / 2**30:.2f} GiB",
            f"{s['tokens_per_s']:,.0f} tokens/s",
            task_cell(s, task_metric),
            *(f"{s[f'forgetting/{name}']:+.4f}" if f"forgetting/{name}" in s else "–" for name in sets),
        ]
        rows.append(dict(zip(head, cells, strict=True)))
    return markdown_table(head, rows)


def method_order(method: str) -> tuple[bool, str]:
    """Full fine-tuning first, then the baselines, as in the seed notes' table."""
    return method != "full FT", method


def run_styles(runs: list[Run]) -> list[dict[str, Any]]:
    """Matplotlib styles, the same for a run in every plot: colour = method, and the runs of one method
    told apart by line style and marker."""
    import matplotlib

    palette = matplotlib.colormaps["tab10"].colors
    methods = sorted({r.method for r in runs}, key=method_order)
    nth: dict[str, int] = {}
    styles = []
    for run in runs:
        i = nth[run.method] = nth.get(run.method, -1) + 1
        styles.append({"color": palette[methods.index(run.method) % len(palette)],
                       "linestyle": ["-", "--", ":", "-."][i % 4], "marker": "osD^v<>p"[i % 8]})
    return styles


def plot_loss_curves(runs: list[Run], path: Path) -> Path | None:
    """Train and validation loss against the optimizer step: one colour per method, one line per run."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = [k for k in LOSS_KEYS if any(k in r.history for r in runs)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.5), squeeze=False, sharex=True,
                             layout="constrained")
    for ax, key in zip(axes[0], keys, strict=True):
        for run, label, style in zip(runs, run_labels(runs), run_styles(runs), strict=True):
            if key in run.history:
                steps, values = zip(*run.history[key], strict=True)
                ax.plot(steps, values, label=label, markersize=5 if len(steps) <= 30 else 0, **style)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"{key} (nats/token)")
        ax.set_title(f"{key} by method")
        ax.grid(alpha=0.3)
    return _save_with_legend(fig, path)


def plot_task_vs_forgetting(runs: list[Run], path: Path, task_metric: str = DEFAULT_TASK_METRIC) -> Path | None:
    """Per original-task set: forgetting (x; > 0 = worse than the pretrained model) against the task
    metric (y): where each run sits on the learn-vs-forget trade-off."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    done = [(r, label, style) for r, label, style in zip(runs, run_labels(runs), run_styles(runs), strict=True)
            if r.status == "ok" and task_metric in r.summary]
    sets = forgetting_sets([r.summary for r, _, _ in done])
    if not sets:
        return None
    fig, axes = plt.subplots(1, len(sets), figsize=(6.5 * len(sets), 4.8), squeeze=False, layout="constrained")
    for ax, name in zip(axes[0], sets, strict=True):
        for run, label, style in done:
            ax.scatter(run.summary[f"forgetting/{name}"], run.summary[task_metric], s=70, label=label, zorder=3,
                       color=style["color"], marker=style["marker"], edgecolor="black", linewidth=0.5)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlabel(f"forgetting on {name}: loss after − before (nats/token; > 0 = worse)")
        ax.set_ylabel(task_metric)
        ax.margins(x=0.15, y=0.15)
        if "accuracy" in task_metric:  # the whole 0-100% range: comparable across reports
            ax.set_ylim(-0.03, 1.03)
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        better = "down-left" if "loss" in task_metric else "up-left"
        ax.set_title(f"task vs forgetting ({name}): {better} is better", fontsize=10)
        ax.grid(alpha=0.3)
    return _save_with_legend(fig, path)


def _save_with_legend(fig, path: Path) -> Path:
    """One legend for all panels, below them, so it never hides a point or a curve; then the PNG."""
    import matplotlib.pyplot as plt

    handles: dict = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    columns = min(len(handles), 3 if len(fig.axes) > 1 else 2)
    fig.set_figheight(fig.get_figheight() + 0.22 * -(-len(handles) // columns))  # room for the legend's rows
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=columns, fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # a legend wider than one panel stays whole
    plt.close(fig)
    return path


def write_report(sweep_dir: Path, out_dir: Path | None = None, task_metric: str = DEFAULT_TASK_METRIC) -> Path:
    """report.md + PNGs for a multirun dir (into `out_dir`, default the multirun dir); returns report.md."""
    import matplotlib

    matplotlib.use("Agg")
    runs = load_runs(sweep_dir)
    out_dir = Path(out_dir or sweep_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = plot_loss_curves(runs, out_dir / "loss_curves.png")
    scatter = plot_task_vs_forgetting(runs, out_dir / "task_vs_forgetting.png", task_metric)
    failed = [r for r in runs if r.status != "ok"]
    parts = [
        f"# Sweep report: {Path(sweep_dir).resolve()}", "",
        f"{len(runs)} runs ({len(runs) - len(failed)} finished). Peak memory is the GPU's max allocated "
        "memory, or the process's peak RSS on CPU; forgetting is the loss on original-task data after "
        "minus before fine-tuning (nats/token, > 0 = worse).", "",
        comparison_table(runs, task_metric), "",
    ]
    parts += [f"![loss curves]({curves.name})", ""] if curves else ["No loss curves: no csv/metrics.csv.", ""]
    parts += ([f"![task vs forgetting]({scatter.name})", ""] if scatter
              else ["No task-vs-forgetting plot: the runs measured no forgetting sets.", ""])
    if failed:
        parts += ["## Runs without results", "", *(f"- `{r.name}` ({r.status}): {r.error or 'no summary.json'}"
                                                 for r in failed), ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(parts))
    return path


def run_from_wandb(run: Any) -> Run:
    """A W&B public-API run as a report `Run` (config as logged by `logger=wandb`: the resolved config)."""
    config = dict(run.config)
    finetune = config.get("finetune")
    flat = OmegaConf.create(config)
    return Run(
        name=run.name,
        method=method_label(finetune) if isinstance(finetune, Mapping) else str(run.summary.get("finetune")),
        params={k: OmegaConf.select(flat, k) for k in WANDB_LABEL_KEYS if OmegaConf.select(flat, k) is not None},
        summary=dict(run.summary), status="ok" if run.state == "finished" else run.state,
    )


def build_wandb_report(entity: str, project: str, group: str, runs: list[Run],
                       task_metric: str = DEFAULT_TASK_METRIC) -> Any:
    """The W&B Report (not yet saved): the comparison table, then live panels over the group's runs."""
    import wandb_workspaces.reports.v2 as wr

    sets = forgetting_sets([r.summary for r in runs if r.status == "ok"])
    runset = wr.Runset(entity=entity, project=project, name=group, filters=f"Metric('Group') == '{group}'")
    panels = [
        wr.LinePlot(title="train loss", x="trainer/global_step", y=["train/loss"]),
        wr.LinePlot(title="validation loss", x="trainer/global_step", y=["val/loss"]),
        *(wr.ScatterPlot(title=f"{task_metric} vs forgetting on {s}", x=f"forgetting/{s}", y=task_metric)
          for s in sets),
        wr.BarPlot(title="trainable parameters", metrics=["params_trainable"]),
        wr.BarPlot(title="peak memory (bytes)", metrics=["peak_memory_bytes"]),
        wr.BarPlot(title="throughput (tokens/s)", metrics=["tokens_per_s"]),
        wr.RunComparer(diff_only="split"),
    ]
    return wr.Report(
        entity=entity, project=project, title=f"fulltune: {group}",
        description="Full fine-tuning vs parameter-efficient baselines: cost, task metric, forgetting.",
        blocks=[
            wr.H1("Comparison"),
            wr.MarkdownBlock(comparison_table(runs, task_metric)),
            wr.P("Forgetting: loss on original-task data after minus before fine-tuning (nats/token; > 0 = worse)."),
            wr.PanelGrid(runsets=[runset], panels=panels),
        ],
    )


def publish_wandb_report(entity_project: str, group: str, task_metric: str = DEFAULT_TASK_METRIC) -> str:
    """Save a W&B Report comparing the runs of `group` in ENTITY/PROJECT; returns its URL."""
    from fulltune.loggers import wandb_credentials_found  # imports Lightning: only on this path

    entity, _, project = entity_project.partition("/")
    if not entity or not project or "/" in project:
        raise ConfigError(f"--wandb {entity_project!r}: give ENTITY/PROJECT, e.g. --wandb my-team/fulltune")
    if not wandb_credentials_found():
        raise ConfigError(
            "publishing a W&B report needs a W&B account: set WANDB_API_KEY or run `wandb login`, and network "
            "access to W&B. Offline runs upload with `wandb sync <run dir>/wandb/offline-run-*`; without an "
            "account, `python -m fulltune.report <multirun dir>` writes the same comparison locally."
        )
    import wandb

    try:
        api = wandb.Api(timeout=30)
        runs = [run_from_wandb(r) for r in api.runs(f"{entity}/{project}", filters={"group": group})]
        if not runs:
            raise ConfigError(f"W&B {entity}/{project} has no runs in group {group!r} (logger.wandb.group)")
        report = build_wandb_report(entity, project, group, runs, task_metric)
        report.save()
    except ConfigError:
        raise
    except Exception as err:  # no network, a rejected key, an unknown project: one message, not a trace
        raise ConfigError(f"could not publish the W&B report for {entity}/{project} group {group!r}: "
                          f"{type(err).__name__}: {err}") from err
    return report.url


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fulltune.report", description=__doc__.splitlines()[0])
    parser.add_argument("multirun_dir", nargs="?", type=Path, help="a Hydra multirun (sweep) dir")
    parser.add_argument("--out", type=Path, help="where report.md and the PNGs go (default: the multirun dir)")
    parser.add_argument("--task-metric", default=DEFAULT_TASK_METRIC, help="summary key on the task axis")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="publish a W&B Report of a group's runs")
    parser.add_argument("--group", help="the W&B group to report (with --wandb)")
    args = parser.parse_args(argv)
    if args.multirun_dir is None and args.wandb is None:
        parser.error("give a multirun dir, or --wandb ENTITY/PROJECT --group G")
    if args.wandb and not args.group:
        parser.error("--wandb needs --group G (the runs' logger.wandb.group)")
    try:
        if args.multirun_dir is not None:
            print(f"report: {write_report(args.multirun_dir, args.out, args.task_metric)}")
        if args.wandb:
            print(f"W&B report: {publish_wandb_report(args.wandb, args.group, args.task_metric)}")
    except ConfigError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
