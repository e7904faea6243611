"""Build a Lightning strategy from a `conf/strategy/*.yaml` node: DDP, FSDP2 or DeepSpeed ZeRO.

Every strategy runs on CPU too (gloo, 2 processes in the tests) so each one is proven equal to DDP
without a GPU. Settings the Trainer already knows (precision, accumulation, clipping) are never
repeated here: Lightning derives them from the one Hydra config.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy
from torch import nn

from fulltune.preflight import ConfigError

FAMILIES = ("auto", "ddp", "fsdp", "deepspeed")


def build_strategy(name: str, **options: Any) -> str | DDPStrategy | ModelParallelStrategy | LightningDeepSpeedStrategy:
    """The strategy for `name` = `<family>[_variant]` (e.g. `deepspeed_zero3_offload`); `options` are
    the family's keyword arguments from the YAML file."""
    family = name.split("_", 1)[0]
    if family == "auto":
        return "auto"
    if family == "ddp":
        return DDPStrategy(**options)
    if family == "fsdp":
        return FSDP2Strategy(**options)
    if family == "deepspeed":
        return DeepSpeedStrategy(**options)
    raise ValueError(f"strategy={name!r} is not known; the name must start with one of: {', '.join(FAMILIES)}")


# -- FSDP2 ------------------------------------------------------------------------------------------


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (`torch.distributed.fsdp.fully_shard`) over all devices of all nodes.

    Lightning's FSDPStrategy is FSDP1 and refuses CPU; FSDP2 through ModelParallelStrategy runs on CPU
    and GPU alike. `CausalLMModule.configure_model` builds the model and calls `shard` (one FSDP unit
    per decoder layer, then the root). Checkpoints are sharded DCP directories: no rank gathers the
    model to save or resume.
    """

    def __init__(self, cpu_offload: bool = False, reshard_after_forward: bool = True, **options: Any) -> None:
        super().__init__(tensor_parallel_size=1, **options)
        self.cpu_offload = cpu_offload
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # pure data parallel: one 1-D mesh
        super().setup_environment()

    def shard(self, model: nn.Module) -> nn.Module:
        """`fully_shard` each decoder layer (the classes in HF's `_no_split_modules`), then the root.

        Unwrapped, the whole model is one unit and every rank gathers all of it (~3x the memory,
        pytorch-lightning #19721), so a model without `_no_split_modules` is an error.
        """
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        layer_classes = set(getattr(model, "_no_split_modules", None) or ())
        layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
        if not layers:
            raise ConfigError(
                f"strategy=fsdp: {type(model).__name__} names no decoder-layer class in `_no_split_modules`; "
                "FSDP needs one unit per layer. Use strategy=ddp or a deepspeed_zero* strategy for this model."
            )
        kwargs: dict[str, Any] = {"mesh": self.device_mesh["data_parallel"],
                                  "reshard_after_forward": self.reshard_after_forward}
        if self.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
        if self.precision_plugin.precision == "bf16-mixed":  # compute in bf16; fp32 shards, fp32 gradient reduction
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        return model


def load_sharded_weights(model: nn.Module, weights_dir: str | Path, device: torch.device) -> None:
    """Fill a sharded model that was built on the meta device from an HF safetensors directory.

    Each rank reads (memory-mapped, one tensor at a time) only its own rows of every tensor FSDP2
    shards on dim 0 and copies them, cast to the model's dtype, straight into its shard of the
    parameter (what `load_state_dict` would do, without first collecting a second copy of the
    shards): beyond its shards a rank holds one slice at a time, never a full tensor, let alone
    the full model. An architecture whose stored tensors are not its parameters (transformers
    converts them on load: MoE experts stored one per expert, fused in memory) is loaded by
    transformers' own `from_pretrained` on rank 0, on CPU, and broadcast shard by shard: that
    rank's host memory holds the whole model once. Non-persistent buffers (RoPE frequencies,
    Gemma's embedding scale) are recomputed with the model's own `_init_weights`, which leaves the
    loaded parameters alone.
    """
    model.to_empty(device=device)
    if weight_conversions(model):
        _load_on_rank0_and_broadcast(model, Path(weights_dir))
    else:
        _load_own_rows(model, Path(weights_dir))
    with torch.no_grad():
        for param in model.parameters():  # transformers' init functions skip what is flagged: loaded weights
            param._is_hf_initialized = True  # stay as loaded where a module also holds a buffer (Gemma's embed_scale)
        persistent = set(model.state_dict())
        for module_name, module in model.named_modules():
            if any(f"{module_name}.{b}".lstrip(".") not in persistent for b, _ in module.named_buffers(recurse=False)):
                model._init_weights(module)


def weight_conversions(model: nn.Module) -> list:
    """The conversions transformers applies between a model's stored tensors and its parameters
    (`from_pretrained` forward, `save_pretrained` in reverse); empty for most dense models."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    return [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]


def _load_own_rows(model: nn.Module, weights_dir: Path) -> None:
    from safetensors import safe_open

    files = _safetensors_index(weights_dir)
    expected = model.state_dict()  # detached views of the parameters and buffers: copying into them loads them
    tied = set(getattr(model, "all_tied_weights_keys", None) or ())
    if not_loaded := sorted(expected.keys() - files.keys() - tied):
        raise ValueError(f"{weights_dir}: no weights for {not_loaded[:5]}{' ...' if len(not_loaded) > 5 else ''}")
    with torch.no_grad():
        for name in [n for n in expected if n in files]:
            with safe_open(files[name], framework="pt") as f:  # unmapped after each tensor: its pages leave RSS
                _copy_stored(f, name, expected[name])


def _load_on_rank0_and_broadcast(model: nn.Module, weights_dir: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoModelForCausalLM

    full = {}
    if torch.distributed.get_rank() == 0:
        dtype = next(iter(model.parameters())).dtype
        full = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=dtype, device_map="cpu").state_dict()
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def shard_rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """The rows [lo, hi) of a dim 0 of size `n` that `rank` of `world` holds under `Shard(0)`.

    DTensor and FSDP2 split like `torch.chunk`: ceil(n / world) rows per rank, so the last ranks
    may hold fewer rows, or none.
    """
    chunk = -(-n // world)
    lo = min(rank * chunk, n)
    return lo, min(lo + chunk, n)


def _copy_stored(f: Any, name: str, target: torch.Tensor) -> None:
    """Copy tensor `name` of an open safetensors file into `target`, cast to its dtype and device.

    A DTensor sharded on dim 0 of a 1-D mesh (FSDP2's placement) reads only this rank's rows; any
    other placement, or a plain tensor, is read whole.
    """
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    stored = f.get_slice(name)
    if list(stored.get_shape()) != list(target.shape):
        raise ValueError(f"{name}: the weights are {stored.get_shape()}, the model expects {list(target.shape)}")
    if not isinstance(target, DTensor):
        target.copy_(f.get_tensor(name))
        return
    mesh, placements = target.device_mesh, target.placements
    if mesh.ndim != 1 or placements != (Shard(0),):
        target.copy_(distribute_tensor(f.get_tensor(name), mesh, placements, src_data_rank=None))
        return
    lo, hi = shard_rows(target.shape[0], mesh.size(), mesh.get_local_rank())
    shard = target.to_local()
    if shard.shape[0] != hi - lo:  # copy_ would broadcast a 1-row slice silently
        raise RuntimeError(f"{name}: this rank's shard has {shard.shape[0]} rows, torch.chunk's split gives {hi - lo}")
    shard.copy_(stored[lo:hi])


def _safetensors_index(weights_dir: Path) -> dict[str, str]:
    """Tensor name -> file, for a single `model.safetensors` or a sharded one with its index."""
    import json

    index = weights_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: str(weights_dir / file) for name, file in weight_map.items()}
    single = weights_dir / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{weights_dir}: no model.safetensors(.index.json); sharded loading needs safetensors")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), str(single))


# -- DeepSpeed ----------------------------------------------------------------------------------------


def deepspeed_config(
    stage: int, offload_optimizer: bool = False, offload_parameters: bool = False, micro_batch_size: int = 1
) -> dict[str, Any]:
    """The ZeRO part of a DeepSpeed config. Lightning adds the rest from the Trainer when it sets up:
    `gradient_accumulation_steps`, `gradient_clipping`, and the `bf16`/`fp16` sections (fp16 with
    dynamic loss scaling), so nothing can disagree with the Hydra config."""
    if offload_parameters and stage != 3:
        raise ConfigError(f"strategy: offload_parameters needs ZeRO stage 3 (got stage {stage}); "
                          "use strategy=deepspeed_zero3_offload")
    pin = torch.cuda.is_available()
    zero: dict[str, Any] = {"stage": stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return {
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # the optimizer comes from conf/optimizer (torch AdamW)
        "train_micro_batch_size_per_gpu": micro_batch_size,
    }


class DeepSpeedStrategy(LightningDeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy with three changes.

    - It also runs on CPU (DeepSpeed's CPU accelerator, gloo): Lightning refuses any accelerator but
      CUDA and passes a CUDA device index to `deepspeed.initialize`. On GPUs the stock code runs.
    - Gradient accumulation is scaled once: Lightning already divides each micro-batch loss by
      `accumulate_grad_batches`, so the engine must not divide by it again.
    - ZeRO-3 models are built by transformers' own `zero.Init` path (`HfDeepSpeedConfig`): weights
      are created partitioned and loaded per partition, and HF's weight init runs on gathered
      parameters (inside a bare `zero.Init`, it would silently skip the partitioned ones).
    """

    def __init__(
        self, stage: int = 2, offload_optimizer: bool = False, offload_parameters: bool = False,
        micro_batch_size: int = 1, **options: Any,
    ) -> None:
        super().__init__(config=deepspeed_config(stage, offload_optimizer, offload_parameters, micro_batch_size),
                         **options)
        self.offload_optimizer = offload_optimizer
        self._hf_zero3 = None

    @property
    def _on_cpu(self) -> bool:
        return self.root_device.type == "cpu"

    def setup_environment(self) -> None:
        if not self._on_cpu:
            return super().setup_environment()
        DDPStrategy.setup_environment(self)  # skips only Lightning's CUDA check

    def setup_distributed(self) -> None:
        if not self._on_cpu:
            return super().setup_distributed()
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()  # Lightning's version also checks CUDA device indices, which CPUs have none of
        self.set_world_ranks()
        _without_shared_memory_allreduce()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model: nn.Module, optimizer: Any, lr_scheduler: Any = None) -> tuple:
        if not self._on_cpu:
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad], optimizer=optimizer,
            lr_scheduler=lr_scheduler, dist_init_required=False,
        )
        return engine, ds_optimizer

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().backward(closure_loss, optimizer, *args, scale_wrt_gas=False, **kwargs)

    @contextmanager
    def model_sharded_context(self) -> Iterator[None]:
        if not self.zero_stage_3:
            yield
            return
        from transformers.integrations import HfDeepSpeedConfig

        self._init_config_if_needed()
        self._hf_zero3 = HfDeepSpeedConfig(self.config)  # transformers keeps a weak reference: hold it
        yield

    def teardown(self) -> None:
        super().teardown()
        self._hf_zero3 = None
        if self.zero_stage_3:
            _restart_zero3_ids()


def destroy_process_group() -> None:
    """End this process's distributed state, if any, so a next job (a multirun's) starts afresh:
    through DeepSpeed where it set the group up, which also drops the process groups it caches."""
    deepspeed_comm = sys.modules.get("deepspeed.comm")
    if deepspeed_comm is not None and deepspeed_comm.is_initialized():
        deepspeed_comm.destroy_process_group()
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _restart_zero3_ids() -> None:
    """ZeRO-3 numbers modules and parameters from process-wide counters, and its ranks check that
    their numbers agree. In a Hydra multirun rank 0 runs every job in one process while the other
    ranks start afresh: without a restart, the second job's first forward fails with "Detected a
    disagreement on list contents between rank0 and rank1"."""
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from deepspeed.runtime.zero.partition_parameters import Init

    DeepSpeedZeRoOffload._register_deepspeed_module.__defaults__[0][0] = 0  # its `count=[0]`
    Init.param_id = 0


def _without_shared_memory_allreduce() -> None:
    """CPU DeepSpeed reduces over gloo alone. Its shared-memory allreduce (a CPU-only speed-up,
    JIT-compiled on first use) keeps its state in a C++ static set once per process: in a Hydra
    multirun, rank 0 (the process that runs every job) would keep the first job's shared memory
    while the next job's fresh ranks open their own, and each side would wait for the other forever.
    Every rank runs this, so they agree."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def optimizer_for(strategy: Any, factory: functools.partial) -> functools.partial:
    """The optimizer factory a strategy can step. ZeRO-Offload steps on CPU and accepts only
    DeepSpeed's `DeepSpeedCPUAdam` there, so torch's Adam/AdamW become it, same hyper-parameters."""
    if not (isinstance(strategy, DeepSpeedStrategy) and strategy.offload_optimizer):
        return factory
    if factory.func not in (torch.optim.AdamW, torch.optim.Adam):
        raise ConfigError(f"DeepSpeed optimizer offload needs Adam/AdamW (it steps DeepSpeedCPUAdam); "
                          f"optimizer is {factory.func.__name__}. Use optimizer=adamw or a strategy without offload.")
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    shared = {k: v for k, v in factory.keywords.items() if k in ("lr", "betas", "eps", "weight_decay", "amsgrad")}
    return functools.partial(DeepSpeedCPUAdam, adamw_mode=factory.func is torch.optim.AdamW, **shared)
