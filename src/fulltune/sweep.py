"""The jobs of a Hydra multirun, read back from its sweep dir, and the `summary.csv` / `summary.md`
that the `SweepSummary` callback (registered in conf/hydra/default.yaml) writes there.

Everything is read from files each job leaves in its own dir (`.hydra/overrides.yaml`, `summary.json`,
`error.txt`), not from memory, so the summary is the same whichever launcher ran the jobs (the local
one, submitit on a cluster) and can be rebuilt at any time: `python -m fulltune.sweep <sweep dir>`.
Light imports only: Hydra loads this module in the launching process.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from fulltune.atomic import write_text

log = logging.getLogger(__name__)

ERROR_FILE = "error.txt"
# Final metrics a sweep is compared on, in table order; `forgetting/<set>` columns follow the task ones.
TASK_METRICS = ("val/loss", "task/accuracy_after", "task/loss_after")
COST_METRICS = ("params_trainable", "params_total", "peak_memory_bytes", "tokens_per_s", "wall_time_s")


@dataclass
class Job:
    """One job of a multirun: its overrides, its summary.json (empty unless it finished) and status."""

    num: int
    dir: Path
    overrides: list[str]
    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # for failed jobs: the first line of error.txt, the root cause

    @property
    def status(self) -> str:
        """ok (summary.json written), failed (raised), or incomplete: still running, killed, or a dry run."""
        return "ok" if self.summary else "failed" if self.error is not None else "incomplete"

    @property
    def override_dict(self) -> dict[str, str]:
        return dict(o.split("=", 1) for o in self.overrides if "=" in o)

    def config(self) -> DictConfig:
        """The run's config: resolved (`config.yaml`) when the job got that far, else Hydra's composed one."""
        path = self.dir / "config.yaml"
        return OmegaConf.load(path if path.exists() else self.dir / ".hydra" / "config.yaml")


def load_jobs(sweep_dir: Path) -> list[Job]:
    """Every job Hydra started under `sweep_dir`, in job order."""
    jobs = []
    for overrides_file in Path(sweep_dir).rglob(".hydra/overrides.yaml"):
        job_dir = overrides_file.parent.parent
        summary_file, error_file = job_dir / "summary.json", job_dir / ERROR_FILE
        jobs.append(Job(
            num=int(OmegaConf.load(job_dir / ".hydra" / "hydra.yaml").hydra.job.num),
            dir=job_dir,
            overrides=[str(o) for o in OmegaConf.load(overrides_file)],
            summary=json.loads(summary_file.read_text()) if summary_file.exists() else {},
            error=error_file.read_text().splitlines()[0] if error_file.exists() else None,
        ))
    return sorted(jobs, key=lambda j: j.num)


def varying_keys(params: list[dict[str, Any]]) -> list[str]:
    """The keys whose value differs between runs (or that some runs lack): what a sweep varied."""
    keys = list(dict.fromkeys(k for p in params for k in p))
    return [k for k in keys if len({str(p.get(k)) if k in p else None for p in params}) > 1]


def forgetting_sets(summaries: list[dict[str, Any]]) -> list[str]:
    """Names of the original-task sets measured (from the `forgetting/<set>_loss_before` keys)."""
    suffix = "_loss_before"
    return sorted({k[len("forgetting/"): -len(suffix)] for s in summaries for k in s
                   if k.startswith("forgetting/") and k.endswith(suffix)})


def metric_keys(summaries: list[dict[str, Any]]) -> list[str]:
    """The metric columns of a summary: task metrics, forgetting per set, costs."""
    return [*TASK_METRICS, *(f"forgetting/{s}" for s in forgetting_sets(summaries)), *COST_METRICS]


def summary_rows(jobs: list[Job]) -> tuple[list[str], list[dict[str, Any]]]:
    """Header and rows of summary.csv: job, status, each varied override, metrics, all overrides, error."""
    varied = varying_keys([j.override_dict for j in jobs])
    metrics = metric_keys([j.summary for j in jobs])
    header = ["job", "status", *varied, *metrics, "overrides", "dir", "error"]
    rows = [
        {"job": j.num, "status": j.status, **{k: j.override_dict.get(k, "") for k in varied},
         **{m: j.summary.get(m, "") for m in metrics},
         "overrides": " ".join(j.overrides), "dir": j.dir.name, "error": j.error or ""}
        for j in jobs
    ]
    return header, rows


def _md_cell(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(row.get(h, "")) for h in header) + " |" for row in rows]
    return "\n".join(lines)


def write_summary(sweep_dir: Path) -> tuple[Path, Path]:
    """Write `summary.csv` (every column) and `summary.md` (what a reader compares) in `sweep_dir`."""
    sweep_dir = Path(sweep_dir)
    jobs = load_jobs(sweep_dir)
    header, rows = summary_rows(jobs)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header)
    writer.writeheader()
    writer.writerows(rows)
    csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    write_text(csv_path, buffer.getvalue())  # parallel jobs may rewrite it at once

    shown = [h for h in header if h not in ("overrides", "dir", "error")]
    varied = set(varying_keys([j.override_dict for j in jobs]))
    common = [o for o in (jobs[0].overrides if jobs else []) if o.split("=", 1)[0] not in varied]
    counts = {s: sum(j.status == s for j in jobs) for s in ("ok", "failed", "incomplete")}
    parts = [f"# Sweep {sweep_dir}", "",
             f"{len(jobs)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n), ""]
    if common:
        parts += ["Common overrides: " + " ".join(f"`{o}`" for o in common), ""]
    parts += [markdown_table(shown, rows), ""]
    failed = [j for j in jobs if j.status == "failed"]
    if failed:
        parts += ["## Failed jobs", "", *(f"- job {j.num} (`{j.dir.name}`): {j.error}" for j in failed), ""]
    write_text(md_path, "\n".join(parts))
    return csv_path, md_path


def root_cause(error: BaseException) -> str:
    """One line naming what went wrong: the innermost exception of a chain (Hydra wraps a failed
    `_target_` call in an InstantiationException whose own message spans lines)."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


class SweepSummary(Callback):
    """Hydra callback: records a failed job's error in its dir and rewrites the sweep summary after
    every job and at the end. Rewriting after every job matters: Hydra's basic sweeper re-raises the
    first failure once all jobs ran and then never calls `on_multirun_end`."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        if job_return.status == JobStatus.FAILED:
            error = job_return._return_value  # the exception; `.return_value` would re-raise it
            text = f"{root_cause(error)}\n\n" + "".join(traceback.format_exception(error))
            (Path(config.hydra.runtime.output_dir) / ERROR_FILE).write_text(text)
            log.error("job %s failed (in the sweep summary; the other jobs run):\n%s", config.hydra.job.num, text)
        self._write(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._write(config)

    @staticmethod
    def _write(config: DictConfig) -> None:
        csv_path, md_path = write_summary(Path(config.hydra.sweep.dir))
        log.info("sweep summary: %s, %s", csv_path, md_path)


if __name__ == "__main__":
    print(write_summary(Path(sys.argv[1]))[1].read_text())
