"""fulltune against TRL's SFTTrainer, the HF Trainer and a plain PyTorch loop, on identical rows.

    python bench/peers.py [--steps 16] [--repeats 3] [--tools fulltune-pack,trl-pack,...] [--out FILE]

Why separate processes, alternating (A B C D A B C D ...): peak RSS is per process, and a shared
2-core machine drifts, so each tool gets a fresh process and every round samples every tool.

What is held equal: the model (SmolLM2-135M-Instruct, fp32, sdpa, the one weights dir that
`fulltune.models.resolve_weights` gives), the rows (generated alpaca rows of widely varying lengths,
tokenized once by fulltune's own data module: the peers get those exact ids and labels, so prompt
masking and EOS are identical), completion-only loss, micro-batch 4, max length 256, AdamW lr 2e-5
(weight decay 0.01, none on 1-d params), cosine with 3% warmup, grad-norm clip 1.0, N steps, one seed,
no gradient checkpointing (TRL's default turns it on: here it is off for everyone), no evaluation,
no checkpoint, no export. The unpacked tools (fulltune packing off, HF Trainer, the loop) see the
same micro-batches in the same order (fulltune's sampler order, padded to the batch's longest row);
the packed ones pack with their own packer (fulltune first-fit decreasing, TRL best-fit decreasing
and padding-free) and are checked to train on about as many tokens per step.

What is measured: non-pad tokens per second from the first to the last optimizer step (step 1,
which pays one-time allocations, is outside the window; model load, tokenization and packing are
too), and peak memory = VmHWM at the last step minus RSS just before the model is built, VmHWM
reset there (`echo 5 > /proc/self/clear_refs`). Every child runs with MALLOC_MMAP_THRESHOLD_=65536
(freed tensors leave RSS) and OMP_NUM_THREADS=2.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOLS = ("fulltune-pack", "fulltune-pad", "trl-pack", "hf-trainer", "torch-loop")
# diagnosis: TRL as it ships (gradient checkpointing on: its SFTConfig default); fulltune with the
# gradients dropped after each optimizer step (see fulltune_step_log)
EXTRA_TOOLS = ("trl-pack-defaults", "fulltune-pack-grads-freed")
BATCH, MAX_LENGTH, LR, WARMUP, WEIGHT_DECAY, CLIP = 4, 256, 2e-5, 0.03, 0.01, 1.0
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1",
             "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
             "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
GIB = 2**30

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


def alpaca_rows(n: int, seed: int = 0) -> list[dict]:
    """Alpaca rows whose lengths vary widely (long-tailed, like real instruction sets): a short
    instruction, an input on about half of them, an output from a few words to ~30 sentences, so
    some rows fill only a tenth of 256 tokens and some are cut at 256."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        instruction = f"{rng.choice(VERBS).capitalize()} " + _sentence(rng)[0].lower() + _sentence(rng)[1:]
        given = rng.random() < 0.5
        inp = _paragraphs(rng, max(1, int(rng.lognormvariate(1.0, 0.9)))) if given else ""
        out = _paragraphs(rng, max(1, min(40, int(rng.lognormvariate(1.3, 1.0)))))
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
    """Per optimizer step: end time, non-pad and label tokens, RSS and VmHWM; the memory window
    opens at `reset()`, just before the model is built."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.labels: list[int] = []
        self.rss: list[int] = []
        self.hwm: list[int] = []
        self.marks: dict[str, dict] = {}
        self.phases: dict[str, list] = {}  # per step: RSS and VmHWM at points inside the step
        self._pending = [0, 0]
        self.rss0 = 0
        self._t0 = time.perf_counter()

    def reset(self) -> None:
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        self.rss0 = _status_bytes("VmRSS")
        self._t0 = time.perf_counter()

    def mark(self, name: str) -> None:
        self.marks[name] = {"rss": _status_bytes("VmRSS") - self.rss0, "hwm": _status_bytes("VmHWM") - self.rss0}

    def phase(self, name: str) -> None:
        """RSS, VmHWM and seconds since the previous step ended, at a point inside the step."""
        since = time.perf_counter() - (self.times[-1] if self.times else self._t0)
        self.phases.setdefault(name, []).append(
            [_status_bytes("VmRSS") - self.rss0, _status_bytes("VmHWM") - self.rss0, round(since, 3)])

    def batch(self, nonpad: int, labels: int) -> None:
        self._pending[0] += int(nonpad)
        self._pending[1] += int(labels)

    def step(self) -> None:
        self.times.append(time.perf_counter())
        self.tokens.append(self._pending[0])
        self.labels.append(self._pending[1])
        self._pending = [0, 0]
        self.rss.append(_status_bytes("VmRSS") - self.rss0)
        self.hwm.append(_status_bytes("VmHWM") - self.rss0)

    def result(self) -> dict:
        span = self.times[-1] - self.times[0]
        return {
            "steps": len(self.times),
            "tokens_per_s": sum(self.tokens[1:]) / span if span > 0 else None,
            "step_s": span / max(1, len(self.times) - 1),
            "peak_bytes": self.hwm[-1],
            "tokens_per_step": statistics.mean(self.tokens),
            "labels_per_step": statistics.mean(self.labels),
            "tokens": self.tokens, "labels": self.labels, "rss": self.rss, "hwm": self.hwm,
            "marks": self.marks, "phases": self.phases, "rss_at_reset": self.rss0,
        }


def _label_count(labels) -> int:
    return int((labels[:, 1:] != -100).sum())


# -- the tools (each in its own child process) -----------------------------------------------------


def _fulltune_overrides(data_path: Path, steps: int, seed: int, packing: bool) -> list[str]:
    return [
        "data=alpaca", f"data.task.0.path={data_path}", "data.task.0.val_path=null", "data.replay=[]",
        "data.replay_ratio=0", "data.demo_dir=null", f"data.max_length={MAX_LENGTH}", f"data.batch_size={BATCH}",
        f"data.packing={str(packing).lower()}", "~experiment", "precision=fp32", f"optimizer.lr={LR}",
        f"optimizer.weight_decay={WEIGHT_DECAY}", "scheduler=cosine", f"scheduler.warmup_ratio={WARMUP}",
        f"trainer.max_steps={steps}", "trainer.accelerator=cpu", "trainer.devices=1",
        f"trainer.gradient_clip_val={CLIP}", "+trainer.enable_checkpointing=false", "trainer.enable_progress_bar=false",
        "callbacks.model_checkpoint=null", "callbacks.progress_bar=null", "callbacks.early_stopping=null",
        "eval.task=null", "eval.forgetting=null", "export=false", "plan_check=off", f"seed={seed}",
    ]


def _fulltune_cfg(data_path: Path, out_dir: Path, steps: int, seed: int, packing: bool, extra: list[str]):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from fulltune.preflight import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*_fulltune_overrides(data_path, steps, seed, packing), *extra])
    with open_dict(cfg):
        cfg.paths.root_dir = str(REPO)
        cfg.paths.cache_dir = str(REPO / ".cache")
        cfg.paths.log_dir = cfg.paths.output_dir = str(out_dir)
    return cfg


_LOG = StepLog()


def fulltune_step_log(free_grads: bool = False):
    """The Lightning callback fulltune runs with (a `callbacks.*` node): opens the memory window in
    `setup`, which Lightning calls right before `configure_model` builds the model. `free_grads`
    (a diagnosis) drops the gradients after each optimizer step, as the HF Trainer and the loop do;
    Lightning itself zeroes them only after the next forward, before its backward."""
    import lightning as L

    class Hook(L.Callback):
        def setup(self, trainer, pl_module, stage):
            _LOG.reset()

        def on_train_start(self, trainer, pl_module):
            _LOG.mark("model+optimizer built")

        def on_before_zero_grad(self, trainer, pl_module, optimizer):
            _LOG.phase("forward done")

        def on_before_backward(self, trainer, pl_module, loss):
            _LOG.phase("grads zeroed")

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            _LOG.phase("backward done")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            nonpad = round(float(batch["nonpad_fraction"]) * batch["input_ids"].numel())
            _LOG.batch(nonpad, _label_count(batch["labels"]))
            if free_grads:
                pl_module.zero_grad(set_to_none=True)
            _LOG.step()

    return Hook()


def run_fulltune(work: Path, steps: int, seed: int, packing: bool, extra: list[str], free_grads: bool = False) -> dict:
    from omegaconf import open_dict

    from fulltune.train import train

    with tempfile.TemporaryDirectory() as out:
        cfg = _fulltune_cfg(work / "alpaca_varied.jsonl", Path(out), steps, seed, packing, extra)
        with open_dict(cfg):
            cfg.callbacks.bench_steps = {"_target_": "__main__.fulltune_step_log", "free_grads": free_grads}
        train(cfg)
    return _LOG.result()


def _load_model(weights: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32, attn_implementation="sdpa")
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
            nonpad = int(mask.sum()) if mask is not None else inputs["input_ids"].numel()  # padding-free: no pad
            _LOG.batch(nonpad, _label_count(inputs["labels"]))
            return super().training_step(model, inputs, *args, **kwargs)

        def compute_loss(self, *args, **kwargs):
            out = super().compute_loss(*args, **kwargs)
            _LOG.phase("forward done")
            return out

    return Counted


def _hf_args(out: str, steps: int, seed: int) -> dict:
    return dict(output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=LR,
                lr_scheduler_type="cosine", warmup_steps=WARMUP, weight_decay=WEIGHT_DECAY, max_grad_norm=CLIP,
                seed=seed, data_seed=seed, logging_steps=10, report_to="none", save_strategy="no", eval_strategy="no",
                use_cpu=True, dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=True,
                bf16=False, fp16=False, gradient_checkpointing=False)


def run_hf_trainer(work: Path, steps: int, seed: int) -> dict:
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
        args = TrainingArguments(**_hf_args(out, steps, seed), train_sampling_strategy="sequential",
                                 remove_unused_columns=False)
        _LOG.reset()
        model = _load_model(prep["weights"])
        trainer = _counting(Trainer)(model=model, args=args, train_dataset=dataset, data_collator=collator,
                                     callbacks=[_hf_callback()])
        trainer.train()
    return _LOG.result()


def run_trl(work: Path, steps: int, seed: int, defaults: bool = False) -> dict:
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
        settings = {**_hf_args(out, steps, seed), "packing": True, "max_length": MAX_LENGTH,
                    "completion_only_loss": True}
        if defaults:
            settings["gradient_checkpointing"] = True
        args = SFTConfig(**settings)
        _LOG.reset()
        model = _load_model(prep["weights"])
        trainer = _counting(SFTTrainer)(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                        callbacks=[_hf_callback()])
        trainer.train()
    return _LOG.result()


def run_torch_loop(work: Path, steps: int, seed: int) -> dict:
    """The loop everyone writes first: padded batches in fulltune's unpacked order, `model(...).loss`,
    backward, clip, torch AdamW (its CPU default), cosine schedule."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    prep = _prepared(work)
    pad = prep["pad_id"]
    rows = [prep["examples"][i] for i in prep["order"]]
    batches = []
    for b in range(0, steps * BATCH, BATCH):
        chunk = rows[b: b + BATCH]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for k, (i, lab) in enumerate(chunk):
            ids[k, : len(i)], labels[k, : len(i)], mask[k, : len(i)] = torch.tensor(i), torch.tensor(lab), 1
        batches.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    torch.manual_seed(seed)
    _LOG.reset()
    model = _load_model(prep["weights"])
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=LR)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(WARMUP * steps), steps)
    _LOG.mark("model+optimizer built")
    for batch in batches:
        _LOG.batch(int(batch["attention_mask"].sum()), _label_count(batch["labels"]))
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


def prepare(work: Path, steps: int, seed: int, n_rows: int) -> dict:
    """Write the rows and tokenize them once with fulltune's data module (which also fills the token
    cache the fulltune runs then hit): every example's ids and labels, and fulltune's unpacked order."""
    from hydra.utils import instantiate

    from fulltune.data.mixture import MixtureSampler
    from fulltune.models import load_tokenizer, resolve_weights

    data_path = work / "alpaca_varied.jsonl"
    rows = alpaca_rows(n_rows, seed=0)
    for cut in range(len(rows)):  # fulltune spreads rows evenly over ceil(n / 4) batches: keep n a multiple of 4
        write_rows(data_path, rows[: len(rows) - cut])
        cfg = _fulltune_cfg(data_path, work / "prepare", steps, seed, packing=False, extra=[])
        tokenizer = load_tokenizer(cfg.model)
        datamodule = instantiate(cfg.data, tokenizer=tokenizer, seed=cfg.seed)
        datamodule.setup()
        if len(datamodule._builder.stores[0]) % BATCH == 0:
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
             "share_under_64": sum(n < 64 for n in lengths) / len(lengths)}
    prep = {"weights": resolve_weights(cfg.model), "pad_id": datamodule._pad_id(), "examples": examples,
            "order": order, "stats": stats}
    (work / "tokenized.json").write_text(json.dumps(prep))
    return prep["stats"]


def child(args: argparse.Namespace) -> None:
    work = Path(args.work)
    extra = args.fulltune_arg or []
    if args.child == "prepare":
        result = prepare(work, args.steps, args.seed, args.rows)
    elif args.child in ("fulltune-pack", "fulltune-pad", "fulltune-pack-grads-freed"):
        result = run_fulltune(work, args.steps, args.seed, args.child != "fulltune-pad", extra,
                              free_grads=args.child == "fulltune-pack-grads-freed")
    elif args.child == "trl-pack":
        result = run_trl(work, args.steps, args.seed)
    elif args.child == "trl-pack-defaults":
        result = run_trl(work, args.steps, args.seed, defaults=True)
    elif args.child == "hf-trainer":
        result = run_hf_trainer(work, args.steps, args.seed)
    elif args.child == "torch-loop":
        result = run_torch_loop(work, args.steps, args.seed)
    else:
        raise SystemExit(f"unknown tool {args.child}")
    Path(args.result).write_text(json.dumps(result))


# -- the parent: alternate the tools, then the table -----------------------------------------------


def _spawn(args: argparse.Namespace, name: str, result: Path, env_extra: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--work", args.work,
           "--steps", str(args.steps), "--seed", str(args.seed), "--rows", str(args.rows), "--result", str(result)]
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


def table(summary: dict, reference: str) -> str:
    ref = summary.get(reference)
    lines = [f"| tool | tok/s (median) | × {reference} | peak GiB (median) | × {reference} | non-pad tok/step "
             "| label tok/step | runs |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in summary.items():
        tps = s["tokens_per_s"] / ref["tokens_per_s"] if ref else float("nan")
        mem = s["peak_bytes"] / ref["peak_bytes"] if ref else float("nan")
        lines.append(f"| {name} | {s['tokens_per_s']:.0f} | {tps:.2f} | {s['peak_bytes'] / GIB:.2f} | {mem:.2f} "
                     f"| {s['tokens_per_step']:.0f} | {s['labels_per_step']:.0f} | {s['runs']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds: every tool once per round")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"subset of {', '.join(TOOLS + EXTRA_TOOLS)}")
    parser.add_argument("--out", default=str(REPO / "bench/results/peers.json"))
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--rows", type=int, default=2000, help="generated alpaca rows")
    parser.add_argument("--work", default=str(REPO / ".cache/bench/peers"), help="data + tokenized rows")
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
    env_extra = dict(kv.split("=", 1) for kv in args.env or [])
    Path(args.work).mkdir(parents=True, exist_ok=True)
    results = Path(tempfile.mkdtemp(prefix="peers-"))
    print("load average:", os.getloadavg(), flush=True)
    data = _spawn(args, "prepare", results / "prepare.json", env_extra)
    print("data:", {k: v for k, v in data.items() if k != "wall_s"}, flush=True)
    runs = []
    for round_ in range(args.repeats):
        for name in tools:
            load = os.getloadavg()[0]
            run = _spawn(args, name, results / f"{name}-{round_}.json", env_extra)
            run.update(tool=name, round=round_, load_before=load)
            runs.append(run)
            print(f"round {round_} {name}: {run['tokens_per_s']:.0f} tok/s, peak {run['peak_bytes'] / GIB:.2f} GiB, "
                  f"{run['tokens_per_step']:.0f} tok/step, {run['labels_per_step']:.0f} label tok/step, "
                  f"load {load:.2f}, {run['wall_s']} s", flush=True)
    summary = {}
    for name in tools:
        mine = [r for r in runs if r["tool"] == name]
        summary[name] = {key: statistics.median(r[key] for r in mine)
                         for key in ("tokens_per_s", "peak_bytes", "tokens_per_step", "labels_per_step", "step_s")}
        summary[name]["runs"] = len(mine)
    reference = "trl-pack" if "trl-pack" in summary else tools[0]
    print(table(summary, reference))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k not in ("child", "result")},
                               "env": {**CHILD_ENV, **env_extra}, "data": data, "load_average_end": os.getloadavg(),
                               "date": time.strftime("%Y-%m-%d %H:%M"), "summary": summary, "runs": runs}, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
