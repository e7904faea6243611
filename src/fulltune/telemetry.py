"""What a run costs, measured over its training steps only: tokens/s, step time, data wait, FLOP/s,
MFU, peak memory, and where the rest of the wall time went (setup, evaluation, checkpoints, export).

Lightning's profiler hooks time the three parts of a step loop exactly (`PhaseClock`): fetching the
next batch, running it (forward, backward, optimizer step) and writing checkpoints. `Telemetry`
counts the tokens, logs a window every `log_every_n_steps` optimizer steps, and keeps its totals in
the checkpoint, so a resumed run reports all of its segments (the work lost between the last
checkpoint and a crash is done again and counted once).

FLOPs per non-pad token are the usual 6·N (forward + backward) for the decoder layers' matmuls,
plus causal attention, 6 · layers · q_dim · n per token of an example of n tokens (half of PaLM's
12·L·d·T: the upper triangle is never needed; a packed example attends within itself only, so a row
of short examples does a fraction of a full row's attention work), plus 6 · vocab · hidden for the
LM head at the positions it runs on: label positions only under fulltune's chunked loss
(fulltune.loss), every position otherwise.
Recomputation (gradient checkpointing) is not counted: MFU is model FLOPs, not hardware FLOPs.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import re
import resource
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.profilers import Profiler

from fulltune.loss import LabelLossHead
from fulltune.memory import Arch

# Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s, by a substring of the device name.
# Checked in order: more specific names first.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM and NVL
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("RTX 4090", 165.0),
    ("V100", 125.0),
    ("T4", 65.0),
)
_DATA, _STEP, _SAVE = "[_TrainingEpochLoop].train_dataloader_next", "run_training_batch", "save_checkpoint"


def peak_tflops(device_name: str) -> float | None:
    """The dense 16-bit peak of a GPU by its name (`torch.cuda.get_device_name()`), None if unknown."""
    return next((tflops for key, tflops in PEAK_TFLOPS if key in device_name), None)


def model_flops(arch: Arch, tokens: Any, label_tokens: Any, squared_lengths: Any, label_head: bool = True) -> Any:
    """Model FLOPs (forward + backward) of a micro-batch of `tokens` non-pad tokens, `label_tokens` of
    them predicted, in examples of n tokens with Σ n² = `squared_lengths`; see the module docstring.
    Numbers or tensors."""
    attention = 6 * arch.layers * arch.q_dim * squared_lengths
    return 6 * arch.layer_linear * tokens + attention + 6 * arch.vocab * arch.hidden * (
        label_tokens if label_head else tokens)


def reset_peak_memory() -> None:
    """Open this run's peak-memory window: the jobs of a multirun share one process, and without a
    reset each would report the largest peak of all jobs before it. On CPU the earlier jobs' freed
    memory is first handed back to the OS, so it does not count as this run's."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    elif Path("/proc/self/clear_refs").exists():
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):  # glibc only
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM, the peak RSS


def peak_memory_bytes() -> int:
    """Peak device memory on GPU, else the process's peak RSS since `reset_peak_memory`."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    status = Path("/proc/self/status")
    if status.exists():
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read_text()).group(1)) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PhaseClock(Profiler):
    """Seconds spent in the step loop's three parts, from the actions Lightning profiles; every other
    action is ignored (a Lightning profiler without the per-call records a `SimpleProfiler` keeps)."""

    PHASES = {_DATA: "data", _STEP: "step", _SAVE: "checkpoint"}

    def __init__(self) -> None:
        super().__init__()
        self.seconds = dict.fromkeys(self.PHASES.values(), 0.0)
        self._started: dict[str, float] = {}

    def start(self, action_name: str) -> None:
        if action_name in self.PHASES:
            self._started[action_name] = time.perf_counter()

    def stop(self, action_name: str) -> None:
        started = self._started.pop(action_name, None)
        if started is not None:
            self.seconds[self.PHASES[action_name]] += time.perf_counter() - started

    def summary(self) -> str:
        return ""


class Telemetry(L.Callback):
    """Throughput and time accounting of one run (see the module docstring). Every
    `log_every_n_steps` optimizer steps rank 0 logs `perf/*` rates of the window since the last log
    (summed over ranks by one all-reduce); the progress bar shows the latest token rate. Counting
    stays on the device between logs, so it adds no host synchronisation to a step."""

    COUNTS = ("tokens", "label_tokens", "samples", "flops")

    def __init__(self, started: float, arch: Arch) -> None:
        self.clock = PhaseClock()
        self.started = started  # when fit() began: setup is the time until training starts
        self.arch = arch  # the model's shapes, for its FLOPs per token
        self.peak: float | None = None  # the GPU's dense peak FLOP/s, when known
        self.device_name = "cpu"
        self.before: dict[str, float] = {}  # the totals of earlier segments, from the checkpoint
        self.marks: dict[str, float] = {}
        self.evaluation_s = 0.0
        self._counts: torch.Tensor | None = None  # this segment's COUNTS on this rank
        self._logged: tuple[torch.Tensor, float, int] | None = None  # counts, busy seconds, step at the last log
        self._label_head = True
        self._trainer: L.Trainer | None = None
        self._final: dict[str, float] = {}
        self.rate = 0.0

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        self._counts = torch.zeros(len(self.COUNTS), dtype=torch.float64, device=module.device)
        if module.device.type == "cuda":
            self.device_name = torch.cuda.get_device_name(module.device)
            tflops = peak_tflops(self.device_name)
            self.peak = tflops * 1e12 if tflops else None

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._label_head = isinstance(module.model.get_output_embeddings(), LabelLossHead)
        self.marks["train_start"] = time.perf_counter()  # the evaluators' "before" runs from here
        self._logged = (self._counts.clone(), 0.0, trainer.global_step)

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.marks.setdefault("first_batch", time.perf_counter())

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        ids = batch["input_ids"]
        tokens = batch["nonpad_fraction"].double() * ids.numel()
        labels = (batch["labels"][:, 1:] != -100).sum().double()
        flops = model_flops(self.arch, tokens, labels, batch["squared_lengths"].double(), self._label_head)
        self._counts += torch.stack([tokens, labels, batch["num_examples"].to(tokens), flops])
        step = trainer.global_step
        if step != self._logged[2] and step % trainer.log_every_n_steps == 0:
            self._log_window(trainer, module)
        if self.rate:  # from the first logged window on
            module.log("tok/s", self.rate, prog_bar=True, logger=False)

    def busy_s(self) -> float:
        """Seconds of this segment's step loop: fetching batches plus running them."""
        return self.clock.seconds["data"] + self.clock.seconds["step"]

    def _log_window(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        counts, busy, step = self._logged
        window = trainer.strategy.reduce(self._counts - counts, reduce_op="sum").tolist()
        seconds = max(self.busy_s() - busy, 1e-9)
        tokens, flops, world = window[0], window[3], trainer.world_size
        self.rate = tokens / seconds
        metrics = {
            "perf/tokens_per_s": self.rate,
            "perf/tokens_per_s_per_device": self.rate / world,
            "perf/samples_per_s": window[2] / seconds,
            "perf/step_s": seconds / max(trainer.global_step - step, 1),
            "perf/tflops_per_device": flops / seconds / world / 1e12,
            "perf/peak_memory_gib": peak_memory_bytes() / 2**30,
        }
        if self.peak:
            metrics["perf/mfu"] = flops / seconds / world / self.peak
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        self._logged = (self._counts.clone(), self.busy_s(), trainer.global_step)

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.marks["validation"] = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.evaluation_s += time.perf_counter() - self.marks.pop("validation", time.perf_counter())

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.marks["train_end"] = time.perf_counter()  # the evaluators' "after" and the export follow
        self._final = self.totals(trainer)

    def totals(self, trainer: L.Trainer) -> dict[str, float]:
        """All segments' totals so far, tokens summed over ranks. A collective: every rank calls it."""
        summed = trainer.strategy.reduce(self._counts.clone(), reduce_op="sum").tolist()
        mine = {**dict(zip(self.COUNTS, summed, strict=True)),
                **{f"{phase}_s": s for phase, s in self.clock.seconds.items()},
                "evaluation_s": self.evaluation_s, "wall_s": time.perf_counter() - self.started}
        return {k: self.before.get(k, 0.0) + v for k, v in mine.items()}

    def state_dict(self) -> dict[str, float]:
        # Lightning builds a checkpoint on every rank, so the all-reduce in `totals` is safe here
        return self.totals(self._trainer) if self._trainer is not None else dict(self.before)

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.before = dict(state_dict)

    def results(self, world_size: int, steps: int, export_s: float = 0.0) -> dict[str, Any]:
        """summary.json's accounting of the run, all segments together; call it after training ended
        (its totals were summed over ranks then) and after the export, on any rank."""
        t, marks, now = self._final, self.marks, time.perf_counter()
        start = marks.get("train_start", self.started)
        # the checkpoint ModelCheckpoint writes when training ends (`save_last`) comes after the totals
        final_save = self.before.get("checkpoint_s", 0.0) + self.clock.seconds["checkpoint"] - t["checkpoint_s"]
        evaluation = (t["evaluation_s"] + marks.get("first_batch", start) - start + now - marks["train_end"]
                      - export_s - final_save)
        train_s = max(t["data_s"] + t["step_s"], 1e-9)
        per_device = train_s * world_size
        return {
            "tokens_seen": round(t["tokens"]),
            "label_tokens_seen": round(t["label_tokens"]),
            "samples_seen": round(t["samples"]),
            "tokens_per_s": round(t["tokens"] / train_s, 1),
            "tokens_per_s_per_device": round(t["tokens"] / per_device, 1),
            "samples_per_s": round(t["samples"] / train_s, 2),
            "step_s": round(train_s / max(steps, 1), 3),
            "data_wait_share": round(t["data_s"] / train_s, 4),
            "tflops_per_device": round(t["flops"] / per_device / 1e12, 4),
            **({"mfu": round(t["flops"] / per_device / self.peak, 4)} if self.peak else {}),  # GPUs in the table
            "device_name": self.device_name,
            "peak_memory_bytes": peak_memory_bytes(),
            "time_s": {
                "setup": round(start - self.started, 2),
                "train": round(train_s, 2),
                "evaluation": round(max(evaluation, 0.0), 2),
                "checkpoint": round(t["checkpoint_s"] + final_save, 2),
                "export": round(export_s, 2),
                # every segment's fit: the earlier ones up to their last checkpoint, this one whole
                "wall": round(t["wall_s"] + now - marks["train_end"], 2),
            },
        }
