"""Optional lm-eval-harness benchmarks on the original tasks, before and after training.

The built-in evaluators need nothing extra; this one needs `pip install 'fulltune[eval]'` and runs
any lm-eval task: the harness's own (online) or local YAML task definitions over local files
(`include_path`), offline.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from fulltune.evaluate import BeforeAfterEvaluation, eval_mode


class HarnessEvaluation(BeforeAfterEvaluation):
    """Scores `tasks` on the untouched model before the first step and on the trained one after the
    last. Results: `harness/<task>/<metric>_before|_after` and `forgetting/<task>/<metric>` =
    before − after, i.e. Perf_pre − Perf_ft: > 0 means lost ground for higher-is-better metrics
    (acc, exact_match); for perplexity-like metrics the sign is the other way round."""

    prefix = "harness"

    def __init__(
        self, tasks: list[str], include_path: str | None = None, limit: int | None = None,
        num_fewshot: int | None = None, batch_size: int = 8,
    ) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.include_path = include_path
        self.limit = limit
        self.num_fewshot = num_fewshot
        self.batch_size = batch_size
        self._task_manager: Any = None

    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, float]:
        """`{"<task>/<metric>": value}` for every numeric metric lm-eval reports (stderrs left out)."""
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        with eval_mode(module.model) as model:
            lm = HFLM(pretrained=model, tokenizer=trainer.datamodule.tokenizer, batch_size=self.batch_size)
            out = lm_eval.simple_evaluate(
                model=lm, tasks=self.tasks, task_manager=self.task_manager(),
                limit=self.limit, num_fewshot=self.num_fewshot, log_samples=False,
                bootstrap_iters=0,  # no stderrs: their bootstrap forks a Pool, which can hang in a threaded trainer
            )
        return {
            f"{task}/{metric.split(',')[0]}": float(value)
            for task, metrics in out["results"].items()
            for metric, value in metrics.items()
            if isinstance(value, int | float) and "stderr" not in metric
        }

    def task_manager(self) -> Any:
        """lm-eval's task index, built once for both evaluations. Indexing its thousands of built-in
        tasks takes ~8 s: skipped when `include_path` defines every task asked for."""
        from lm_eval.tasks import TaskManager

        if self._task_manager is None:
            if self.include_path:
                local = TaskManager(include_path=self.include_path, include_defaults=False)
                self._task_manager = local if set(self.tasks) <= set(local.all_tasks) else None
            self._task_manager = self._task_manager or TaskManager(include_path=self.include_path)
        return self._task_manager

    def derived(self, after: dict[str, float]) -> dict[str, float]:
        return {f"forgetting/{k}": self.results[f"harness/{k}_before"] - v for k, v in after.items()}
