"""Peak RSS of loading pretrained weights, per process: FSDP2 on 2 CPU ranks, and one process.

    python bench/load_memory.py                        # every case below, one at a time
    python bench/load_memory.py --cases fsdp-fp32 single-bf16

Each case runs in a fresh process with glibc's `MALLOC_MMAP_THRESHOLD_=65536` (freed tensors leave
RSS). After the imports and a meta-device build (so neither counts), every process resets its peak
(`/proc/self/clear_refs`) and reports how far VmHWM rose while loading and reading every weight
once, and what it then holds: private (anonymous) memory, and file pages of the memory-mapped
safetensors (page cache, shared by the processes of one machine until a weight is written).

- `fsdp-<dtype>`: 2 processes (gloo) build the model on the meta device under the precision
  plugin's init context, `fully_shard` each decoder layer then the root (as `FSDP2Strategy.shard`),
  and fill it with `load_sharded_weights`.
- `single-<dtype>`: `build_model` inside the plugin's `module_init_context` (what Lightning wraps
  around `configure_model` for one device or DDP), then its `convert_module` (Lightning's cast).

Results: docs/benchmarks.md ("Loading weights").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = ("fsdp-fp32", "fsdp-bf16", "single-fp32", "single-bf16")
PRECISION = {"fp32": "32-true", "bf16": "bf16-true"}


def _status_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _reset_peak() -> int:
    """Reset VmHWM to the current RSS and return it (kB)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def _spec(model: str, cache_dir: str):
    from hydra import compose, initialize_config_dir

    from fulltune.preflight import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[f"model={model}", f"paths.cache_dir={cache_dir}"]).model


def _plugin(dtype: str):
    from lightning.pytorch.plugins.precision import HalfPrecision, Precision

    return Precision() if dtype == "fp32" else HalfPrecision(PRECISION[dtype])


def _measure(load) -> dict:
    """Peak RSS growth while `load()` runs and every weight is read once (what the first forward does:
    transformers may leave fp32 weights as lazy views of the memory-mapped file), what stays held
    privately (anonymous) and as file pages (the shared page cache), and the model's size."""
    import torch
    from torch.distributed.tensor import DTensor

    base, base_anon, base_file = _reset_peak(), _status_kb("RssAnon"), _status_kb("RssFile")
    model = load()
    params = list(model.parameters())
    with torch.no_grad():
        for p in params:
            (p.to_local() if isinstance(p, DTensor) else p).sum()
    return {"peak_growth_mb": (_status_kb("VmHWM") - base) / 1e3, "anon_mb": (_status_kb("RssAnon") - base_anon) / 1e3,
            "file_mb": (_status_kb("RssFile") - base_file) / 1e3, "dtype": str(params[0].dtype).removeprefix("torch."),
            "model_mb": sum(p.numel() * p.element_size() for p in params) / 1e6}


def _fsdp_rank(rank: int, world: int, port: int, model: str, cache_dir: str, dtype: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fulltune.models import build_model, resolve_weights
    from fulltune.strategies import load_sharded_weights

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    spec = _spec(model, cache_dir)
    weights = resolve_weights(spec)
    with _plugin(dtype).module_init_context():
        net = build_model(spec, device="meta")
    layer_classes = set(net._no_split_modules)
    for layer in [m for m in net.modules() if type(m).__name__ in layer_classes]:
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    dist.barrier()

    def load():
        load_sharded_weights(net, weights, torch.device("cpu"))
        return net

    result = _measure(load)
    results = [None] * world
    dist.all_gather_object(results, result)
    if rank == 0:
        print("RESULT " + json.dumps(results), flush=True)
    dist.destroy_process_group()


def _single(model: str, cache_dir: str, dtype: str) -> None:
    from fulltune.models import build_model, resolve_weights

    spec = _spec(model, cache_dir)
    resolve_weights(spec)  # a first run converts the GGUF here, outside the measurement
    build_model(spec, device="meta")  # imports the modeling code outside the measurement
    plugin = _plugin(dtype)

    def load():
        with plugin.module_init_context():
            return plugin.convert_module(build_model(spec))

    print("RESULT " + json.dumps([_measure(load)]), flush=True)


def _child(case: str, model: str, cache_dir: str) -> None:
    kind, dtype = case.split("-")
    if kind == "single":
        return _single(model, cache_dir, dtype)
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp_rank, args=(2, port, model, cache_dir, dtype), nprocs=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--cache-dir", default=os.environ.get("FULLTUNE_CACHE", str(REPO / ".cache")))
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args.child, args.model, args.cache_dir)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    print("| case | rank | loaded as | model (MB) | peak RSS growth (MB) | then held: private | file pages |\n"
          "|---|---:|---|---:|---:|---:|---:|")
    for case in args.cases:
        out = subprocess.run([sys.executable, __file__, "--child", case, "--model", args.model,
                              "--cache-dir", args.cache_dir], env=env, capture_output=True, text=True, check=True)
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
        for rank, r in enumerate(json.loads(line.removeprefix("RESULT "))):
            print(f"| {case} | {rank} | {r['dtype']} | {r['model_mb']:.0f} | {r['peak_growth_mb']:.0f} "
                  f"| {r['anon_mb']:.0f} | {r['file_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
