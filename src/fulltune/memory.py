"""Memory plan: what each device must hold to fine-tune a model, known before any weights load.

Parameters are counted exactly on a meta-device model; bytes per parameter follow from precision,
optimizer and strategy; activations from micro-batch, sequence length and the layer shapes, with
per-layer byte counts measured on HF Llama's saved tensors. `train.py ... dry_run=true` prints
`render_plan(plan, suggest_alternatives(...))`. The accounting and its checks: docs/memory.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from fulltune import finetune

GiB = 2**30

# Usable memory per GPU in GiB: the total torch.cuda reports (the CUDA context comes out of it).
GPUS: dict[str, float] = {
    "A100-40GB": 39.4,
    "A100-80GB": 79.2,
    "H100-80GB": 79.1,
    "H200-141GB": 139.8,
    "L4": 22.0,
    "A10G": 22.0,
    "RTX-4090": 23.6,
    "L40S": 44.4,
    "A6000": 47.5,  # RTX A6000 (Ampere), 48 GB
    "T4": 14.7,
    "V100-32GB": 31.7,
}

PRE_AMPERE = ("T4", "V100-32GB")  # compute capability < 8.0: no native bf16
FP8_GPUS = ("H100-80GB", "H200-141GB", "L4", "L40S", "RTX-4090")  # sm89+: float8 (optimizer=adamw_fp8)

# ZeRO stage each strategy reaches: 1 shards optimizer states and the fp32 master, 2 also gradients,
# 3 also weights (FSDP full shard is ZeRO-3). "_offload" moves every sharded part to CPU RAM.
SHARD_STAGE = {
    "auto": 0,
    "ddp": 0,
    "deepspeed_zero1": 1,
    "deepspeed_zero2": 2,
    "deepspeed_zero2_offload": 2,
    "deepspeed_zero3": 3,
    "deepspeed_zero3_offload": 3,
    "fsdp": 3,
    "fsdp_offload": 3,
}
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")
PRECISION_ALIASES = {"32": "32-true", "fp32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed"}
# optimizer -> (states per trainable param, fixed bytes per state or None to follow the precision)
OPTIMIZERS: dict[str, tuple[int, float | None]] = {
    "adamw": (2, None),
    "adam": (2, None),
    "sgd": (1, None),  # momentum buffer
    "lion": (1, None),
    "adamw8bit": (2, 1 + 4 / 256),  # torchao: 8-bit codes + one fp32 scale per 256 values, m and v
    "adamw4bit": (2, 0.5 + 4 / 128),  # torchao: 4-bit codes + one fp32 scale per 128 values
    "adamwfp8": (2, 1 + 4 / 256),  # torchao: float8 e4m3 + one fp32 scale per 256 values
}
LOW_BIT = {"adamw8bit": "8-bit", "adamw4bit": "4-bit", "adamwfp8": "fp8"}
# What conf/optimizer/<name>.yaml selects each (the plan names optimizers by their class).
OPTIMIZER_CONFIGS = {"adamw": "adamw", "adamw8bit": "adamw8bit", "adamw4bit": "adamw4bit", "adamwfp8": "adamw_fp8"}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8  # QLoRA: 4-bit codes + double-quantised absmax per 64 weights
CUDA_OVERHEAD = GiB  # CUDA context (~0.5 GiB), cuBLAS workspaces, NCCL buffers; fragmentation not included
# On CPU the plan is held against RAM, where the process itself lives: Python, torch, transformers, Lightning
# and the tokenized data before the model is built (measured 0.47 GiB, bench/memory_plan.py, Qwen2.5-0.5B case).
CPU_PROCESS_OVERHEAD = GiB // 2
# DeepSpeed's reduce_bucket_size in elements (fulltune passes its own ZeRO config, so DeepSpeed's defaults
# hold, not Lightning's 2e8): one contiguous-gradients buffer at every stage (ZeRO-1/2 would double it with
# overlap_comm, off by default there). `torch.empty`: a GPU holds it all, CPU RSS only the pages written:
# ZeRO-2/3 write the gradients into it during backward, ZeRO-1 only when it reduces, after backward.
DEEPSPEED_BUCKET = 500_000_000
# Bytes per token per decoder layer saved around the two RMSNorms: fp32 keeps x, x*rsqrt and the output;
# 16-bit weights keep an fp32 upcast plus 16-bit normalised input and output; autocast keeps x and
# x*rsqrt in fp32 and casts the input of q, k, v, gate, up to 16 bit separately (5 x 2 B).
NORM_BYTES = {"fp32": 24, "16-bit": 16, "autocast": 26}
FINAL_NORM_BYTES = {"fp32": 12, "16-bit": 8, "autocast": 10}
# The chunked label-position loss (fulltune.loss): per logit of one chunk, the fp32 logits turned into
# their softmax gradient in place, plus a 16-bit copy for the gradient matmuls in 16-bit modes; per
# label token, the gathered hidden state and its gradient.
CHUNK_LOGIT_BYTES = {"fp32": 4, "16-bit": 8, "autocast": 8}
HEAD_HIDDEN_BYTES = {"fp32": 8, "16-bit": 4, "autocast": 8}
FULL_LOGITS_BYTES = 12  # per logit of the full-logits loss: fp32 log-probs + their grad + the logits' grad
DEFAULT_LOSS_CHUNK = 1024
OPTIMIZER_IMPLS = ("fused", "foreach", "for-loop")  # torch's AdamW: foreach by default on CUDA, for-loop on CPU
# torchao's low-bit AdamW steps one parameter at a time (a compiled kernel per shape): both moments
# dequantized to fp32 (4 + 4 B) for the largest tensor; measured on CPU (fp32 and bf16 weights) at
# 8.02 B per value of a 32M-value tensor, peak RSS over one step.
LOW_BIT_STEP_BYTES = 8


@dataclass(frozen=True)
class Arch:
    """What a plan needs from a model: exact parameter counts and its layer shapes."""

    name: str
    total: int
    trainable: int
    linear: int  # nn.Linear params: autocast keeps a 16-bit copy of each for backward
    layer_linear: int  # nn.Linear params inside decoder layers: what QLoRA quantizes
    layer: int  # params of one decoder layer: the FSDP / ZeRO-3 shard unit
    largest: int  # params of the largest single tensor: what a for-loop optimizer step holds a temporary of
    lora_width: int  # sum of in + out features of the LoRA target projections
    layers: int
    hidden: int
    heads: int
    q_dim: int
    kv_dim: int
    intermediate: int
    vocab: int
    eager: bool  # eager attention materialises the softmax (a·s² per layer); SDPA/flash does not
    largest_mid_backward: int = 0  # the largest whose gradient completes while activations are live (a layer's,
    # an untied head's); the input embedding's completes last, after them (0: take `largest`)
    head_trainable: bool = True  # the output layer's weight is trained: the chunked loss computes its gradient


@dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of one training setup; `total` is what the GPU must hold at the peak."""

    model: str
    total_params: int
    trainable_params: int
    method: str
    precision: str
    strategy: str
    world_size: int
    micro_batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    optimizer: str
    accounting: str
    weights: int
    compute_copies: int
    gradients: int
    master_weights: int
    optimizer_states: int
    regularizer: int
    buffers: int
    activations: int
    logits: int
    optimizer_step: int  # the step's transient memory beyond the activations it follows (freed by then)
    head_gradient: int  # the chunked loss computes the head's gradient in forward, beside last step's gradients
    overhead: int
    cpu_ram: int  # per process, for offloaded shards
    gpu: str | None = None  # what the plan is held against: a catalogue GPU, or a label for `capacity`
    capacity: int | None = None  # usable bytes per device (a catalogue GPU's, or measured free memory)
    device: str = "cuda"  # cpu: the plan is held against RAM, where offloaded shards live too
    step_in_backward: bool = False
    notes: dict[str, str] = field(default_factory=dict, compare=False)

    LINES = (
        ("weights", "weights"),
        ("compute_copies", "16-bit compute copies"),
        ("gradients", "gradients"),
        ("master_weights", "fp32 master weights"),
        ("optimizer_states", "optimizer states"),
        ("regularizer", "regularizer copies"),
        ("buffers", "communication buffers"),
        ("activations", "activations"),
        ("logits", "final norm + logits/loss"),
        ("optimizer_step", "optimizer step transient"),
        ("head_gradient", "head's gradient, in forward"),
        ("overhead", "CUDA context + workspaces"),
    )

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name, _ in self.LINES)

    def fits(self, gpu: str | None = None) -> bool:
        """Whether the peak fits in `gpu`'s memory (default: what the plan was made for)."""
        offloaded = self.cpu_ram if self.device == "cpu" else 0
        return self.total + offloaded <= (gpu_bytes(gpu) if gpu else self.capacity)


def gpu_bytes(name: str | None) -> int:
    """Usable bytes of a catalogue GPU; names match ignoring case, spaces, '-' and '_'."""
    key = _squash(name or "")
    for gpu, gib in GPUS.items():
        if _squash(gpu) == key:
            return int(gib * GiB)
    raise ValueError(f"unknown gpu {name!r}; known: {', '.join(GPUS)}")


def _squash(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


def _as_module(model: Any) -> nn.Module:
    """The model itself, or its architecture built on the meta device from a config (no weights)."""
    if isinstance(model, nn.Module):
        return model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model)


def count_params(model: Any) -> tuple[int, int]:
    """(total, trainable) parameters, exact; meta tensors have sizes, so 7B costs no memory."""
    return finetune.count_params(_as_module(model))


def lora_param_count(model: Any, rank: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """Trainable params LoRA adds: rank·(in + out) per targeted nn.Linear, as peft counts them."""
    return rank * _lora_width(_as_module(model), targets)


def _lora_width(module: nn.Module, targets: tuple[str, ...]) -> int:
    return sum(
        m.in_features + m.out_features
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )


def describe(model: Any) -> Arch:
    """Count what the plan needs once; pass the result wherever a model is accepted."""
    if isinstance(model, Arch):
        return model
    module = _as_module(model)
    cfg = module.config
    block_types = set(getattr(module, "_no_split_modules", None) or ())
    blocks = [m for m in module.modules() if type(m).__name__ in block_types]
    if not blocks:
        raise ValueError(f"{type(module).__name__}: no decoder layers found (_no_split_modules is empty)")
    total, trainable = count_params(module)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    experts, active = _expert_params(module), _active_expert_fraction(cfg)
    return Arch(
        name=type(module).__name__,
        total=total,
        trainable=trainable,
        linear=_linear_params(module) + experts,
        layer_linear=sum(_linear_params(b) for b in blocks) + round(experts * active),  # FLOPs: the active experts
        layer=max(sum(p.numel() for p in b.parameters()) for b in blocks),
        largest=max(p.numel() for p in module.parameters()),
        largest_mid_backward=_largest_mid_backward(module, blocks),
        lora_width=_lora_width(module, LORA_TARGETS),
        layers=len(blocks),
        hidden=cfg.hidden_size,
        heads=heads,
        q_dim=heads * head_dim,
        kv_dim=kv_heads * head_dim,
        intermediate=_mlp_width(cfg),
        vocab=cfg.vocab_size,
        eager=getattr(cfg, "_attn_implementation", "sdpa") == "eager",
        head_trainable=_head_trainable(module),
    )


def _largest_mid_backward(module: nn.Module, blocks: list[nn.Module]) -> int:
    head, embedding = module.get_output_embeddings(), module.get_input_embeddings()
    untied_head = head.weight.numel() if head is not None and head.weight is not embedding.weight else 0
    return max(untied_head, *(p.numel() for b in blocks for p in b.parameters()))


def _head_trainable(module: nn.Module) -> bool:
    head = module.get_output_embeddings()
    return head is not None and head.weight.requires_grad


def _expert_params(module: nn.Module) -> int:
    """Parameters of MoE experts that transformers holds fused (3-D `experts.*` tensors, not nn.Linear)."""
    return sum(p.numel() for name, p in module.named_parameters() if ".experts." in name and p.dim() == 3)


def _active_expert_fraction(cfg: Any) -> float:
    """The share of the experts each token runs through (top-k of n); 1 for a dense model."""
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    return (getattr(cfg, "num_experts_per_tok", None) or experts) / experts if experts else 1.0


def _mlp_width(cfg: Any) -> int:
    """The MLP width a token's activations follow: the dense `intermediate_size`, or for an MoE the
    top-k routed experts' widths plus any shared expert's."""
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    if not experts or not getattr(cfg, "num_experts_per_tok", None):
        return cfg.intermediate_size
    expert = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size  # Mixtral: the latter
    return cfg.num_experts_per_tok * expert + (getattr(cfg, "shared_expert_intermediate_size", None) or 0)


def _linear_params(module: nn.Module) -> int:
    return sum(p.numel() for m in module.modules() if isinstance(m, nn.Linear) for p in m.parameters(False))


def activation_mode(precision: str, strategy: str) -> str:
    """How activations are stored: fp32, 16-bit (bf16-true, DeepSpeed, FSDP2 MixedPrecisionPolicy) or
    autocast (*-mixed under auto/ddp: fp32 residual stream, 16-bit matmuls)."""
    if precision == "32-true":
        return "fp32"
    mixed = precision.endswith("-mixed") and SHARD_STAGE[strategy] == 0
    return "autocast" if mixed else "16-bit"


def layer_activation_bytes(arch: Arch, mode: str, tokens: int, seq_len: int) -> int:
    """Bytes one decoder layer saves for backward (HF Llama with SDPA; measured in docs/memory.md)."""
    p = 4 if mode == "fp32" else 2
    attention = p * (2 * arch.q_dim + 2 * arch.kv_dim)  # q, k after RoPE, v, attention output
    mlp = 4 * p * arch.intermediate  # gate, SiLU(gate), up, their product
    probs = arch.heads * seq_len * (4 if p == 4 else 4 + p) if arch.eager else 0  # fp32 softmax (+ cast)
    return tokens * (NORM_BYTES[mode] * arch.hidden + attention + mlp + probs)


def head_activation_bytes(arch: Arch, mode: str, tokens: int, chunk_tokens: int = DEFAULT_LOSS_CHUNK) -> int:
    """Final norm plus the chunked loss at its peak: every token may be a label (the gathered hidden
    state and its gradient) and one chunk of logits over the vocabulary. `chunk_tokens=0`: the
    full-logits loss (fp32 log-probs of every position and, in backward, two fp32 gradients)."""
    if chunk_tokens <= 0:
        return tokens * (FINAL_NORM_BYTES[mode] * arch.hidden + FULL_LOGITS_BYTES * arch.vocab)
    return tokens * (FINAL_NORM_BYTES[mode] + HEAD_HIDDEN_BYTES[mode]) * arch.hidden + min(chunk_tokens, tokens) * (
        CHUNK_LOGIT_BYTES[mode] * arch.vocab)


def optimizer_step_bytes(arch: Arch, local_trainable: int, state_b: int, impl: str) -> int:
    """What the step allocates on top of its states: torch's foreach AdamW takes sqrt(v) of every
    parameter at once (one more copy of a state), the for-loop one parameter at a time, fused none."""
    if impl == "fused":
        return 0
    if impl == "foreach":
        return local_trainable * state_b
    return min(local_trainable, arch.largest) * state_b


def _activations(arch: Arch, mode: str, tokens: int, seq_len: int, checkpointing: bool, chunk_tokens: int) -> int:
    """Decoder-layer activations at the peak. Checkpointed: each layer keeps its input (residual
    dtype), and backward recomputes one layer at a time, after the loss buffers are freed; that
    layer's activations plus the gradients of three MLP-wide tensors count where they exceed them."""
    layer = layer_activation_bytes(arch, mode, tokens, seq_len)
    if not checkpointing:
        return arch.layers * layer
    p = 4 if mode == "fp32" else 2
    residual = 2 if mode == "16-bit" else 4
    recompute = layer + tokens * 3 * p * arch.intermediate
    head = head_activation_bytes(arch, mode, tokens, chunk_tokens)
    return arch.layers * tokens * residual * arch.hidden + max(0, recompute - head)


def _param_bytes(precision: str, strategy: str) -> tuple[int, int, int, int]:
    """(weight, grad, master, optimizer-state) bytes per parameter."""
    if strategy.startswith("deepspeed"):  # ZeRO clones an fp32 master of its partition in every precision
        return (4, 4, 4, 4) if precision == "32-true" else (2, 2, 4, 4)  # 16-bit models also under *-true
    if precision == "32-true":
        return 4, 4, 0, 4
    if precision.endswith("-true"):
        return 2, 2, 0, 2  # torch optimizers keep their states in the parameters' dtype
    return 4, 4, 0, 4  # fp32 params are the master; autocast / MixedPrecisionPolicy computes in 16 bit


def build_memory_plan(
    model: Any,
    *,
    precision: str,
    strategy: str,
    world_size: int,
    micro_batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool = False,
    optimizer: str = "adamw",
    trainable_params: int | None = None,
    extra_param_copies: int = 0,
    gpu: str | None = None,
    capacity: int | None = None,
    lora_rank: int | None = None,
    quantize_base: bool = False,
    loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK,
    device: str = "cuda",
    optimizer_impl: str | None = None,
    step_in_backward: bool = False,
) -> MemoryPlan:
    """Per-device memory of one setup.

    `model`: an nn.Module (meta device is fine), its PretrainedConfig, or `describe(model)`.
    `trainable_params`: how many of the model's params train (freeze); default: those with requires_grad.
    `lora_rank`: add LoRA adapters on q/k/v/o and freeze the base. `quantize_base`: QLoRA's NF4 base.
    `extra_param_copies`: copies of the trainable params (their dtype) a regularizer keeps (EWC: Fisher + anchor = 2).
    `gpu` names a catalogue GPU, or labels `capacity` (usable bytes per device, e.g. measured free memory).
    `device`: "cuda" adds the CUDA context and defaults to torch's foreach optimizer step; "cpu" (a
    plan held against RAM) has neither. `optimizer_impl`: fused | foreach | for-loop, when set explicitly.
    `step_in_backward`: each parameter is stepped as backward produces its gradient, which is then
    freed (fulltune.step_in_backward): one parameter's gradient and step at a time.
    """
    arch = describe(model)
    precision = PRECISION_ALIASES.get(str(precision), str(precision))
    _check(precision, strategy, optimizer, world_size, gpu if capacity is None else None)
    impl = optimizer_impl or ("foreach" if device == "cuda" else "for-loop")
    if impl not in OPTIMIZER_IMPLS:
        raise ValueError(f"unknown optimizer_impl {impl!r}; known: {', '.join(OPTIMIZER_IMPLS)}")
    strategy = "ddp" if strategy == "auto" and world_size > 1 else strategy
    trainable = arch.trainable if trainable_params is None else trainable_params
    total, linear, layer = arch.total, arch.linear, arch.layer
    if lora_rank:
        adapters = lora_rank * arch.lora_width
        total, trainable, linear, layer = total + adapters, adapters, linear + adapters, layer + adapters // arch.layers
    if quantize_base and trainable >= total:
        raise ValueError("quantize_base (QLoRA) needs a frozen base: set lora_rank or trainable_params")
    # NF4 in decoder-layer Linears; a LoRA model counted from peft has its adapters there too (unquantized)
    quantized = (arch.layer_linear - (0 if lora_rank else trainable)) if quantize_base else 0
    stage, offload, n = SHARD_STAGE[strategy], strategy.endswith("_offload"), world_size
    weight_b, grad_b, master_b, state_b = _param_bytes(precision, strategy)
    n_states, fixed_state_b = OPTIMIZERS[optimizer]
    state_b = fixed_state_b or state_b
    step_b = LOW_BIT_STEP_BYTES if optimizer in LOW_BIT else state_b
    impl = "for-loop" if optimizer in LOW_BIT else impl
    mode = activation_mode(precision, strategy)
    p = 4 if mode == "fp32" else 2
    tokens = micro_batch_size * seq_len

    def place(nbytes: float, from_stage: int) -> tuple[int, int]:
        """(GPU, CPU) bytes of a part that strategies from `from_stage` on shard (and offload)."""
        if stage < from_stage:
            return int(nbytes), 0
        return (0, int(nbytes / n)) if offload else (int(nbytes / n), 0)

    weights, cpu_w = place(quantized * NF4_BYTES + (total - quantized) * weight_b, 3)
    mid_backward = min(trainable, arch.largest_mid_backward or arch.largest)  # in backward: stepped beside activations
    gradients, cpu_g = place((mid_backward if step_in_backward else trainable) * grad_b, 2)
    # ZeRO-2 allocates its gradient partition at the first bucket reduce. A model within one bucket
    # reduces once, at the end of backward, after its activations are freed: the peak holds the
    # gradients in the bucket only (measured on CPU: the partition appears after backward).
    grads_after_peak = strategy == "deepspeed_zero2" and trainable <= DEEPSPEED_BUCKET
    gradients = 0 if grads_after_peak else gradients
    master, cpu_m = place(trainable * master_b, 1)
    states, cpu_s = place(trainable * n_states * state_b, 1)
    if mode == "autocast":
        compute = 2 * (linear - quantized)
    elif stage == 3:  # gathered: non-layer params (FSDP2's root stays gathered), two layers, one layer's grads,
        compute = p * (total - arch.layers * layer + 3 * layer + arch.vocab * arch.hidden)  # the head's grad
    else:
        compute = 0
    if strategy == "ddp":
        buffers = trainable * grad_b  # DDP buckets: a second gradient copy unless gradient_as_bucket_view
    elif device == "cuda" and strategy.startswith("deepspeed"):
        buffers = DEEPSPEED_BUCKET * grad_b  # allocated whole when backward starts
    elif strategy.startswith("deepspeed") and stage >= 2:  # CPU: written as backward fills it
        buffers = min(DEEPSPEED_BUCKET, trainable) * grad_b
    else:
        buffers = 0
    method = _method(total, trainable, lora_rank, quantize_base)
    activations = _activations(arch, mode, tokens, seq_len, gradient_checkpointing, loss_chunk_tokens)
    logits = head_activation_bytes(arch, mode, tokens, loss_chunk_tokens)
    # ZeRO steps one flat partition: a for-loop step is then as large as a foreach one
    impl = "foreach" if strategy.startswith("deepspeed") and impl == "for-loop" else impl
    step = optimizer_step_bytes(arch, trainable // (n if stage >= 1 else 1), step_b, impl)
    if step_in_backward:  # one parameter at a time, while backward's activations are still live; the
        # input embedding's (the largest, often) last, once they are freed
        step = optimizer_step_bytes(arch, mid_backward, step_b, impl)
        largest = min(trainable, arch.largest)
        last = largest * grad_b + optimizer_step_bytes(arch, largest, step_b, impl)
        step += max(0, last - activations - logits - step - mid_backward * grad_b)
    step_line = 0 if offload else step if step_in_backward else max(0, step - activations - logits)
    # The chunked loss computes the head weight's gradient in forward, while the previous step's gradients
    # are still held (Lightning zeroes them after forward, before backward). Measured on CPU: +2.2 GiB with
    # Gemma-2's 256k x 2304 head, +1.2 with Qwen3's 152k x 2048. Stage 3 counts it among the compute copies.
    head_grad = (arch.vocab * arch.hidden * grad_b
                 if arch.head_trainable and loss_chunk_tokens > 0 and stage < 3 and not lora_rank else 0)
    return MemoryPlan(
        model=arch.name,
        total_params=total,
        trainable_params=trainable,
        method=method,
        precision=precision,
        strategy=strategy,
        world_size=world_size,
        micro_batch_size=micro_batch_size,
        seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing,
        optimizer=optimizer,
        accounting=_accounting(
            precision,
            mode,
            optimizer,
            (weight_b, grad_b, master_b),
            n_states,
            state_b,
            frozen=total > trainable,
            quantized=bool(quantized),
            in_backward=step_in_backward,
        ),
        weights=weights,
        compute_copies=compute,
        gradients=gradients,
        master_weights=master,
        optimizer_states=states,
        regularizer=int(extra_param_copies * weight_b * trainable / (n if stage == 3 else 1)),  # param dtype
        buffers=buffers,
        activations=activations,
        logits=logits,
        optimizer_step=step_line,
        head_gradient=head_grad,
        overhead=CUDA_OVERHEAD if device == "cuda" else CPU_PROCESS_OVERHEAD,
        cpu_ram=cpu_w + cpu_g + cpu_m + cpu_s,
        gpu=gpu,
        capacity=capacity if capacity is not None else (gpu_bytes(gpu) if gpu else None),
        device=device,
        step_in_backward=step_in_backward,
        notes={
            **_notes(arch, mode, strategy, n, gradient_checkpointing, tokens, seq_len, extra_param_copies),
            "logits": f"{min(loss_chunk_tokens, tokens)} label tokens x {arch.vocab} vocab per chunk + hidden states"
            if loss_chunk_tokens > 0 else f"full logits: {tokens} tokens x {arch.vocab} vocab x {FULL_LOGITS_BYTES} B",
            "head_gradient": "vocab x hidden, computed with the loss",
            "optimizer_step": f"{impl}: {step / GiB:.2f} GiB, "
            + ("one parameter at a time, in backward" if step_in_backward else "after activations are freed"),
            **({"gradients": "one parameter's at a time (stepped and freed in backward)"} if step_in_backward else {}),
            **({"gradients": f"1/{n} shard, filled after backward (the bucket holds them until then)"}
               if grads_after_peak else {}),
        },
    )


def _check(precision: str, strategy: str, optimizer: str, world_size: int, gpu: str | None) -> None:
    for what, value, known in (
        ("precision", precision, PRECISIONS),
        ("strategy", strategy, SHARD_STAGE),
        ("optimizer", optimizer, OPTIMIZERS),
    ):
        if value not in known:
            raise ValueError(f"unknown {what} {value!r}; known: {', '.join(known)}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if gpu is not None:
        gpu_bytes(gpu)


def _method(total: int, trainable: int, lora_rank: int | None, quantized: bool) -> str:
    if lora_rank:
        return f"{'QLoRA' if quantized else 'LoRA'} r={lora_rank} on {'/'.join(LORA_TARGETS)}"
    if trainable == total:
        return "full fine-tuning"
    return f"partial: {trainable / total:.1%} trainable"


def _accounting(
    precision: str,
    mode: str,
    optimizer: str,
    param_b: tuple[int, int, int],
    n_states: int,
    state_b: int,
    *,
    frozen: bool,
    quantized: bool,
    in_backward: bool = False,
) -> str:
    """The bytes-per-parameter sum the plan uses, in words."""
    half = "fp16" if precision.startswith("16") else "bf16"
    dtype = {4: "fp32", 2: half}
    weight_b, grad_b, master_b = param_b
    grads = f"{dtype[grad_b]} grads" + (", one parameter's at a time (step in backward)" if in_backward else "")
    parts = [(weight_b, f"{dtype[weight_b]} weights"), (0 if in_backward else grad_b, grads)]
    if master_b:
        parts.append((master_b, "fp32 master"))
    state = LOW_BIT.get(optimizer) or dtype[state_b]
    parts.append((n_states * state_b, f"{optimizer} {n_states} state{'s' * (n_states > 1)} {state}"))
    text = (f"{' + '.join(f'{b:.3g} ({what})' for b, what in parts)} = {sum(b for b, _ in parts):.3g} B per "
            "trainable param")
    if mode == "autocast":
        text += f"; autocast also keeps a {half} copy of every Linear weight for backward (2 B/param)"
    if frozen:
        base = f"{NF4_BYTES:.3f} B (NF4) in decoder Linears, " if quantized else ""
        text += f"; frozen params: {base}{weight_b} B ({dtype[weight_b]} weights)"
    return text


def _notes(
    arch: Arch, mode: str, strategy: str, n: int, checkpointing: bool, tokens: int, seq_len: int, copies: int
) -> dict[str, str]:
    """One short explanation per line of the table."""
    stage, offload = SHARD_STAGE[strategy], strategy.endswith("_offload")
    layer = layer_activation_bytes(arch, mode, tokens, seq_len)
    shard = f"1/{n} shard" + (", in CPU RAM" if offload else "")
    gathered = "gathered for compute: root + 2 layers; 1 layer's and the head's grads" if stage == 3 else ""
    recomputed = f"{arch.layers} layer inputs + 1 layer recomputed" if checkpointing else f"{arch.layers} layers"
    return {
        "weights": shard if stage >= 3 else "full replica",
        "compute_copies": "autocast casts of Linear weights, kept for backward" if mode == "autocast" else gathered,
        "gradients": shard if stage >= 2 else "full",
        "master_weights": shard if stage >= 1 else "full",
        "optimizer_states": shard if stage >= 1 else "full",
        "regularizer": f"{copies} copies of the trainable params, sharded like them",
        "buffers": "DDP gradient buckets" if strategy == "ddp"
        else "DeepSpeed contiguous-gradients reduce bucket, 5e8 elements",
        "activations": f"{recomputed}, {layer / GiB:.3f} GiB/layer ({mode}, {tokens} tokens)",
        "overhead": "fixed estimate",
    }


class Alternative(NamedTuple):
    """A setup the plan offers instead: what it is, its plan, and the overrides that select it."""

    label: str
    plan: MemoryPlan
    overrides: tuple[str, ...]


# plan setting -> the `python train.py` override that selects it
def _overrides(change: dict[str, Any]) -> tuple[str, ...]:
    out = []
    for key, value in change.items():
        if key == "gradient_checkpointing":
            out.append("model.gradient_checkpointing=true")
        elif key == "micro_batch_size":
            out.append(f"data.batch_size={value}")
        elif key == "precision":
            out.append(f"precision={value.replace('-', '_')}")
        elif key == "strategy":
            out.append(f"strategy={value}")
        elif key == "world_size":
            per_node = min(value, 8)
            out += [f"trainer.devices={per_node}"] + ([f"trainer.num_nodes={value // per_node}"] if value > 8 else [])
        elif key == "optimizer":
            out.append(f"optimizer={OPTIMIZER_CONFIGS[value]}")
        elif key == "step_in_backward" and value:  # each parameter stepped alone: no accumulation, no global clipping
            out += ["optimizer.step_in_backward=true", "trainer.accumulate_grad_batches=1",
                    "trainer.gradient_clip_val=null"]
        elif key == "step_in_backward":
            out.append("optimizer.step_in_backward=false")
        elif key == "lora_rank":
            out.append("finetune=qlora" if change.get("quantize_base") else "finetune=lora")
    return tuple(sorted(out, key=lambda o: not o.startswith(("precision=", "optimizer=", "finetune=", "strategy="))))


def suggest_alternatives(model: Any, plan_kwargs: dict[str, Any], gpu: str) -> list[Alternative]:
    """When the requested setup does not fit `gpu`, what would, cheapest change first: the seed
    notes' decision tree (checkpointing, smaller micro-batch, pure bf16, low-bit optimizer states and
    the step in backward on one device, sharding and offload, more devices, then LoRA / QLoRA). Each
    option comes with its plan, fitting or not, and the overrides that run it; only what fulltune can
    run on that hardware is offered (no bf16 before Ampere, fp8 states on sm89+, no offload to the RAM
    a CPU plan is already held against)."""
    arch = describe(model)
    kwargs = {**plan_kwargs, "gpu": gpu}
    if build_memory_plan(arch, **kwargs).fits():
        return []
    n, strategy = kwargs["world_size"], kwargs["strategy"]
    precision = PRECISION_ALIASES.get(kwargs["precision"], kwargs["precision"])
    cpu, bf16 = kwargs.get("device", "cuda") == "cpu", gpu not in PRE_AMPERE
    full = arch.trainable >= arch.total and kwargs.get("trainable_params") is None and not kwargs.get("lora_rank")
    ckpt = {"gradient_checkpointing": True}
    options: list[tuple[str, dict[str, Any]]] = []
    if not kwargs.get("gradient_checkpointing"):
        options.append(("gradient checkpointing", ckpt))
    if kwargs["micro_batch_size"] > 1:
        options.append(
            ("micro-batch 1 + checkpointing (raise accumulate_grad_batches)", {"micro_batch_size": 1, **ckpt})
        )
    if precision not in ("bf16-true", "16-true") and bf16:
        options.append(
            (
                "bf16-true + checkpointing (pure bf16: 8 B/param, the seed notes' 60 GB setup)",
                {"precision": "bf16-true", **ckpt},
            )
        )
    in_backward_ok = SHARD_STAGE[strategy] == 0 and precision != "16-mixed" and not kwargs.get("step_in_backward")
    if SHARD_STAGE[strategy] == 0 and kwargs.get("optimizer", "adamw") == "adamw":
        pure = {"precision": "bf16-true"} if bf16 else {}
        low_bit = ["adamw8bit", "adamw4bit"] + (["adamwfp8"] if gpu in FP8_GPUS else [])
        options.append(("8-bit AdamW states + checkpointing", {"optimizer": "adamw8bit", **ckpt}))
        if in_backward_ok:
            options.append(("optimizer step in backward + checkpointing", {"step_in_backward": True, **ckpt}))
            for optimizer in low_bit:
                options.append((f"{'bf16-true + ' if pure else ''}{LOW_BIT[optimizer]} AdamW + step in backward + "
                                "checkpointing", {**pure, "optimizer": optimizer, "step_in_backward": True, **ckpt}))
    sharded = {**ckpt, **({"step_in_backward": False} if kwargs.get("step_in_backward") else {})}  # refused there
    for name in ("fsdp", "fsdp_offload", "deepspeed_zero3_offload"):
        offload = name.endswith("_offload")
        if name != strategy and (n > 1 or offload) and not (offload and cpu):
            options.append((f"{name} on {n} device{'s' * (n > 1)} + checkpointing", {"strategy": name, **sharded}))
    more = _devices_needed(arch, {**kwargs, "strategy": "fsdp", **sharded})
    if more:
        options.append((f"fsdp on {more} devices + checkpointing", {"strategy": "fsdp", "world_size": more, **sharded}))
    if full:
        options.append(("LoRA r=16 on q/k/v/o + checkpointing", {"lora_rank": 16, **ckpt}))
        options.append(("QLoRA r=16 (NF4 base) + checkpointing", {"lora_rank": 16, "quantize_base": True, **ckpt}))
    return [Alternative(label, build_memory_plan(arch, **{**kwargs, **change}), _overrides(change))
            for label, change in options]


def _devices_needed(arch: Arch, kwargs: dict[str, Any], limit: int = 1024) -> int | None:
    """Smallest doubling of the device count that fits, or None within `limit`."""
    n = 2 * kwargs["world_size"]
    while n <= limit:
        if build_memory_plan(arch, **{**kwargs, "world_size": n}).fits():
            return n
        n *= 2
    return None


def render_plan(plan: MemoryPlan, alternatives: list[Alternative] | tuple = ()) -> str:
    """The plan as a plain-text table in GiB per device, the GPU verdict and what would fit instead."""
    ckpt = "on" if plan.gradient_checkpointing else "off"
    out = [
        f"Memory plan: {plan.model}, {plan.total_params:,} params, {plan.trainable_params:,} trainable ({plan.method})",
        f"  {plan.precision} | {plan.strategy} x {plan.world_size} | {plan.optimizer} | micro-batch "
        f"{plan.micro_batch_size} x seq {plan.seq_len} | gradient checkpointing {ckpt}"
        + (" | step in backward" if plan.step_in_backward else ""),
        f"  accounting: {plan.accounting}",
        f"  {'':26}{'GiB/device':>11}",
    ]
    for name, label in plan.LINES:
        label = "the process before the model" if name == "overhead" and plan.device == "cpu" else label
        value = getattr(plan, name)
        if value or name in ("weights", "gradients", "optimizer_states", "activations"):
            out.append(f"  {label:26}{value / GiB:11.2f}  {plan.notes.get(name, '')}".rstrip())
    out.append(f"  {'total':26}{plan.total / GiB:11.2f}")
    if plan.cpu_ram:
        out.append(f"  {'CPU RAM per process':26}{plan.cpu_ram / GiB:11.2f}  offloaded shards (x processes per node)")
    if plan.capacity is not None:
        spare = (plan.capacity - plan.total) / GiB
        verdict = f"fits, {spare:.1f} GiB spare" if spare >= 0 else f"does NOT fit, {-spare:.1f} GiB short"
        out.append(f"  {plan.gpu} ({plan.capacity / GiB:.1f} GiB usable): {verdict}")
    if alternatives:
        out.append(f"  alternatives (GiB/device{' on ' + plan.gpu if plan.gpu else ''}):")
        for label, alt, overrides in alternatives:
            mark = "fits" if plan.capacity is None or alt.fits() else "no  "
            cpu = f"  (+{alt.cpu_ram / GiB:.1f} GiB CPU RAM/process)" if alt.cpu_ram else ""
            out.append(f"    {mark} {alt.total / GiB:8.2f}  {label}{cpu}")
            out.append(f"{'':19}{' '.join(overrides)}")
    return "\n".join(out)
