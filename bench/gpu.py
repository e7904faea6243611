"""GPU checks (issue 10 item 9, issue 12 item 5), one command, under 8 minutes on one H100/H200:

    python bench/gpu.py                       # on a CUDA machine; prints markdown for docs/benchmarks.md
    python bench/gpu.py --device cpu --quick  # the same steps on CPU, to check the script (no memory column)
    python bench/gpu.py --skip-peers          # without the peer table

- memory cases: the plan against `torch.cuda.max_memory_allocated`, and the chunked label-position
  loss against the full-logits loss it replaced, with tokens/s and MFU (`fulltune.telemetry`'s
  model FLOPs against its table of GPU peaks, as every run reports it). Each case runs in a fresh
  process (a clean peak), builds CausalLMModule from conf/model/ with random weights (memory and
  speed do not depend on the values) in its training dtype (bf16-true: bf16 from the start), and
  takes AdamW steps in Lightning's order (forward, zero_grad, backward, step). Planned =
  `build_memory_plan(...)` without its fixed CUDA overhead; measured = peak allocated minus what
  was allocated before the model.
- the Llama-3-8B 48 GB recipe (conf/experiment/llama3_8b_48gb.yaml: bf16 weights, torchao's 8-bit
  AdamW with stochastic rounding, the optimizer step inside backward, checkpointing) on the
  architecture built from config: its peak against the plan (which must stay under 48 GB), tokens/s
  and MFU; its first steps include torchao's compiling, so the median of the later steps is reported.
- jobs: the default job as users run it (auto devices and precision: config.yaml must say
  bf16-mixed + TF32 on sm80+), the same in fp32, and the memory gate against `mem_get_info`
  (`model=llama2_70b model.source=config` must stop in seconds with the plan).
- peers: bench/peers.py's table (fulltune vs TRL SFTTrainer vs HF Trainer vs a plain loop, same rows,
  tokens/s, peak memory, attention, MFU) for Qwen2.5-0.5B (random weights), bf16, packed rows of
  2048, 2 alternating rounds; given what is left of the 8 minutes, it drops the second round
  rather than overrun.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 480  # the whole command, on one H100/H200
RECIPE_48GB = ("experiment=llama3_8b_48gb",)  # bf16 weights, 8-bit AdamW, the step in backward, checkpointing
CASES = [  # (model, precision, gradient checkpointing, micro-batch, seq_len, loss[, recipe overrides])
    ("smollm2_135m", "32-true", False, 4, 1024, "chunked"),
    ("smollm2_135m", "bf16-mixed", False, 4, 1024, "chunked"),
    ("smollm2_135m", "bf16-mixed", False, 4, 1024, "full"),
    ("smollm2_135m", "bf16-true", False, 4, 1024, "chunked"),
    ("qwen2_5_0_5b", "bf16-mixed", True, 4, 2048, "chunked"),
    ("qwen2_5_0_5b", "bf16-mixed", True, 4, 2048, "full"),
    ("qwen2_5_0_5b", "bf16-true", True, 8, 2048, "chunked"),
    ("qwen2_5_0_5b", "32-true", False, 2, 2048, "chunked"),
    # Llama-3-8B full FT planned onto one 48 GB GPU (conf/experiment/llama3_8b_48gb.yaml), its own optimizer
    ("llama3_8b", "bf16-true", True, 4, 2048, "chunked", RECIPE_48GB),
]
JOBS = {  # the default job as users run it (auto precision), in fp32, and the memory gate
    "default (auto)": [],
    "default, fp32": ["precision=fp32"],
    "gate: llama2_70b": ["model=llama2_70b", "model.source=config"],
}
# Qwen2.5-0.5B does ~3 GFLOP a token here (6·N of its layers, attention, the head on labels): ~1.3e5
# tokens/s at 40% MFU, so a packed step of 8 × 2048 takes ~0.13 s and 30 steps ~4 s; each of the 8
# runs (4 tools × 2 rounds, each a fresh process) is mostly start-up and model load, ~25 s.
PEER_TOOLS = ["--tools", "fulltune-pack,trl-pack,hf-trainer,torch-loop,fulltune-pack-varlen"]  # varlen: flash only
PEERS = ["--model", "qwen2_5_0_5b", "--precision", "bf16", "--max-length", "2048", "--batch", "8",
         "--steps", "30", "--repeats", "2", *PEER_TOOLS]
QUICK_PEERS = ["--model", "tiny", "--max-length", "256", "--steps", "3", "--repeats", "1", *PEER_TOOLS]


def measure(model: str, precision: str, checkpointing: bool, batch: int, seq_len: int, loss: str,
            recipe: tuple[str, ...] = (), device: str = "cuda", steps: int = 6) -> dict:
    """One case. Without `recipe`: plain torch AdamW steps. With it (an experiment's overrides): the
    optimizer the run would build (low-bit states, stochastic rounding, the step in backward)."""
    import torch
    from hydra import compose, initialize_config_dir

    from fulltune.launch import plan_settings
    from fulltune.memory import build_memory_plan
    from fulltune.module import CausalLMModule
    from fulltune.optim import optimizer_for_precision, optimizer_keywords, param_groups
    from fulltune.telemetry import model_flops, peak_tflops

    torch.manual_seed(0)
    overrides = [*recipe, f"model={model}", "model.source=config", f"model.gradient_checkpointing={checkpointing}",
                 f"data.batch_size={batch}", f"data.max_length={seq_len}", "trainer.devices=1",
                 f"model.loss_chunk_tokens={1024 if loss == 'chunked' else 0}"]  # 0: the full-logits loss
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    cfg.precision.value = precision
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    base = torch.cuda.memory_allocated() if cuda else 0
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # what Lightning's precision plugin does around configure_model
    with torch.device(device):
        module = CausalLMModule(model=cfg.model, optimizer=None)
        module.configure_model()
    torch.set_default_dtype(default_dtype)
    net = module.model.to(device).train()
    assert next(net.parameters()).dtype == dtype
    if recipe:
        factory = optimizer_for_precision(cfg.optimizer, precision, "auto")
        decay = optimizer_keywords(factory).get("weight_decay", 0.0)
        optimizer = factory(param_groups(net.parameters(), decay))
    else:
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5)
    ids = torch.randint(0, cfg.model.config.vocab_size, (batch, seq_len), device=device)
    batch_ = {"input_ids": ids, "labels": ids}

    def forward_backward() -> torch.Tensor:  # the step in backward steps inside it
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss_sum = module.token_loss_sum(batch_)[0]
        loss_sum.backward()
        return loss_sum

    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        optimizer.step(forward_backward)
        sync()
        times.append(time.perf_counter() - start)
    arch, settings = plan_settings(cfg)
    plan = build_memory_plan(arch, **{**settings, "device": device})
    step_s = statistics.median(times[2:] or times)
    tokens_per_s = batch * seq_len / step_s
    flops = model_flops(arch, batch * seq_len, batch * (seq_len - 1), batch * seq_len**2, label_head=loss == "chunked")
    peak = peak_tflops(torch.cuda.get_device_name()) if cuda else None
    return {
        "model": model, "precision": precision, "checkpointing": checkpointing, "batch": batch, "seq_len": seq_len,
        "loss": loss + "".join(f", {o}" for o in recipe),
        "planned_bytes": plan.total - plan.overhead,
        "measured_bytes": torch.cuda.max_memory_allocated() - base if cuda else None,
        "step_s": step_s, "tokens_per_s": tokens_per_s,
        "mfu": flops / step_s / (peak * 1e12) if peak else None,
    }


def run_case(case: tuple, device: str, steps: int) -> dict:
    """One case in a fresh interpreter, so its peak is its own; an OOM is a row, not the end."""
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import gpu, json; " \
           f"print(json.dumps(gpu.measure(*{case[:6]!r}, {(case[6] if len(case) > 6 else ())!r}, {device!r}, {steps})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        error = "OOM" if "OutOfMemoryError" in out.stderr else out.stderr.strip().splitlines()[-1]
        return dict(zip(("model", "precision", "checkpointing", "batch", "seq_len", "loss"), case, strict=False),
                    error=error)
    return json.loads(out.stdout.splitlines()[-1])


def run_job(name: str, overrides: list[str], extra: list[str]) -> dict:
    """`python train.py` as a user runs it; wall time includes start-up, data and the before/after evals.
    A job that the memory gate stops is a row with the gate's verdict line."""
    run_name = "gpu_bench_" + "".join(c if c.isalnum() else "_" for c in name)
    start = time.time()
    out = subprocess.run([sys.executable, "train.py", f"run_name={run_name}", *extra, *overrides],
                         capture_output=True, text=True, cwd=ROOT)
    wall = time.time() - start
    if out.returncode:
        gate = [line.strip() for line in out.stderr.splitlines() if "usable)" in line]
        error = gate[0] if gate else out.stderr.strip().splitlines()[-1]
        return {"job": name, "wall_s": round(wall, 1), "error": error}
    run_dir = max(ROOT.glob(f"outputs/runs/*/*_{run_name}"), key=lambda p: p.stat().st_mtime)
    summary = json.loads((run_dir / "summary.json").read_text())
    resolved = (run_dir / "config.yaml").read_text()
    keys = ("task/loss_before", "task/loss_after", "task/accuracy_before", "task/accuracy_after",
            "forgetting/general", "peak_memory_bytes", "memory_plan_bytes", "tokens_per_s", "precision")
    return {"job": name, "wall_s": round(wall, 1), "fit_s": summary["wall_time_s"],
            "tf32": "tf32: true" in resolved, **{k: summary.get(k) for k in keys}}


def run_peers(device: str, quick: bool, budget_s: float) -> dict:
    """bench/peers.py in a subprocess (its children need a process each anyway): its table, summary
    and data. A failure is a row with its last line, not the end of the checks."""
    out = ROOT / "bench" / "results" / "gpu_peers.json"
    cmd = [sys.executable, "bench/peers.py", "--device", device, *(QUICK_PEERS if quick else PEERS),
           "--budget-s", f"{budget_s:.0f}", "--work", str(ROOT / ".cache" / "bench" / "gpu_peers"), "--out", str(out)]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = round(time.time() - start, 1)
    if proc.returncode:
        lines = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}").splitlines()
        return {"command": " ".join(cmd[1:]), "wall_s": wall, "error": " / ".join(lines[-2:])}  # the cause, and who
    result = json.loads(out.read_text())
    return {"command": " ".join(cmd[1:]), "wall_s": wall,
            **{key: result[key] for key in ("setup", "device", "data", "summary", "skipped", "table")}}


def _peers_markdown(peers: dict) -> str:
    head = f"`python {peers['command']}`, {peers['wall_s']} s"
    if "error" in peers:
        return f"{head}: failed: {peers['error']}"
    data = peers["data"]
    notes = [f"weights {data['weights']}", f"packed attention {data['packed_attention']}",
             f"{data['examples']} examples, mean {data['mean_length']:.0f} tokens", *peers["skipped"].values()]
    return f"{head}, {peers['device']}; " + "; ".join(notes) + "\n\n" + peers["table"]


def _cell(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(cases: list[dict], jobs: list[dict], peers: dict | None = None) -> str:
    gib = 2**30
    rows = [
        "| model | precision | ckpt | batch × seq | loss | planned GiB | measured GiB | measured/planned | tokens/s "
        "| MFU |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for c in cases:
        ckpt = "on" if c["checkpointing"] else "off"
        head = f"| {c['model']} | {c['precision']} | {ckpt} | {c['batch']} × {c['seq_len']} | {c['loss']}"
        if "error" in c:
            rows.append(f"{head} | | {c['error']} | | | |")
            continue
        planned, measured = c["planned_bytes"], c["measured_bytes"]
        cells = [planned / gib, measured and measured / gib, measured and measured / planned, c["tokens_per_s"]]
        specs = [".2f", ".2f", ".2f", ",.0f"]
        rows.append(" | ".join([head, *map(_cell, cells, specs), _cell(c["mfu"], ".1%")]) + " |")
    rows += [
        "",
        "| job | precision (tf32) | wall s | fit s | task loss before → after | accuracy before → after "
        "| forgetting | peak GiB | plan GiB |",
        "|---|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for j in jobs:
        if "error" in j:
            rows.append(f"| {j['job']} | | {j['wall_s']} | | {j['error']} | | | | |")
            continue
        plan = j["memory_plan_bytes"]
        rows.append(f"| {j['job']} | {j['precision']} ({j['tf32']}) | {j['wall_s']} | {j['fit_s']} | "
                    f"{j['task/loss_before']:.3f} → {j['task/loss_after']:.3f} | {j['task/accuracy_before']:.1%} → "
                    f"{j['task/accuracy_after']:.1%} | {j['forgetting/general']:+.3f} | "
                    f"{j['peak_memory_bytes'] / gib:.2f} | {_cell(plan and plan / gib, '.2f')} |")
    if peers:
        rows += ["", _peers_markdown(peers)]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="one small case and model=tiny jobs (script check)")
    parser.add_argument("--skip-peers", action="store_true", help="without bench/peers.py's table")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    args = parser.parse_args()
    started = time.time()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or `--device cpu --quick` to check the script")
    cases = [("smollm2_135m", "32-true", False, 1, 128, "chunked"), ("smollm2_135m", "32-true", False, 1, 128, "full"),
             ("tiny", "bf16-true", True, 2, 128, "chunked", RECIPE_48GB)] if args.quick else CASES
    extra = ["model=tiny", "trainer.max_steps=3"] if args.quick else []
    results = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "cases": [run_case(case, args.device, args.steps) for case in cases],
    }
    sections = {"cases": time.time() - started}
    results["jobs"] = [run_job(name, overrides, extra) for name, overrides in JOBS.items()]
    sections["jobs"] = time.time() - started - sum(sections.values())
    if not args.skip_peers:  # what is left of the budget, less a margin for the last table and the JSON
        results["peers"] = run_peers(args.device, args.quick, max(BUDGET_S - (time.time() - started) - 20, 1))
        sections["peers"] = results["peers"]["wall_s"]
    results["seconds"] = {**{k: round(v, 1) for k, v in sections.items()}, "total": round(time.time() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"{results['device']}, torch {results['torch']}, {results['date']}; seconds {results['seconds']} "
          f"(budget {BUDGET_S})\n")
    print(markdown(results["cases"], results["jobs"], results.get("peers")))


if __name__ == "__main__":
    main()
