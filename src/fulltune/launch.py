"""What a run settles before anything heavy loads: its devices, its precision, and whether its
memory plan fits the devices it will use (the gate: `plan_check: stop | warn | off`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, open_dict

from fulltune.preflight import ConfigError

if TYPE_CHECKING:
    from fulltune.memory import MemoryPlan

log = logging.getLogger(__name__)
PLAN_CHECKS = ("stop", "warn", "off")


def _cuda(trainer: DictConfig) -> bool:
    import torch

    return trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def return_freed_memory(trainer: DictConfig, threshold: int = 64 * 1024) -> bool:
    """On CPU, let freed tensors leave the process, as `MALLOC_MMAP_THRESHOLD_=65536` would, set here so
    that users need no environment variable: glibc then serves every block of `threshold` bytes and up
    with its own mmap, returned to the system when freed. By default glibc raises that threshold to the
    largest block freed so far (up to 32 MiB), so a step's tensors come from the heap and the heap keeps
    the size of the step's peak plus whatever fragments it: more RSS than the live tensors ever need.
    True when set (glibc on a CPU run)."""
    import ctypes

    if _cuda(trainer):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # not glibc
        return False


def device_count(trainer: DictConfig) -> int:
    """Processes per node: `devices: auto` (or -1) is every visible GPU, one process on CPU."""
    import torch

    devices = trainer.devices
    if isinstance(devices, str) and devices not in ("auto", "-1"):
        devices = [d for d in devices.split(",") if d.strip()] if "," in devices else int(devices)
    if devices in ("auto", "-1", -1):
        return torch.cuda.device_count() if _cuda(trainer) else 1
    return len(devices) if not isinstance(devices, int) else devices


def auto_precision(trainer: DictConfig, strategy: str, plan_for: str | None = None) -> tuple[str, bool]:
    """(Lightning precision, TF32) for this hardware, or for the catalogue GPU `plan_for` (dry runs):
    bf16-mixed + TF32 on sm80+, fp16-mixed on older GPUs (fp32 under FSDP: no fp16 loss scaling
    there), fp32 on CPU. Capability, not `is_bf16_supported`, which also says yes on GPUs that only
    emulate bf16 (T4, V100)."""
    import torch

    from fulltune.memory import PRE_AMPERE

    if plan_for is None and not _cuda(trainer):
        return "32-true", False
    major = (7 if plan_for in PRE_AMPERE else 8) if plan_for else torch.cuda.get_device_capability()[0]
    if major >= 8:
        return "bf16-mixed", True
    return ("32-true" if strategy.startswith("fsdp") else "16-mixed"), False


def resolve_hardware(cfg: DictConfig) -> None:
    """Write the run's device count and precision into `cfg` (so config.yaml, the ranks Lightning
    starts and summary.json all see the same choice) and say what `auto` chose."""
    import torch

    with open_dict(cfg):
        requested = cfg.trainer.devices
        cfg.trainer.devices = device_count(cfg.trainer)
        if requested != cfg.trainer.devices:
            log.info("trainer.devices: %s -> %d", requested, cfg.trainer.devices)
        precision, tf32 = auto_precision(cfg.trainer, cfg.strategy.name, cfg.gpu if cfg.dry_run else None)
        if cfg.precision.value == "auto":
            cfg.precision.value = precision
            log.info("precision: auto -> %s%s%s", precision, " + TF32" if tf32 else "",
                     f" (planned for {cfg.gpu})" if cfg.dry_run else "")
        if cfg.precision.tf32 == "auto":
            cfg.precision.tf32 = tf32 and torch.cuda.is_available()
        clipped = (cfg.trainer.gradient_clip_val or 0) > 0
        if (cfg.precision.value.endswith("-mixed") and clipped and cfg.optimizer.get("fused")
                and not cfg.strategy.name.startswith("deepspeed")):
            # Lightning's mixed-precision plugin refuses to clip gradients for a fused step (it would
            # unscale fp16 gradients inside the step); foreach is torch's CUDA default, and the plan's
            cfg.optimizer.fused, cfg.optimizer.foreach = False, True  # step line follows this choice
            log.info("optimizer: foreach AdamW step (%s with gradient clipping cannot step fused)",
                     cfg.precision.value)


def plan_settings(cfg: DictConfig) -> tuple[Any, dict[str, Any]]:
    """The architecture (meta device, finetune applied) and the plan's settings for this run."""
    from fulltune.finetune import apply_finetune
    from fulltune.loss import takes_label_loss_head
    from fulltune.memory import describe
    from fulltune.models import build_model

    model = build_model(cfg.model, device="meta")
    chunked = takes_label_loss_head(model)  # else the full-logits loss (Cohere's logit scale): tokens x vocab
    arch = describe(apply_finetune(model, cfg.finetune))
    optimizer = cfg.optimizer
    impl = "fused" if optimizer.get("fused") else "foreach" if optimizer.get("foreach") else None
    settings = {
        "precision": cfg.precision.value,
        "strategy": cfg.strategy.name,
        "world_size": device_count(cfg.trainer) * cfg.trainer.num_nodes,
        "micro_batch_size": cfg.data.batch_size,
        "seq_len": cfg.data.max_length,
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "optimizer": optimizer._target_.rsplit(".", 1)[-1].lower(),
        "optimizer_impl": impl,
        "step_in_backward": bool(optimizer.get("step_in_backward")),
        "quantize_base": cfg.finetune.method == "qlora",
        "extra_param_copies": {"EWC": 2, "L2SP": 1}.get(cfg.regularizer.get("_target_", "").rsplit(".", 1)[-1], 0),
        "loss_chunk_tokens": cfg.model.loss_chunk_tokens if chunked else 0,
    }
    return arch, settings


def available_memory(cfg: DictConfig) -> tuple[str, int, str]:
    """(label, usable bytes per process, plan device) of what this node will run on: the least free
    memory of the GPUs it uses, else the machine's available RAM shared by its processes."""
    import torch

    processes = device_count(cfg.trainer)
    if _cuda(cfg.trainer):
        free = min(_cuda_free_bytes(i) for i in range(processes))
        return f"{torch.cuda.get_device_name(0)} (free now)", free, "cuda"
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    available = next((int(line.split()[1]) * 1024 for line in meminfo.splitlines()
                      if line.startswith("MemAvailable:")), None)
    if available is None:  # not Linux: trust the machine's total
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    label = "CPU RAM available" + (f" / {processes} processes" if processes > 1 else "")
    return label, available // processes, "cpu"


def _cuda_free_bytes(index: int) -> int:
    """Free memory of one GPU, from NVML when it is installed (no CUDA context is created on GPUs
    this process will not use), else from `torch.cuda.mem_get_info`."""
    import torch

    try:
        return torch.cuda.get_device_properties(index).total_memory - torch.cuda.device_memory_used(index)
    except (ImportError, ModuleNotFoundError, RuntimeError):
        return torch.cuda.mem_get_info(index)[0]


def check_memory(cfg: DictConfig, planned: tuple[Any, dict[str, Any]] | None = None) -> MemoryPlan | None:
    """The gate before a real launch: the plan against the memory of the devices this run uses.
    `plan_check=stop` ends a run that does not fit, with the plan and what would fit instead,
    before any weights or data load; `warn` prints the same and goes on; `off` skips it. Returns the
    plan it checked (None when skipped: `off`, or not the node's first process). `planned` is
    `plan_settings(cfg)` when the caller already built it."""
    from fulltune.memory import GiB, build_memory_plan, render_plan, suggest_alternatives

    mode = cfg.get("plan_check", "stop")
    if mode not in PLAN_CHECKS:
        raise ConfigError(f"plan_check={mode!r}: use one of {', '.join(PLAN_CHECKS)}")
    if mode == "off" or int(os.environ.get("LOCAL_RANK", "0")) > 0:  # one check per node
        return None
    arch, settings = planned or plan_settings(cfg)
    label, capacity, device = available_memory(cfg)
    settings = dict(settings)
    settings.update(gpu=label, capacity=capacity, device=device)
    plan = build_memory_plan(arch, **settings)
    if plan.fits():
        log.info("memory plan: %.2f GiB per %s of %.1f GiB (%s): fits", plan.total / GiB,
                 "GPU" if device == "cuda" else "process", capacity / GiB, label)
        return plan
    text = render_plan(plan, suggest_alternatives(arch, settings, label))
    if mode == "warn":
        log.warning("the memory plan does not fit; launching anyway (plan_check=warn):\n%s", text)
        return plan
    raise ConfigError(f"this run does not fit in memory, so it was not started:\n{text}\n"
                      "Pick one of the alternatives, or set plan_check=warn to launch anyway.")


def dry_run(cfg: DictConfig) -> None:
    """Build the architecture on the meta device and print the memory plan for `cfg.gpu`; no
    weights, no data."""
    from fulltune.memory import build_memory_plan, render_plan, suggest_alternatives

    arch, settings = plan_settings(cfg)
    settings["gpu"] = cfg.gpu
    plan = build_memory_plan(arch, **settings)
    alternatives = () if plan.fits() else suggest_alternatives(arch, settings, cfg.gpu)
    print(f"model={cfg.model.name}: {arch.total:,} parameters, {arch.trainable:,} trainable "
          f"({arch.trainable / arch.total:.2%})")
    print(render_plan(plan, alternatives))
