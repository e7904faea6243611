"""Many machines: torchrun across 2 "nodes" on localhost, Hydra multiruns of DDP jobs, SLURM via submitit."""

from __future__ import annotations

import socket
import sys
from concurrent.futures import ThreadPoolExecutor

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fulltune.preflight import CONF_DIR

from .strategy_runs import (
    EQUAL_RUN,
    assert_same_training,
    ddp_multirun,
    from_pretrained,
    run_command,
    train_command,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_under_torchrun_train_like_two_devices(run, tmp_path, tmp_path_factory, cache_dir):
    """`torchrun --nnodes 2 --nproc-per-node 1`, one process per "node", both on localhost: Lightning's
    TorchElasticEnvironment picks the ranks up, and the result is the 2-device DDP run's."""
    out = tmp_path / "run"
    overrides = [*EQUAL_RUN, *from_pretrained(tmp_path_factory, cache_dir), "strategy=ddp", "trainer.devices=1",
                 "trainer.num_nodes=2"]
    port = free_port()
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--master-addr", "127.0.0.1", "--master-port", str(port), *train_command(out, cache_dir, overrides)]
    with ThreadPoolExecutor(2) as pool:  # the two "nodes" start together and must both succeed
        list(pool.map(run_command, [[*node[:3], "--node-rank", str(rank), *node[3:]] for rank in (0, 1)]))
    assert_same_training(run("ddp"), out, "torchrun 2 nodes x 1 process")


def test_multirun_of_ddp_jobs_runs_every_job_in_its_own_dir(run, tmp_path_factory, cache_dir):
    """`train.py -m ... strategy=ddp`: each job's second rank runs that job (not the whole sweep again,
    pytorch-lightning #11300), in that job's output dir; the last job equals a standalone run."""
    jobs = ddp_multirun(tmp_path_factory, cache_dir)
    assert [p.name for p in jobs] == ["0_tiny-full", "1_tiny-full"]
    for job, steps in zip(jobs, ([1, 2], []), strict=True):
        assert OmegaConf.load(job / "config.yaml").callbacks.poison.steps == steps
        assert (job / "summary.json").is_file() and (job / "hf" / "model.safetensors").is_file()
    assert not (jobs[0].parents[1] / "logs").exists()  # no rank resolved a run dir of its own
    assert_same_training(run("ddp"), jobs[1], "multirun job 2 (ddp)")


def test_slurm_launcher_takes_nodes_and_tasks_from_the_trainer():
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer.devices=8", "trainer.num_nodes=2",
                                          "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
    assert launcher.partition == "gpu" and launcher.timeout_min > 0
    params = {k: launcher[k] for k in launcher if k not in ("_target_", "submitit_folder")}
    SlurmLauncher(submitit_folder="unused", **params)  # the plugin accepts every key
