"""fulltune against TRL's SFTTrainer, the HF Trainer and a plain PyTorch loop, on identical rows.

    python bench/peers.py [--steps 16] [--repeats 3] [--tools fulltune-pack,trl-pack,...] [--out FILE]
    python bench/peers.py --model qwen2_5_0_5b --precision bf16 --max-length 2048 --batch 8 --device cuda

Why separate processes, alternating (A B C D A B C D ...): peak memory is per process, and a shared
machine drifts, so each tool gets a fresh process and every round samples every tool.

What is held equal: the model (`--model`, a conf/model name: SmolLM2-135M-Instruct by default, the
one weights dir that `fulltune.models.resolve_weights` gives; a model without local weights, or a
`source: config` one, gets random weights from its config, saved once as an HF dir under the work
dir, with its own tokenizer or else SmolLM2's, so every tool loads the very same weights), the
precision (`--precision`: fp32, or bf16 autocast over fp32 weights for every tool), the attention
(sdpa; on CUDA the packed tools use flash-attention's varlen kernel when it loads: the table says
which each tool used), the rows (generated alpaca rows of widely varying lengths, tokenized once by
fulltune's own data module: the peers get those exact ids and labels, so prompt masking and EOS are
identical), completion-only loss, micro-batch `--batch` (4), max length `--max-length` (256), AdamW
lr 2e-5 (weight decay 0.01, none on 1-d params), cosine with 3% warmup, grad-norm clip 1.0, N steps,
one seed, no gradient checkpointing (TRL's default turns it on: here it is off for everyone), no
evaluation, no checkpoint, no export. The unpacked tools (fulltune packing off, HF Trainer, the loop)
see the same micro-batches in the same order (fulltune's sampler order, padded to the batch's
longest row); the packed ones pack with their own packer (fulltune first-fit decreasing, TRL
best-fit decreasing and padding-free) and are checked to train on about as many tokens per step.

What is measured: non-pad tokens per second from the first to the last optimizer step (step 1,
which pays one-time allocations, is outside the window; model load, tokenization and packing are
too). Memory, two ways: the whole process's peak, as a user's `time -f %M` sees it (on CPU the larger
of VmHWM just before the model is built and VmHWM at the last step; on CUDA
`torch.cuda.max_memory_allocated`), and its growth (on CPU VmHWM at the last step minus RSS just
before the model is built, VmHWM reset there with `echo 5 > /proc/self/clear_refs`; on CUDA the
peak minus what was allocated there). On CUDA also MFU: `fulltune.telemetry.model_flops` per example (each
example's attention over its own tokens, however a tool lays it out, and the LM head on label
positions for every tool, so the same rows are the same work) against `fulltune.telemetry.
peak_tflops`. Every child runs with OMP_NUM_THREADS=2 and each tool's own allocator settings, none
given from outside: fulltune sets glibc's mmap threshold itself on CPU (`fulltune.launch.
return_freed_memory`; the `fulltune-pack-heap` diagnosis runs it without).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TOOLS = ("fulltune-pack", "fulltune-pad", "trl-pack", "hf-trainer", "torch-loop")
# diagnosis: TRL as it ships (gradient checkpointing on: its SFTConfig default); fulltune with the
# gradients dropped after each optimizer step (see fulltune_step_log); fulltune's packed micro-batch
# flattened into one row, which transformers runs through flash-attention's varlen kernel (only where
# that kernel loads: see packed_attention); fulltune with glibc's default allocator settings
EXTRA_TOOLS = ("trl-pack-defaults", "fulltune-pack-grads-freed", "fulltune-pack-varlen", "fulltune-pack-heap")
LR, WARMUP, WEIGHT_DECAY, CLIP = 2e-5, 0.03, 0.01, 1.0
FLASH = "flash_attention_2"  # transformers loads the `kernels` hub build of it when flash_attn is absent
CHILD_ENV = {"OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1",
             "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
             "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
GIB = 2**30


@dataclass(frozen=True)
class Setup:
    """What every tool runs with: the command line's knobs, the same in the parent and each child."""

    model: str = "smollm2_135m"
    precision: str = "fp32"  # fp32 | bf16 (autocast over fp32 weights)
    device: str = "cpu"  # cpu | cuda
    batch: int = 4
    max_length: int = 256
    steps: int = 16
    seed: int = 1234

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

# -- data ------------------------------------------------------------------------------------------

WORDS = """the model data of to and a in is that for it as with be on not this are or from at by an
which can has more if will would each their when where how what time system value result number
change set large small first new other used make find between through during before after under
process method function example order point line table list group word text file name user task
question answer report study team project plan market price cost water energy city river history
science music story language school student paper network signal image sound light color early
carefully quickly simply clearly often usually rarely always never together however therefore
""".split()
VERBS = "explain describe summarize list compare rewrite classify translate outline evaluate".split()


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(5, 18))]
    return " ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!"])


def _paragraphs(rng: random.Random, n_sentences: int) -> str:
    sentences = [_sentence(rng) for _ in range(n_sentences)]
    cut = sorted(rng.sample(range(1, n_sentences), min(n_sentences - 1, n_sentences // 5))) if n_sentences > 1 else []
    parts, last = [], 0
    for c in [*cut, n_sentences]:
        parts.append(" ".join(sentences[last:c]))
        last = c
    return "\n\n".join(parts)


def alpaca_rows(n: int, seed: int = 0, max_length: int = 256) -> list[dict]:
    """Alpaca rows whose lengths vary widely (long-tailed, like real instruction sets): a short
    instruction, an input on about half of them, an output from a few words to ~30 sentences, so
    some rows fill only a tenth of 256 tokens and some are cut at 256. Beyond 256 tokens the outputs
    grow with `max_length` (longer on average, the tail up to the limit), as long-context
    instruction sets do, so packed rows of 2048 hold a few long answers, not dozens of short ones;
    up to 256 the rows are the same."""
    rng = random.Random(seed)
    scale = max(1.0, max_length / 256)
    mu, longest = 1.3 + 0.75 * math.log(scale), round(40 * scale)
    rows = []
    for _ in range(n):
        instruction = f"{rng.choice(VERBS).capitalize()} " + _sentence(rng)[0].lower() + _sentence(rng)[1:]
        given = rng.random() < 0.5
        inp = _paragraphs(rng, max(1, int(rng.lognormvariate(1.0, 0.9)))) if given else ""
        out = _paragraphs(rng, max(1, min(longest, int(rng.lognormvariate(mu, 1.0)))))
        rows.append({"instruction": instruction, "input": inp, "output": out})
    return rows


def write_rows(path: Path, rows: list[dict]) -> None:
    """Written only when the content changes: fulltune's token cache keys on the file's mtime."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


# -- measuring (in the child) ----------------------------------------------------------------------


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


class StepLog:
    """Per optimizer step: end time, non-pad and label tokens, model FLOPs, and memory now and at its
    peak (RSS and VmHWM on CPU, allocated and max allocated on CUDA), from `reset()` on, which opens
    the memory window just before the model is built. Counts may stay device tensors until
    `result()` reads them, so counting adds no host sync to a step; on CUDA the clock waits for the
    device only at the window's two ends, the first and the last step."""

    def __init__(self) -> None:
        self.setup = Setup()
        self.arch = None  # the model's shapes (fulltune.memory.describe), for its FLOPs
        self.times: list[float] = []
        self.tokens: list[Any] = []
        self.labels: list[Any] = []
        self.flops: list[Any] = []
        self.rss: list[int] = []
        self.hwm: list[int] = []
        self.marks: dict[str, dict] = {}
        self.phases: dict[str, list] = {}  # per step: memory now, its peak, seconds, at points inside the step
        self._pending: list[Any] = [0, 0, 0]
        self.rss0 = 0
        self.hwm0 = 0  # the whole process's peak before the window opened (CPU)
        self._t0 = time.perf_counter()

    def configure(self, setup: Setup, weights: str) -> None:
        from transformers import AutoConfig

        from fulltune.memory import describe

        self.setup, self.arch = setup, describe(AutoConfig.from_pretrained(weights))

    def _memory(self) -> tuple[int, int]:
        """Bytes (now, peak) above what was held at `reset`."""
        if self.setup.cuda:
            import torch

            return torch.cuda.memory_allocated() - self.rss0, torch.cuda.max_memory_allocated() - self.rss0
        return _status_bytes("VmRSS") - self.rss0, _status_bytes("VmHWM") - self.rss0

    def reset(self) -> None:
        gc.collect()
        if self.setup.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.rss0 = torch.cuda.memory_allocated()
        else:
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            self.hwm0 = _status_bytes("VmHWM")
            Path("/proc/self/clear_refs").write_text("5")
            self.rss0 = _status_bytes("VmRSS")
        self._t0 = time.perf_counter()

    def mark(self, name: str) -> None:
        now, peak = self._memory()
        self.marks[name] = {"rss": now, "hwm": peak}

    def phase(self, name: str) -> None:
        """Memory now, its peak and seconds since the previous step ended, at a point inside the step
        (on CUDA the seconds are the host's: the device may lag)."""
        since = time.perf_counter() - (self.times[-1] if self.times else self._t0)
        self.phases.setdefault(name, []).append([*self._memory(), round(since, 3)])

    def batch(self, nonpad: Any, batch: dict) -> None:
        """Count one micro-batch: its non-pad tokens (as the tool knows them), label tokens and FLOPs."""
        counts = (nonpad, _label_count(batch["labels"]), _example_flops(self.arch, batch))
        self._pending = [total + n for total, n in zip(self._pending, counts, strict=True)]

    def step(self) -> None:
        if self.setup.cuda and len(self.times) in (0, self.setup.steps - 1):
            import torch

            torch.cuda.synchronize()  # the window's ends; the steps between them are on the device's clock
        self.times.append(time.perf_counter())
        for kept, n in zip((self.tokens, self.labels, self.flops), self._pending, strict=True):
            kept.append(n)
        self._pending = [0, 0, 0]
        now, peak = self._memory()
        self.rss.append(now)
        self.hwm.append(peak)

    def result(self) -> dict:
        from fulltune.telemetry import peak_tflops

        span = self.times[-1] - self.times[0]
        tokens, labels = [round(float(n)) for n in self.tokens], [round(float(n)) for n in self.labels]
        tflops = sum(float(f) for f in self.flops[1:]) / span / 1e12 if span > 0 else None
        device = _device_name(self.setup)
        peak = peak_tflops(device) if self.setup.cuda else None
        return {
            "steps": len(self.times),
            "tokens_per_s": sum(tokens[1:]) / span if span > 0 else None,
            "step_s": span / max(1, len(self.times) - 1),
            "peak_bytes": self.hwm[-1],
            "process_peak_bytes": max(self.hwm0, self.hwm[-1] + self.rss0),
            "tokens_per_step": statistics.mean(tokens),
            "labels_per_step": statistics.mean(labels),
            "flops_per_step": statistics.mean(float(f) for f in self.flops),
            "tflops_per_s": tflops, "mfu": tflops / peak if tflops and peak else None, "device": device,
            "tokens": tokens, "labels": labels, "rss": self.rss, "hwm": self.hwm,
            "marks": self.marks, "phases": self.phases, "rss_at_reset": self.rss0,
        }


def _device_name(setup: Setup) -> str:
    if setup.cuda:
        import torch

        return torch.cuda.get_device_name()
    return "cpu"


def _label_count(labels: Any) -> Any:
    return (labels[:, 1:] != -100).sum()


def _example_flops(arch: Any, batch: dict) -> Any:
    """Model FLOPs of a micro-batch (`fulltune.telemetry.model_flops`) counted per example, however the
    tool lays its examples out (one per padded row, several per packed row, all in one flattened row):
    each attends over its own n tokens, as fulltune.telemetry counts them, and the LM head runs on label
    positions for every tool, so the same examples are the same work. Σ over an example's tokens of
    (2 · position + 1) is n², which gives each token its share without finding the examples."""
    import torch

    from fulltune.telemetry import model_flops

    labels = batch["labels"]
    if "attention_mask" in batch:  # padded rows, one example each
        real = batch["attention_mask"].bool()
        position = real.cumsum(1) - 1
    else:  # packed: positions restart at every example; a row's padding tail follows its last label
        index = torch.arange(labels.size(1), device=labels.device)
        real = index <= torch.where(labels != -100, index, -1).amax(1, keepdim=True)
        position = batch["position_ids"]
    attended = model_flops(arch, real.double(), 0, real.double() * (2 * position + 1)).sum()
    return attended + model_flops(arch, 0, _label_count(labels).double(), 0)


# -- the tools (each in its own child process) -----------------------------------------------------


def _fulltune_overrides(data_path: Path, setup: Setup, weights: str, packing: bool, attention: str) -> list[str]:
    # bf16: fulltune steps foreach AdamW itself there (Lightning refuses to clip a fused step under
    # mixed precision: fulltune.launch.resolve_hardware)
    precision = ["precision=bf16_mixed"] if setup.bf16 else ["precision=fp32"]
    return [
        "data=alpaca", f"data.task.0.path={data_path}", "data.task.0.val_path=null", "data.replay=[]",
        "data.replay_ratio=0", "data.demo_dir=null", f"data.max_length={setup.max_length}",
        f"data.batch_size={setup.batch}", f"data.packing={str(packing).lower()}", "~experiment",
        f"model={setup.model}", f"model.pretrained={weights}", "model.source=pretrained", "model.gguf=null",
        "model.tokenizer=null", f"model.attn_implementation={attention}", *precision,
        f"optimizer.lr={LR}", f"optimizer.weight_decay={WEIGHT_DECAY}", "scheduler=cosine",
        f"scheduler.warmup_ratio={WARMUP}", f"trainer.max_steps={setup.steps}",
        f"trainer.accelerator={'gpu' if setup.cuda else 'cpu'}", "trainer.devices=1",
        f"trainer.gradient_clip_val={CLIP}", "+trainer.enable_checkpointing=false", "trainer.enable_progress_bar=false",
        "callbacks.model_checkpoint=null", "callbacks.progress_bar=null", "callbacks.early_stopping=null",
        "eval.task=null", "eval.forgetting=null", "export=false", "plan_check=off", f"seed={setup.seed}",
    ]


def _compose(overrides: list[str], out_dir: Path):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from fulltune.preflight import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root_dir = str(REPO)
        cfg.paths.cache_dir = str(REPO / ".cache")
        cfg.paths.log_dir = cfg.paths.output_dir = str(out_dir)
    return cfg


def _fulltune_cfg(data_path: Path, out_dir: Path, setup: Setup, weights: str, packing: bool, extra: list[str],
                  attention: str = "sdpa"):
    return _compose([*_fulltune_overrides(data_path, setup, weights, packing, attention), *extra], out_dir)


_LOG = StepLog()


def fulltune_step_log(free_grads: bool = False, flatten: bool = False):
    """The Lightning callback fulltune runs with (a `callbacks.*` node): opens the memory window in
    `setup`, which Lightning calls right before `configure_model` builds the model. `free_grads`
    (a diagnosis) drops the gradients after each optimizer step, as the HF Trainer and the loop do;
    Lightning itself zeroes them only after the next forward, before its backward. `flatten` (a
    diagnosis) lays each packed micro-batch out as one row: positions restart at every example and
    every example's first label is masked, so the loss is the same, and transformers then runs
    flash-attention's varlen kernel over it (it does so only for a single packed row)."""
    import lightning as L

    class Hook(L.Callback):
        def setup(self, trainer, pl_module, stage):
            _LOG.reset()

        def on_train_start(self, trainer, pl_module):
            _LOG.mark("model+optimizer built")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _LOG.batch(batch["nonpad_fraction"].double() * batch["input_ids"].numel(), batch)
            if flatten:
                for key in ("input_ids", "labels", "position_ids"):
                    batch[key] = batch[key].reshape(1, -1)

        def on_before_zero_grad(self, trainer, pl_module, optimizer):
            _LOG.phase("forward done")

        def on_before_backward(self, trainer, pl_module, loss):
            _LOG.phase("grads zeroed")

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            _LOG.phase("backward done")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if free_grads:
                pl_module.zero_grad(set_to_none=True)
            _LOG.step()

    return Hook()


def run_fulltune(work: Path, setup: Setup, packing: bool, extra: list[str], free_grads: bool = False,
                 flatten: bool = False) -> dict:
    from omegaconf import open_dict

    from fulltune.train import train

    prep = _prepared(work)
    attention = prep["attention"]["packed"] if flatten else "sdpa"
    with tempfile.TemporaryDirectory() as out:
        cfg = _fulltune_cfg(work / "alpaca_varied.jsonl", Path(out), setup, prep["weights"], packing, extra, attention)
        with open_dict(cfg):
            cfg.callbacks.bench_steps = {"_target_": "__main__.fulltune_step_log", "free_grads": free_grads,
                                         "flatten": flatten}
        train(cfg)
    return _LOG.result()


def _load_model(weights: str, attention: str = "sdpa"):
    """fp32 weights for every precision: under bf16 they are the masters autocast computes from."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32, attn_implementation=attention)
    model.config.use_cache = False
    return model


def _prepared(work: Path) -> dict:
    return json.loads((work / "tokenized.json").read_text())


def _hf_callback():
    from transformers import TrainerCallback

    class Hook(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            _LOG.mark("model+optimizer built")

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            _LOG.phase("backward done")

        def on_step_end(self, args, state, control, **kwargs):
            _LOG.step()

    return Hook()


def _counting(trainer_cls):
    """The trainer class with each micro-batch's non-pad and label tokens counted as it trains."""

    class Counted(trainer_cls):
        def training_step(self, model, inputs, *args, **kwargs):
            mask = inputs.get("attention_mask")
            nonpad = mask.sum() if mask is not None else inputs["input_ids"].numel()  # padding-free: no pad
            _LOG.batch(nonpad, inputs)
            return super().training_step(model, inputs, *args, **kwargs)

        def compute_loss(self, *args, **kwargs):
            out = super().compute_loss(*args, **kwargs)
            _LOG.phase("forward done")
            return out

    return Counted


def _hf_args(out: str, setup: Setup) -> dict:
    return dict(output_dir=out, max_steps=setup.steps, per_device_train_batch_size=setup.batch, learning_rate=LR,
                lr_scheduler_type="cosine", warmup_steps=WARMUP, weight_decay=WEIGHT_DECAY, max_grad_norm=CLIP,
                seed=setup.seed, data_seed=setup.seed, logging_steps=10, report_to="none", save_strategy="no",
                eval_strategy="no", use_cpu=not setup.cuda, dataloader_num_workers=0, dataloader_pin_memory=False,
                disable_tqdm=True, bf16=setup.bf16, fp16=False, gradient_checkpointing=False)


def run_hf_trainer(work: Path, setup: Setup) -> dict:
    """HF Trainer with its defaults (fused AdamW, model-computed full-vocabulary loss), sequential
    sampling over fulltune's unpacked order, padded to the batch's longest row."""
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    prep = _prepared(work)
    rows = [prep["examples"][i] for i in prep["order"]]
    dataset = Dataset.from_dict({"input_ids": [r[0] for r in rows], "labels": [r[1] for r in rows]})
    tokenizer = AutoTokenizer.from_pretrained(prep["weights"])
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(**_hf_args(out, setup), train_sampling_strategy="sequential",
                                 remove_unused_columns=False)
        _LOG.reset()
        model = _load_model(prep["weights"])
        trainer = _counting(Trainer)(model=model, args=args, train_dataset=dataset, data_collator=collator,
                                     callbacks=[_hf_callback()])
        trainer.train()
    return _LOG.result()


def run_trl(work: Path, setup: Setup, defaults: bool = False) -> dict:
    """TRL's SFTTrainer with its own packing (best-fit decreasing, padding-free) of the same
    tokenized rows; `defaults` keeps its shipped gradient checkpointing."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    prep = _prepared(work)
    rows = prep["examples"]
    dataset = Dataset.from_dict({"input_ids": [r[0] for r in rows], "labels": [r[1] for r in rows]})
    tokenizer = AutoTokenizer.from_pretrained(prep["weights"])
    with tempfile.TemporaryDirectory() as out:
        settings = {**_hf_args(out, setup), "packing": True, "max_length": setup.max_length,
                    "completion_only_loss": True}
        if defaults:
            settings["gradient_checkpointing"] = True
        args = SFTConfig(**settings)
        _LOG.reset()
        model = _load_model(prep["weights"], prep["attention"]["packed"])
        trainer = _counting(SFTTrainer)(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                        callbacks=[_hf_callback()])
        trainer.train()
    return _LOG.result()


def run_torch_loop(work: Path, setup: Setup) -> dict:
    """The loop everyone writes first: padded batches in fulltune's unpacked order, `model(...).loss`
    (under bf16 autocast for `--precision bf16`), backward, clip, torch AdamW (its default for the
    device), cosine schedule."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    prep = _prepared(work)
    pad = prep["pad_id"]
    rows = [prep["examples"][i] for i in prep["order"]]
    batches = []
    for b in range(0, setup.steps * setup.batch, setup.batch):
        chunk = rows[b: b + setup.batch]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for k, (i, lab) in enumerate(chunk):
            ids[k, : len(i)], labels[k, : len(i)], mask[k, : len(i)] = torch.tensor(i), torch.tensor(lab), 1
        batches.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    torch.manual_seed(setup.seed)
    _LOG.reset()
    model = _load_model(prep["weights"]).to(setup.device)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=LR)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(WARMUP * setup.steps), setup.steps)
    _LOG.mark("model+optimizer built")
    for batch in batches:
        _LOG.batch(batch["attention_mask"].sum(), batch)
        batch = {key: t.to(setup.device, non_blocking=True) for key, t in batch.items()}
        with torch.autocast(setup.device, dtype=torch.bfloat16, enabled=setup.bf16):
            loss = model(**batch, use_cache=False).loss
        _LOG.phase("forward done")
        loss.backward()
        _LOG.phase("backward done")
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        _LOG.step()
    return _LOG.result()


def model_weights(setup: Setup, work: Path) -> tuple[str, str]:
    """The weights dir every tool loads, and where it came from: the model's own
    (`resolve_weights`), or, for a `source: config` model or one without weights here, random
    weights from its config (speed and memory do not depend on the values), saved once under the
    work dir with the model's tokenizer, else SmolLM2's (its ids fit any larger vocabulary)."""
    import hashlib

    import torch
    from omegaconf import OmegaConf, open_dict

    from fulltune.atomic import publish_dir
    from fulltune.models import ModelSpecError, build_model, load_tokenizer, resolve_weights

    spec = _compose([f"model={setup.model}"], work / "prepare").model
    if spec.source != "config":
        try:
            return resolve_weights(spec), "pretrained"
        except ModelSpecError as err:
            print(f"{err}\n-> random weights from conf/model/{setup.model}.yaml", file=sys.stderr)
    architecture = json.dumps(OmegaConf.to_container(spec.config, resolve=True), sort_keys=True)
    target = work / "weights" / f"{setup.model}-{hashlib.sha256(architecture.encode()).hexdigest()[:12]}"
    if not (target / "config.json").is_file():
        own = spec.get("tokenizer")
        tokenizer = load_tokenizer(spec if own else _compose(["model=smollm2_135m"], work / "prepare").model)
        with open_dict(spec):
            spec.source = "config"
        model = build_model(spec, dtype=torch.float32)
        if len(tokenizer) > model.config.vocab_size:
            raise SystemExit(f"{setup.model}: its vocabulary ({model.config.vocab_size}) is smaller than the "
                             f"tokenizer's ({len(tokenizer)}): give the model config a `tokenizer`")
        with publish_dir(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return str(target), f"random, from conf/model/{setup.model}.yaml"


def packed_attention(setup: Setup) -> tuple[str, str]:
    """The attention for examples that reach transformers packed into one flattened row, and why:
    flash-attention's varlen kernel on CUDA when it loads and runs here (the flash_attn package, or
    the `kernels` package's hub build), else sdpa, which masks the examples apart (a block-diagonal
    mask built from the positions)."""
    import importlib.util

    if not setup.cuda:
        return "sdpa", "cpu"
    if not any(importlib.util.find_spec(name) for name in ("flash_attn", "kernels")):
        return "sdpa", "neither flash_attn nor kernels is installed"
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    try:  # two packed examples through a one-layer model, forward and backward
        config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=FLASH, dtype=torch.bfloat16).cuda()
        ids = torch.randint(0, 64, (1, 16), device="cuda")
        model(input_ids=ids, position_ids=torch.arange(8, device="cuda").repeat(2)[None]).logits.sum().backward()
    except Exception as err:  # a hub kernel that cannot be fetched offline, no build for this GPU, ...
        return "sdpa", f"{FLASH} did not run: {type(err).__name__}: {err}"[:300]
    return FLASH, "its varlen kernel ran"


def prepare(work: Path, setup: Setup, n_rows: int) -> dict:
    """Make the weights and write the rows, then tokenize them once with fulltune's data module
    (which also fills the token cache the fulltune runs then hit): every example's ids and labels,
    and fulltune's unpacked order."""
    from hydra.utils import instantiate

    from fulltune.data.mixture import MixtureSampler
    from fulltune.models import load_tokenizer

    weights, origin = model_weights(setup, work)
    attention, why = packed_attention(setup)
    data_path = work / "alpaca_varied.jsonl"
    rows = alpaca_rows(n_rows, seed=0, max_length=setup.max_length)
    for cut in range(len(rows)):  # fulltune spreads rows evenly over ceil(n / batch) batches: keep n a multiple
        write_rows(data_path, rows[: len(rows) - cut])
        cfg = _fulltune_cfg(data_path, work / "prepare", setup, weights, packing=False, extra=[])
        tokenizer = load_tokenizer(cfg.model)
        datamodule = instantiate(cfg.data, tokenizer=tokenizer, seed=cfg.seed)
        datamodule.setup()
        if len(datamodule._builder.stores[0]) % setup.batch == 0:
            break
    store = datamodule._builder.stores[0]
    examples = []
    for i in range(len(store)):
        ids, mask = store.example(i)
        examples.append([ids.tolist(), [t if m else -100 for t, m in zip(ids.tolist(), mask.tolist(), strict=True)]])
    order = [example for batch, _ in MixtureSampler(datamodule.plan) for row in batch for _, example in row]
    lengths = [len(e[0]) for e in examples]
    stats = {"rows": len(rows) - cut, "examples": len(examples), "tokens": sum(lengths),
             "mean_length": statistics.mean(lengths), "median_length": statistics.median(lengths),
             "truncated": datamodule.stats["sources"]["alpaca"]["truncated"],
             "share_under_64": sum(n < 64 for n in lengths) / len(lengths), "weights": origin,
             "packed_attention": f"{attention} ({why})"}
    prep = {"weights": weights, "attention": {"packed": attention, "why": why}, "pad_id": datamodule._pad_id(),
            "examples": examples, "order": order, "stats": stats}
    (work / "tokenized.json").write_text(json.dumps(prep))
    return prep["stats"]


def child(args: argparse.Namespace) -> None:
    work, setup = Path(args.work), _setup(args)
    extra = args.fulltune_arg or []
    if args.child == "prepare":
        Path(args.result).write_text(json.dumps(prepare(work, setup, args.rows)))
        return
    _LOG.configure(setup, _prepared(work)["weights"])
    if args.child.startswith("fulltune-"):
        if args.child == "fulltune-pack-heap":  # glibc's default threshold: freed blocks stay in the heap
            import fulltune.launch

            fulltune.launch.return_freed_memory = lambda trainer: False
        result = run_fulltune(work, setup, args.child != "fulltune-pad", extra,
                              free_grads=args.child == "fulltune-pack-grads-freed",
                              flatten=args.child == "fulltune-pack-varlen")
    elif args.child == "trl-pack":
        result = run_trl(work, setup)
    elif args.child == "trl-pack-defaults":
        result = run_trl(work, setup, defaults=True)
    elif args.child == "hf-trainer":
        result = run_hf_trainer(work, setup)
    elif args.child == "torch-loop":
        result = run_torch_loop(work, setup)
    else:
        raise SystemExit(f"unknown tool {args.child}")
    Path(args.result).write_text(json.dumps(result))


# -- the parent: alternate the tools, then the table -----------------------------------------------


def _setup(args: argparse.Namespace) -> Setup:
    return Setup(model=args.model, precision=args.precision, device=args.device, batch=args.batch,
                 max_length=args.max_length, steps=args.steps, seed=args.seed)


def _spawn(args: argparse.Namespace, name: str, result: Path, env_extra: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--work", args.work,
           "--steps", str(args.steps), "--seed", str(args.seed), "--rows", str(args.rows), "--result", str(result),
           "--model", args.model, "--precision", args.precision, "--device", args.device,
           "--batch", str(args.batch), "--max-length", str(args.max_length)]
    cmd += [f"--fulltune-arg={a}" for a in args.fulltune_arg or []]
    env = {**os.environ, **CHILD_ENV, **env_extra}
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{name} failed (exit {proc.returncode})")
    out = json.loads(result.read_text())
    out["wall_s"] = round(time.time() - start, 1)
    return out


def attention_of(tool: str, packed: str) -> str:
    """sdpa for every tool but those whose packed examples reach transformers as one flattened row
    (TRL padding-free, the fulltune-pack-varlen diagnosis): there `packed`, flash-attention's varlen
    kernel where it runs. fulltune-pack keeps sdpa: its (batch, length) packed rows under flash
    attention would attend across examples (transformers finds examples by position only in a
    single row)."""
    return packed if tool.startswith("trl-pack") or tool == "fulltune-pack-varlen" else "sdpa"


def _median(values: list) -> Any:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def table(summary: dict, reference: str, gpu: bool = False) -> str:
    """The markdown table; on a GPU with the attention each tool ran and its MFU."""
    ref = summary.get(reference)
    gpu_head, gpu_rule = (" attention | TFLOP/s | MFU |", "---|---:|---:|") if gpu else ("", "")
    lines = [f"| tool | tok/s (median) | × {reference} | process peak GiB (median) | × {reference} "
             f"| growth GiB (median) | × {reference} | non-pad tok/step | label tok/step | runs |{gpu_head}",
             f"|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|{gpu_rule}"]

    def ratio(s: dict, key: str) -> float:
        return s[key] / ref[key] if ref else float("nan")

    for name, s in summary.items():
        line = (f"| {name} | {s['tokens_per_s']:.0f} | {ratio(s, 'tokens_per_s'):.2f} "
                f"| {s['process_peak_bytes'] / GIB:.2f} | {ratio(s, 'process_peak_bytes'):.2f} "
                f"| {s['peak_bytes'] / GIB:.2f} | {ratio(s, 'peak_bytes'):.2f} "
                f"| {s['tokens_per_step']:.0f} | {s['labels_per_step']:.0f} | {s['runs']} |")
        if gpu:
            mfu = "–" if s["mfu"] is None else f"{s['mfu']:.1%}"
            line += f" {s['attention']} | {s['tflops_per_s']:.0f} | {mfu} |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Setup()
    parser.add_argument("--model", default=defaults.model, help="a conf/model name")
    parser.add_argument("--precision", default=defaults.precision, choices=["fp32", "bf16"],
                        help="bf16: autocast over fp32 weights (fulltune precision=bf16_mixed, HF/TRL bf16=True)")
    parser.add_argument("--max-length", type=int, default=defaults.max_length, help="tokens per (packed) row")
    parser.add_argument("--batch", type=int, default=defaults.batch, help="rows per micro-batch")
    parser.add_argument("--device", default=defaults.device, choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds: every tool once per round")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"subset of {', '.join(TOOLS + EXTRA_TOOLS)}")
    parser.add_argument("--out", default=str(REPO / "bench/results/peers.json"))
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--rows", type=int, default=2000, help="generated alpaca rows")
    parser.add_argument("--work", default=str(REPO / ".cache/bench/peers"), help="data + tokenized rows")
    parser.add_argument("--budget-s", type=float, help="start no round after the first that, timed by the round "
                        "before it, would end later than this many seconds after the start")
    parser.add_argument("--env", action="append", metavar="KEY=VALUE", help="extra env for every child (diagnosis)")
    parser.add_argument("--fulltune-arg", action="append", metavar="OVERRIDE", help="extra fulltune override")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = sorted(set(tools) - set(TOOLS + EXTRA_TOOLS))
    if unknown:
        parser.error(f"unknown tools {unknown}; choose from {', '.join(TOOLS + EXTRA_TOOLS)}")
    setup = _setup(args)
    if setup.cuda:
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device here")
    env_extra = dict(kv.split("=", 1) for kv in args.env or [])
    Path(args.work).mkdir(parents=True, exist_ok=True)
    results = Path(tempfile.mkdtemp(prefix="peers-"))
    print("load average:", os.getloadavg(), flush=True)
    started, round_s = time.time(), 0.0
    data = _spawn(args, "prepare", results / "prepare.json", env_extra)
    print("data:", {k: v for k, v in data.items() if k != "wall_s"}, flush=True)
    packed = _prepared(Path(args.work))["attention"]["packed"]
    skipped = {}
    if "fulltune-pack-varlen" in tools and packed == "sdpa":  # it measures flash varlen, nothing else
        skipped["fulltune-pack-varlen"] = f"not run: no flash-attention varlen kernel ({data['packed_attention']})"
        tools.remove("fulltune-pack-varlen")
        print("fulltune-pack-varlen:", skipped["fulltune-pack-varlen"], flush=True)
    runs = []
    for round_ in range(args.repeats):
        if round_ and args.budget_s and time.time() - started + round_s > args.budget_s:
            print(f"round {round_}: not started: it would end past --budget-s {args.budget_s:.0f}", flush=True)
            break
        round_start = time.time()
        for name in tools:
            load = os.getloadavg()[0]
            run = _spawn(args, name, results / f"{name}-{round_}.json", env_extra)
            run.update(tool=name, round=round_, load_before=load)
            runs.append(run)
            print(f"round {round_} {name}: {run['tokens_per_s']:.0f} tok/s, process peak "
                  f"{run['process_peak_bytes'] / GIB:.2f} GiB, growth {run['peak_bytes'] / GIB:.2f} GiB, "
                  f"{run['tokens_per_step']:.0f} tok/step, {run['labels_per_step']:.0f} label tok/step, "
                  f"load {load:.2f}, {run['wall_s']} s", flush=True)
        round_s = time.time() - round_start
    summary = {}
    for name in tools:
        mine = [r for r in runs if r["tool"] == name]
        summary[name] = {key: _median([r[key] for r in mine]) for key in (
            "tokens_per_s", "process_peak_bytes", "peak_bytes", "tokens_per_step", "labels_per_step", "step_s",
            "tflops_per_s", "mfu")}
        summary[name].update(runs=len(mine), attention=attention_of(name, packed))
    reference = "trl-pack" if "trl-pack" in summary else tools[0]
    markdown = table(summary, reference, gpu=setup.cuda)
    print(markdown)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k not in ("child", "result")},
                               "setup": asdict(setup), "device": runs[0]["device"] if runs else None,
                               "env": {**CHILD_ENV, **env_extra}, "data": data, "load_average_end": os.getloadavg(),
                               "date": time.strftime("%Y-%m-%d %H:%M"), "summary": summary, "skipped": skipped,
                               "table": markdown, "runs": runs}, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
