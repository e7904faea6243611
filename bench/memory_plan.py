"""The memory plan against measured peak memory of real fulltune runs, on CPU.

    python bench/memory_plan.py                      # every case below, one at a time
    python bench/memory_plan.py --cases smollm2-fp32-auto qwen-fp32-auto

Each case is `python train.py` (random init from the model's config, the tiny tokenizer, packed
rows of `max_length` tokens, 3 optimizer steps, no evaluations, no checkpoints, no export) with
the `PeakRSS` callback below: every rank resets its peak RSS just before the model is built and
reports its growth after training, and the whole process's peak RSS as a user sees it (`time -f
%M`). No allocator settings from outside: a CPU run sets glibc's mmap threshold itself
(`fulltune.launch.return_freed_memory`), so freed tensors leave RSS and the peak is the live-tensor
peak plus allocator slack. The growth is held against the CPU plan (`device="cpu"`, same settings)
less its fixed term for the process before the model; the whole process against its total.
Results: docs/memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

REPO = Path(__file__).resolve().parents[1]
# name -> (model, precision, strategy, processes, micro-batch, max_length, LM-head chunk: 0 = full logits,
# [extra overrides: the memory levers])
IN_BACKWARD = ("optimizer.step_in_backward=true", "trainer.gradient_clip_val=null")
CASES = {
    "smollm2-fp32-auto": ("smollm2_135m", "fp32", "auto", 1, 4, 256, 1024),
    "smollm2-bf16true-auto": ("smollm2_135m", "bf16_true", "auto", 1, 4, 256, 1024),
    "qwen-fp32-auto": ("qwen2_5_0_5b", "fp32", "auto", 1, 1, 1024, 1024),
    "qwen-bf16true-auto": ("qwen2_5_0_5b", "bf16_true", "auto", 1, 1, 1024, 1024),
    "smollm2-fp32-ddp": ("smollm2_135m", "fp32", "ddp", 2, 4, 256, 1024),
    "smollm2-fp32-fsdp": ("smollm2_135m", "fp32", "fsdp", 2, 4, 256, 1024),
    "smollm2-fp32-zero1": ("smollm2_135m", "fp32", "deepspeed_zero1", 2, 4, 256, 1024),
    "smollm2-fp32-zero2": ("smollm2_135m", "fp32", "deepspeed_zero2", 2, 4, 256, 1024),
    "smollm2-fp32-zero3": ("smollm2_135m", "fp32", "deepspeed_zero3", 2, 4, 256, 1024),
    "smollm2-fp32-auto-fulllogits": ("smollm2_135m", "fp32", "auto", 1, 4, 256, 0),
    "qwen-fp32-auto-fulllogits": ("qwen2_5_0_5b", "fp32", "auto", 1, 1, 1024, 0),
    "qwen-fp32-auto-inbackward": ("qwen2_5_0_5b", "fp32", "auto", 1, 1, 1024, 1024, IN_BACKWARD),
    "smollm2-fp32-auto-adamw8bit": ("smollm2_135m", "fp32", "auto", 1, 4, 256, 1024, ("optimizer=adamw8bit",)),
    "smollm2-fp32-auto-adamw4bit": ("smollm2_135m", "fp32", "auto", 1, 4, 256, 1024, ("optimizer=adamw4bit",)),
    "smollm2-fp32-auto-inbackward": ("smollm2_135m", "fp32", "auto", 1, 4, 256, 1024, IN_BACKWARD),
    "smollm2-fp32-auto-8bit-inbackward": ("smollm2_135m", "fp32", "auto", 1, 4, 256, 1024,
                                          ("optimizer=adamw8bit", *IN_BACKWARD)),
    "smollm2-fp32-auto-qlora": ("smollm2_135m", "fp32", "auto", 1, 4, 256, 1024, ("finetune=qlora",)),
    # other families, cut to 2 layers (and the MoE to 16 of its 128 experts, 8 still routed) to fit this CPU
    # machine's RAM; the vocabularies, widths and per-layer structure are the real models'
    "gemma2-fp32-auto": ("gemma2_2b", "fp32", "auto", 1, 1, 512, 1024, ("model.config.num_hidden_layers=2",)),
    "qwen3moe-fp32-auto": ("qwen3_30b_a3b", "fp32", "auto", 1, 1, 1024, 1024,
                           ("model.config.num_hidden_layers=2", "model.config.num_experts=16")),
}


def _status_bytes(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024


class PeakRSS(L.Callback):
    """Each rank's peak RSS growth from just before `configure_model` to the end of training, its
    step times, and its RSS growth at each phase of each step (after forward, after backward, after
    the step: which parts of the plan coexist), written to `<root>/peak_rss_<rank>.json`."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from fulltune.telemetry import reset_peak_memory

        self.process_peak = _status_bytes("VmHWM")  # so far: imports, data; reset_peak_memory resets it
        reset_peak_memory()
        self.start, self.steps, self.phases = _status_bytes("VmRSS"), [], []

    def _phase(self, trainer: L.Trainer, name: str) -> None:
        self.phases.append((trainer.global_step + 1, name, (_status_bytes("VmRSS") - self.start) / 2**20))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self.step_start = time.perf_counter()

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss) -> None:
        self._phase(trainer, "forward done")

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._phase(trainer, "backward done")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self.steps.append(time.perf_counter() - self.step_start)
        self._phase(trainer, "step done")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        peak = _status_bytes("VmHWM")
        path = Path(trainer.default_root_dir) / f"peak_rss_{trainer.global_rank}.json"
        path.write_text(json.dumps({"rank": trainer.global_rank, "growth": peak - self.start,
                                    "process": max(peak, self.process_peak), "steps": self.steps,
                                    "phases_mib": self.phases}))


def overrides(model: str, precision: str, strategy: str, processes: int, batch: int, length: int,
              chunk: int, levers: tuple[str, ...] = ()) -> list[str]:
    return [*levers,
        f"model={model}", f"model.loss_chunk_tokens={chunk}", "model.source=config", "model.tokenizer=tiny",
        f"precision={precision}",
        f"strategy={strategy}", f"trainer.devices={processes}", "trainer.accelerator=cpu", "trainer.max_steps=3",
        "+trainer.limit_val_batches=0", "+trainer.enable_checkpointing=false", "callbacks.model_checkpoint=null",
        "callbacks.early_stopping=null", "callbacks.progress_bar=null", "eval.task=null", "eval.forgetting=null",
        "export=false", "plan_check=off", "data.packing=true", f"data.max_length={length}",
        f"data.batch_size={batch}", "+callbacks.peak_rss._target_=bench.memory_plan.PeakRSS",
    ]


def planned_bytes(args: list[str]) -> tuple[int, int]:
    """The plan of the run these overrides describe on CPU: (its total, which includes the process
    before the model, what the plan counts beyond that process)."""
    from hydra import compose, initialize_config_dir

    from fulltune.launch import plan_settings, resolve_hardware
    from fulltune.memory import build_memory_plan
    from fulltune.preflight import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[a for a in args if not a.startswith("+")])
    resolve_hardware(cfg)
    arch, settings = plan_settings(cfg)
    plan = build_memory_plan(arch, **settings, device="cpu")
    return plan.total, plan.total - plan.overhead


def measure(name: str) -> dict:
    args = overrides(*CASES[name])
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": "2"}
        command = [sys.executable, "train.py", *args, f"hydra.run.dir={out}", f"paths.log_dir={out}"]
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        ranks = [json.loads(p.read_text()) for p in Path(out).glob("peak_rss_*.json")]
    largest = max(ranks, key=lambda r: r["growth"])
    total, planned = planned_bytes(args)
    return {"case": name, "planned_mib": planned / 2**20, "measured_mib": largest["growth"] / 2**20,
            "measured_over_planned": largest["growth"] / planned, "process_mib": largest["process"] / 2**20,
            "process_over_planned": largest["process"] / total, "step_s": statistics.median(ranks[0]["steps"][1:]),
            "phases_mib": largest["phases_mib"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "memory_plan.json")
    args = parser.parse_args()
    rows = []
    print(f"{'case':30} {'planned MiB':>12} {'measured MiB':>13} {'measured/planned':>17} {'process MiB':>12} "
          f"{'process/planned':>16} {'step s':>7}")
    for name in args.cases:
        row = measure(name)
        rows.append(row)
        print(f"{name:30} {row['planned_mib']:12.1f} {row['measured_mib']:13.1f} {row['measured_over_planned']:17.2f} "
              f"{row['process_mib']:12.1f} {row['process_over_planned']:16.2f} {row['step_s']:7.2f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
