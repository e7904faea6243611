"""lm-eval-harness as an optional evaluator: a local task, offline, scored before and after training."""

from __future__ import annotations

import json

import lm_eval
import pytest
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from fulltune.models import build_model, load_tokenizer
from fulltune.train import fit

TASK = """\
task: tiny_dates_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "The date {{{{day}}}} {{{{month}}}} {{{{year}}}} in ISO format is"
doc_to_target: " {{{{iso}}}}"
metric_list:
  - metric: perplexity
  - metric: acc
"""
MONTHS = ["January", "February", "March", "April", "May", "June"]


@pytest.fixture
def local_task(tmp_path):
    """A loglikelihood task over a local jsonl: what a user writes for an original task offline."""
    rows = [{"day": d, "month": MONTHS[d % 6], "year": 2000 + d, "iso": f"{2000 + d}-{d % 6 + 1:02d}-{d:02d}"}
            for d in range(1, 13)]
    (tmp_path / "rows.jsonl").write_text("\n".join(map(json.dumps, rows)))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_dates.yaml").write_text(TASK.format(data=tmp_path / "rows.jsonl"))
    return str(tmp_path / "tasks")


def test_harness_scores_the_untouched_model_before_and_reports_forgetting(tiny_cfg, local_task, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = tiny_cfg("eval=harness", "eval.harness.tasks=[tiny_dates_ll]", f"eval.harness.include_path={local_task}",
                   "eval.harness.limit=8", "export=false", "optimizer.lr=3e-3")
    summary = fit(cfg)

    before = summary["harness/tiny_dates_ll/perplexity_before"]
    after = summary["harness/tiny_dates_ll/perplexity_after"]
    assert before != after
    assert summary["forgetting/tiny_dates_ll/perplexity"] == pytest.approx(before - after)
    # "before" is the untouched model: the same task on a freshly built model gives the same number.
    fresh = HFLM(pretrained=build_model(cfg.model).eval(), tokenizer=load_tokenizer(cfg.model), batch_size=8)
    direct = lm_eval.simple_evaluate(model=fresh, tasks=["tiny_dates_ll"], limit=8, log_samples=False,
                                     task_manager=TaskManager(include_path=local_task, include_defaults=False))
    assert direct["results"]["tiny_dates_ll"]["perplexity,none"] == pytest.approx(before, rel=1e-5)
