"""`logger=wandb` without an account, inside an Optuna search: each trial logs its own offline W&B
run holding the resolved config and the summary metrics, read back from disk with `wandb leet`
(`wandb.Api` needs the server); a failing trial is closed as a failed run and ends nothing."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from fulltune.loggers import wandb_credentials_found

from .test_sweeps import read_csv, run_multirun

WANDB = str(Path(sys.executable).parent / "wandb")
SECRET = "hf_probeSECRETvalue0123456789"


def read_offline_run(job_dir: Path) -> tuple[dict, dict]:
    """(state, config, summary...) of the job's one offline run, and its `run` record (group, name)."""
    (run_dir,) = (job_dir / "wandb").glob("offline-run-*")
    inspect = [WANDB, "leet", "inspect", "--json", str(run_dir)]
    state = json.loads(subprocess.run([*inspect, "--summary"], capture_output=True, text=True, check=True).stdout)
    records = subprocess.run(inspect, capture_output=True, text=True, check=True).stdout.splitlines()
    run_record = next(r["run"] for r in map(json.loads, records) if r["type"] == "run")
    return state, run_record


def test_optuna_trials_each_log_an_offline_wandb_run_with_config_and_summary(tmp_path, cache_dir):
    sweep_dir = tmp_path / "optuna"
    result = run_multirun(
        sweep_dir, cache_dir, "hparams_search=optuna", "hydra.sweeper.n_trials=2", "logger=wandb",
        "logger.wandb.group=optuna test", "tags=[wandb test]",
        "eval.task.batch_size=${hydra:job.num}",  # trial 0 fails inside fit (a zero batch size), after W&B started
        "+model.hub_token=${oc.env:HF_TOKEN}",  # a secret from the environment, in the config
        env={"WANDB_MODE": "offline", "WANDB_API_KEY": "", "HOME": str(tmp_path), "HF_TOKEN": SECRET},  # no account
    )

    assert result.returncode == 0, result.stderr[-4000:]  # the failed trial did not end the search
    assert set(OmegaConf.load(sweep_dir / "optimization_results.yaml").best_params) == {
        "optimizer.lr", "scheduler.warmup_ratio"}
    jobs = read_csv(sweep_dir / "summary.csv")
    assert [j["status"] for j in jobs] == ["failed", "ok"] and jobs[0]["error"].startswith("ValueError")

    written = [p for p in sweep_dir.rglob("*") if p.is_file()]  # configs, hparams, logs, the W&B runs (.wandb)
    assert sum(p.suffix == ".wandb" for p in written) == 2
    assert [p for p in written if SECRET.encode() in p.read_bytes()] == []  # checkpoints: test_security

    runs = [read_offline_run(sweep_dir / j["dir"]) for j in jobs]
    assert len({state["run_id"] for state, _ in runs}) == 2  # one W&B run per job, not one for the sweep
    failed, _ = runs[0]
    assert failed["exit_code"] == 1 and "params_trainable" not in failed["summary"]
    for job, (state, record) in zip(jobs[1:], runs[1:], strict=True):
        assert (state["state"], state["exit_code"], state["project"], record["display_name"]) == (
            "finished", 0, "fulltune", "tiny-full")
        assert record["run_group"] == "optuna test" and state["tags"] == ["wandb test"]
        resolved = OmegaConf.to_container(OmegaConf.load(sweep_dir / job["dir"] / "config.yaml"))
        resolved.pop("run")  # git SHA and versions, stored beside the config
        assert resolved["model"]["hub_token"] == "<redacted>"
        assert {k: state["config"][k] for k in resolved} == resolved  # nested and resolved, model included
        summary = json.loads((sweep_dir / job["dir"] / "summary.json").read_text())
        for key, value in summary.items():
            if isinstance(value, float):
                assert math.isclose(state["summary"][key], value, rel_tol=1e-9), key
            else:
                assert state["summary"][key] == value, key


def test_online_only_with_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not wandb_credentials_found()
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_credentials_found()  # what `wandb login` leaves
