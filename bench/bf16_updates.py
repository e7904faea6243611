"""bf16-true and the optimizer: does a short fine-tune with bf16 weights keep its updates?

    python bench/bf16_updates.py                          # SmolLM2-135M-Instruct, 40 steps at lr 2e-5
    python bench/bf16_updates.py --steps 4 --max-load 99 -- model=tiny  # a quick check of the script

Runs the same job (`python train.py`, the demo data) three times, one after the other and each only
once the 1-minute load average is at most 3: bf16-true with the default optimizer (torchao AdamW with
stochastic rounding), bf16-true with plain torch AdamW (`optimizer.bf16_compensation=off`), and fp32.
For each it reads the per-step train loss (CSV logger), the task loss and accuracy before/after
(summary.json) and compares the exported weights with the starting ones: how many elements changed at
all, how many changed once both are rounded to bf16, and how the update compares with fp32's. Prints
markdown for docs/benchmarks.md and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RUNS = {  # name -> overrides
    "bf16-true, stochastic rounding": ["precision=bf16_true"],
    "bf16-true, plain AdamW": ["precision=bf16_true", "optimizer.bf16_compensation=off"],
    "fp32": ["precision=fp32"],
}


def wait_for_idle_cpus(max_load: float) -> None:
    """Timings on 2 shared cores mean nothing under load: start a run only when the load has settled."""
    while os.getloadavg()[0] > max_load:
        print(f"load {os.getloadavg()[0]:.1f} > {max_load}: waiting", flush=True)
        time.sleep(30)


def train(run_dir: Path, overrides: list[str], steps: int, extra: list[str]) -> float:
    """One `python train.py` job into `run_dir`; returns its wall time in seconds."""
    command = [sys.executable, "train.py", *overrides, f"trainer.max_steps={steps}",
               f"trainer.val_check_interval={steps}", "trainer.log_every_n_steps=1", *extra,
               f"hydra.run.dir={run_dir}"]
    print("$", " ".join(command[1:]), flush=True)
    start = time.time()
    subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.time() - start


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {name: t for file in sorted(directory.glob("*.safetensors")) for name, t in load_file(file).items()}


def starting_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights the run started from, built from its recorded model spec."""
    from omegaconf import OmegaConf

    from fulltune.models import build_model

    return build_model(OmegaConf.load(run_dir / "config.yaml").model).state_dict()


def weight_changes(start: dict, end: dict, reference_update: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    """Fractions of elements changed (in the stored dtype, and once both sides are rounded to bf16), the
    update's norm, its cosine with the fp32 run's update and how far it went along that update (fp32 = 1):
    stochastic rounding adds noise across it (a lower cosine) but should keep the distance along it."""
    names = sorted(start.keys() & end.keys())
    changed = changed_bf16 = total = 0
    updates = []
    for name in names:
        before, after = start[name].to(end[name].dtype), end[name]
        changed += int((after != before).sum())
        changed_bf16 += int((after.bfloat16() != before.bfloat16()).sum())
        total += after.numel()
        updates.append((after.float() - before.float()).flatten())
    update = torch.cat(updates)
    result = {"elements": total, "changed": changed / total, "changed_at_bf16": changed_bf16 / total,
              "update_norm": float(update.norm())}
    if reference_update is not None:
        result["cosine_with_fp32_update"] = float(torch.nn.functional.cosine_similarity(update, reference_update, 0))
        result["along_fp32_update"] = float(update @ reference_update / reference_update.square().sum())
    return result, update


def train_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bf16_updates")
    parser.add_argument("--max-load", type=float, default=3.0, help="start a run only below this load average")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides (default: model=smollm2_135m)")
    args = parser.parse_args()
    extra = args.overrides or ["model=smollm2_135m"]

    results = {}
    for name, overrides in RUNS.items():
        run_dir = args.out / name.replace(", ", "_").replace(" ", "_")
        wait_for_idle_cpus(args.max_load)
        wall = train(run_dir, overrides, args.steps, extra)
        summary = json.loads((run_dir / "summary.json").read_text())
        results[name] = {"wall_s": round(wall, 1), "train_s": summary["wall_time_s"],
                         "train_loss": train_losses(run_dir), "run_dir": str(run_dir),
                         **{k: summary[k] for k in ("task/loss_before", "task/loss_after", "task/accuracy_before",
                                                    "task/accuracy_after")}}
    start = starting_weights(Path(results["fp32"]["run_dir"]))
    fp32_changes, fp32_update = weight_changes(start, load_weights(Path(results["fp32"]["run_dir"]) / "hf"), None)
    results["fp32"]["weights"] = fp32_changes
    for name in list(RUNS)[:2]:
        results[name]["weights"], _ = weight_changes(start, load_weights(Path(results[name]["run_dir"]) / "hf"),
                                                     fp32_update)

    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.steps} steps, overrides {' '.join(extra)}\n")
    print("| run | task loss before → after | accuracy before → after | train loss, first 5 → last 5 steps "
          "| weights changed (stored dtype) | changed at bf16 resolution | ‖update‖ | cos(update, fp32's) "
          "| distance along fp32's update | wall time |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        w, losses = r["weights"], r["train_loss"]
        head, tail = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
        print(f"| {name} | {r['task/loss_before']:.3f} → {r['task/loss_after']:.3f} "
              f"| {r['task/accuracy_before']:.1%} → {r['task/accuracy_after']:.1%} | {head:.3f} → {tail:.3f} "
              f"| {w['changed']:.1%} | {w['changed_at_bf16']:.1%} | {w['update_norm']:.3f} "
              f"| {w.get('cosine_with_fp32_update', 1.0):.3f} | {w.get('along_fp32_update', 1.0):.3f} "
              f"| {r['wall_s']:.0f} s |")
    out = args.out / "results.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\n{out}")


if __name__ == "__main__":
    main()
