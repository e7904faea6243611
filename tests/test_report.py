"""The sweep report, rendered from a real multirun (test_sweeps' 4-job full/LoRA x LR sweep, run once
per session): the seed-notes-shaped table, PNGs that show every method, the W&B report built from
the same runs, and a clear refusal to publish without an account."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from matplotlib.image import imread
from omegaconf import OmegaConf

from fulltune.report import build_wandb_report, comparison_table, load_runs, main, run_from_wandb, write_report

from .test_sweeps import full_vs_lora_multirun

TAB10_BLUE, TAB10_ORANGE = (31, 119, 180), (255, 127, 14)  # the first two methods: full FT, then LoRA


@pytest.fixture(scope="module")
def multirun_dir(tmp_path_factory, cache_dir):
    return full_vs_lora_multirun(tmp_path_factory.getbasetemp(), cache_dir)


def pixels_of(png, rgb: tuple[int, int, int]) -> int:
    image = (imread(png)[..., :3] * 255).round()
    return int((np.abs(image - rgb).max(axis=-1) <= 8).sum())


def test_report_renders_the_comparison_table_and_plots(multirun_dir, tmp_path, capsys):
    main([str(multirun_dir), "--out", str(tmp_path)])
    assert "report.md" in capsys.readouterr().out

    table = [line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| ")]
    assert table[0] == ("| method | run | trainable params | peak memory | throughput | task accuracy "
                        "| forgetting: general | forgetting: replay |")
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[1:]]
    assert [row[:2] for row in rows] == [["full FT", "lr=0.001"], ["full FT", "lr=0.003"],
                                         ["LoRA (r=16)", "lr=0.001"], ["LoRA (r=16)", "lr=0.003"]]
    assert rows[0][2].endswith("(100.0%)") and not rows[2][2].endswith("(100.0%)")
    assert all(r[3].endswith(" GiB") and r[4].endswith(" tokens/s") and "% → " in r[5] for r in rows)
    assert all(float(r[6]) != 0 and float(r[7]) != 0 for r in rows)  # both sets measured, signed

    for png in ("loss_curves.png", "task_vs_forgetting.png"):
        height, width, _ = imread(tmp_path / png).shape
        assert height >= 400 and width >= 600
        # both methods drawn in their colours (lines and legend, or points and legend)
        assert pixels_of(tmp_path / png, TAB10_BLUE) > 100 and pixels_of(tmp_path / png, TAB10_ORANGE) > 100, png


def test_report_on_another_task_metric(multirun_dir, tmp_path):
    report = write_report(multirun_dir, tmp_path, task_metric="task/loss_after").read_text()
    assert "| task loss |" in report and "![task vs forgetting](task_vs_forgetting.png)" in report


def test_wandb_report_is_built_from_the_runs_of_a_group(multirun_dir):
    runs = load_runs(multirun_dir)
    report = build_wandb_report("team", "fulltune", "full_vs_lora", runs)

    heading, table, _, grid = report.blocks
    assert table.text == comparison_table(runs) and "LoRA (r=16)" in table.text
    assert grid.runsets[0].filters == "Metric('Group') == 'full_vs_lora'"
    axes = [(getattr(p, "x", None), getattr(p, "y", None)) for p in grid.panels]
    assert ("trainer/global_step", ["train/loss"]) in axes and ("forgetting/general", "task/accuracy_after") in axes


def test_runs_read_from_wandb_give_the_same_table(multirun_dir):
    """W&B runs carry no Hydra overrides: the method and the varied LR come from the logged config."""
    api_runs = []
    for job_dir in sorted(p.parent for p in multirun_dir.glob("*/summary.json")):
        config = OmegaConf.to_container(OmegaConf.load(job_dir / "config.yaml"))
        config.pop("run")  # what logger=wandb logs as the run config (test_wandb reads it back)
        summary = json.loads((job_dir / "summary.json").read_text())
        api_runs.append(SimpleNamespace(name=config["run_name"], config=config, summary=summary, state="finished"))

    assert comparison_table([run_from_wandb(r) for r in api_runs]) == comparison_table(load_runs(multirun_dir))


def test_publishing_a_wandb_report_without_an_account_says_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from `wandb login`
    with pytest.raises(SystemExit, match=r"needs a W&B account: set WANDB_API_KEY or run `wandb login`"):
        main(["--wandb", "team/fulltune", "--group", "full_vs_lora"])
    with pytest.raises(SystemExit, match="give ENTITY/PROJECT"):
        main(["--wandb", "fulltune", "--group", "full_vs_lora"])
