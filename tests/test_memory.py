"""Memory plan: exact counts, the seed notes' reference numbers, and the plan against measured memory."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fulltune.loss import install_label_loss_head
from fulltune.memory import (
    build_memory_plan,
    count_params,
    describe,
    layer_activation_bytes,
    lora_param_count,
    render_plan,
    suggest_alternatives,
)

GB = 1e9
TINY = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, vocab_size=2048)
# The seed notes' LLaMA-2 7B card: per-device batch 2, max_length 2048, gradient checkpointing.
# Its arithmetic has no optimizer-step transient: torch's fused AdamW (conf/optimizer/adamw.yaml) has none.
SEED_CARD = dict(strategy="auto", world_size=1, micro_batch_size=2, seq_len=2048, gradient_checkpointing=True,
                 optimizer_impl="fused")


def llama(hidden, intermediate, layers, heads, kv_heads, vocab=32000):
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    )


LLAMA2 = {
    "7B": llama(4096, 11008, 32, 32, 32),
    "13B": llama(5120, 13824, 40, 40, 40),
    "70B": llama(8192, 28672, 80, 64, 8),
}


@pytest.fixture(scope="module")
def llama2_7b():
    return describe(LLAMA2["7B"])


def test_llama2_7b_parameter_counts_are_exact():
    with torch.device("meta"):
        model = LlamaForCausalLM(LLAMA2["7B"])
    assert count_params(model) == (6_738_415_616, 6_738_415_616)
    assert count_params(LLAMA2["7B"]) == (6_738_415_616, 6_738_415_616)


@pytest.mark.parametrize("rank, trainable, seed_says", [(64, 67_108_864, 70e6), (16, 16_777_216, 18e6)])
def test_lora_counts_match_peft_and_the_seed_table(rank, trainable, seed_says):
    from peft import LoraConfig, get_peft_model

    with torch.device("meta"):
        model = get_peft_model(
            LlamaForCausalLM(LLAMA2["7B"]), LoraConfig(r=rank, target_modules=["q_proj", "v_proj", "k_proj", "o_proj"])
        )
    assert count_params(model)[1] == lora_param_count(LLAMA2["7B"], rank) == trainable
    assert trainable == pytest.approx(seed_says, rel=0.1)  # the seed table rounds: "70M", "18M"
    from_peft = build_memory_plan(model, precision="bf16-true", **SEED_CARD)
    analytic = build_memory_plan(LLAMA2["7B"], precision="bf16-true", lora_rank=rank, **SEED_CARD)
    assert (from_peft.total, from_peft.trainable_params) == (analytic.total, analytic.trainable_params)


def test_seed_7b_breakdown_pure_bf16(llama2_7b):
    """004: weights 14 + grads 14 + optimizer 28 + activations ~4 = ~60 GB (7e9 params, pure bf16 AdamW)."""
    plan = build_memory_plan(llama2_7b, precision="bf16-true", **SEED_CARD)
    assert plan.weights == plan.gradients == 2 * 6_738_415_616
    assert plan.optimizer_states == 4 * 6_738_415_616 and plan.master_weights == plan.compute_copies == 0
    assert plan.weights / GB == pytest.approx(14, rel=0.05)
    assert plan.optimizer_states / GB == pytest.approx(28, rel=0.05)
    rest = plan.activations + plan.logits + plan.overhead
    assert rest / GB == pytest.approx(4, rel=0.25)
    assert plan.total / GB == pytest.approx(60, rel=0.05)


@pytest.mark.parametrize("size, seed_gb", [("7B", 60), ("13B", 100), ("70B", 500)])
def test_seed_table_full_finetuning(size, seed_gb):
    """000: "Memory ≈ 4 × Params × Bytes" (2-byte params: 8 B/param) plus activations, rounded to a round
    number; the table's 70B row rounds 560 GB down to 500, hence a 15% tolerance. Exact Llama-2 counts."""
    plan = build_memory_plan(LLAMA2[size], precision="bf16-true", **SEED_CARD)
    assert plan.weights + plan.gradients + plan.optimizer_states == 4 * plan.total_params * 2
    assert plan.total / GB == pytest.approx(seed_gb, rel=0.15)


def test_seed_table_lora(llama2_7b):
    """000: LoRA r=16 on LLaMA-2 7B ~16 GB (16-bit base, seed card settings). The table's r=64 24 GB cannot
    come from the adapters: the 50M extra params cost 0.4 GB in pure bf16, so it is an upper bound here."""
    r16 = build_memory_plan(llama2_7b, precision="bf16-true", lora_rank=16, **SEED_CARD)
    r64 = build_memory_plan(llama2_7b, precision="bf16-true", lora_rank=64, **SEED_CARD)
    assert r16.total / GB == pytest.approx(16, rel=0.1)
    assert r64.total / GB < 24
    full = build_memory_plan(llama2_7b, precision="bf16-true", **SEED_CARD)
    assert full.total > 3 * r16.total


def test_zero_sharding_matches_the_zero_paper():
    """ZeRO (Rajbhandari et al. 2019), fig. 1: 7.5B params, 64 GPUs, mixed-precision Adam (2+2+12 B/param):
    baseline 120 GB, P_os 31.4 GB, P_os+g 16.6 GB, P_os+g+p 1.9 GB per device."""
    arch = dataclasses.replace(describe(LLAMA2["7B"]), total=7_500_000_000, trainable=7_500_000_000)
    expected = {"deepspeed_zero1": 31.4, "deepspeed_zero2": 16.6, "deepspeed_zero3": 1.9}
    for strategy, gb in expected.items():
        plan = build_memory_plan(
            arch, precision="bf16-mixed", strategy=strategy, world_size=64, micro_batch_size=1, seq_len=1
        )
        states = plan.weights + plan.gradients + plan.master_weights + plan.optimizer_states
        assert states / GB == pytest.approx(gb, abs=0.05), strategy


def test_deepspeed_gradients_at_the_peak_follow_when_deepspeed_writes_them():
    """Where ZeRO-1/2 keep gradients at the activation peak (bench/memory_plan.py, SmolLM2 fp32 x 2 on
    CPU: both measured 3077 MiB, 0.93 of the plan). ZeRO-2 fills the reduce bucket during backward and
    its gradient partition at the first reduce: the end of backward for a model within one bucket,
    after the peak. ZeRO-1 keeps whole gradients and fills the bucket when it reduces, after backward;
    on a GPU the bucket is allocated whole when backward starts."""
    small = dataclasses.replace(describe(LLAMA2["7B"]), total=100_000_000, trainable=100_000_000)
    large = dataclasses.replace(small, total=2_000_000_000, trainable=2_000_000_000)
    kwargs = dict(precision="32-true", world_size=2, micro_batch_size=1, seq_len=8)
    zero2, zero1 = (build_memory_plan(small, strategy=s, device="cpu", **kwargs) for s in ("deepspeed_zero2",
                                                                                         "deepspeed_zero1"))
    assert (zero2.gradients, zero2.buffers) == (0, 4 * 100_000_000)
    assert (zero1.gradients, zero1.buffers) == (4 * 100_000_000, 0)
    assert build_memory_plan(small, strategy="deepspeed_zero1", **kwargs).buffers == 4 * 500_000_000
    beyond = build_memory_plan(large, strategy="deepspeed_zero2", **kwargs)  # reduces mid-backward
    assert (beyond.gradients, beyond.buffers) == (4 * 1_000_000_000, 4 * 500_000_000)


def test_the_head_s_gradient_is_computed_in_forward_beside_last_step_s_gradients():
    """Gemma-2-like: a 256k x 2304 head in 2 layers. The chunked loss computes its gradient in
    forward, while Lightning still holds the previous step's gradients (measured on CPU)."""
    config = LlamaConfig(**{**TINY, "hidden_size": 2304, "num_hidden_layers": 2, "num_attention_heads": 8,
                            "vocab_size": 256000, "tie_word_embeddings": True})
    settings = dict(precision="32-true", strategy="auto", world_size=1, micro_batch_size=1, seq_len=512, device="cpu")
    assert build_memory_plan(config, **settings).head_gradient == 256000 * 2304 * 4
    frozen_head = dataclasses.replace(describe(config), head_trainable=False)
    assert build_memory_plan(frozen_head, **settings).head_gradient == 0
    assert build_memory_plan(config, **{**settings, "loss_chunk_tokens": 0}).head_gradient == 0  # logits instead
    assert build_memory_plan(config, **{**settings, "strategy": "fsdp", "world_size": 2}).head_gradient == 0
    assert build_memory_plan(config, **settings, lora_rank=8).head_gradient == 0


def test_offload_moves_sharded_states_to_cpu(llama2_7b):
    kwargs = dict(precision="bf16-mixed", world_size=4, micro_batch_size=1, seq_len=2048, gradient_checkpointing=True)
    on_gpu = build_memory_plan(llama2_7b, strategy="deepspeed_zero3", **kwargs)
    offloaded = build_memory_plan(llama2_7b, strategy="deepspeed_zero3_offload", **kwargs)
    moved = on_gpu.weights + on_gpu.gradients + on_gpu.master_weights + on_gpu.optimizer_states
    assert offloaded.cpu_ram == moved and on_gpu.cpu_ram == 0
    assert on_gpu.total - offloaded.total == moved + on_gpu.optimizer_step  # offloaded, the step runs on CPU


def test_ewc_copies_are_in_the_param_dtype_and_sharded_like_the_params(llama2_7b):
    kwargs = dict(precision="bf16-mixed", micro_batch_size=1, seq_len=512, extra_param_copies=2)
    single = build_memory_plan(llama2_7b, strategy="auto", world_size=1, **kwargs)
    assert single.regularizer == 2 * 4 * 6_738_415_616  # fp32 weights under mixed precision
    pure = build_memory_plan(llama2_7b, strategy="auto", world_size=1, **{**kwargs, "precision": "bf16-true"})
    assert pure.regularizer == 2 * 2 * 6_738_415_616
    assert build_memory_plan(llama2_7b, strategy="fsdp", world_size=8, **kwargs).regularizer == single.regularizer // 8


def test_qlora_65b_fits_one_48gb_gpu():
    """QLoRA (Dettmers et al. 2023): a 65B model fine-tunes on one 48 GB GPU with an NF4 base."""
    plan = build_memory_plan(
        llama(8192, 22016, 80, 64, 64),
        precision="bf16-mixed",
        strategy="auto",
        world_size=1,
        micro_batch_size=1,
        seq_len=512,
        gradient_checkpointing=True,
        lora_rank=64,
        quantize_base=True,
    )
    assert plan.total < 48 * GB


def test_suggestions_follow_the_decision_tree(llama2_7b):
    kwargs = dict(precision="bf16-mixed", strategy="auto", world_size=1, micro_batch_size=2, seq_len=2048)
    assert not build_memory_plan(llama2_7b, gpu="A100-80GB", **kwargs).fits()
    alternatives = suggest_alternatives(llama2_7b, kwargs, "A100-80GB")
    fitting = [alt.label for alt in alternatives if alt.plan.fits("A100-80GB")]
    assert "gradient checkpointing" not in fitting  # 16-18 B/param x 6.7B is over 80 GB whatever the activations
    assert any(label.startswith("fsdp on 2 devices") for label in fitting)
    assert any(label.startswith("LoRA") for label in fitting) and any(label.startswith("QLoRA") for label in fitting)
    assert suggest_alternatives(llama2_7b, {**kwargs, "gradient_checkpointing": True}, "H200-141GB") == []
    text = render_plan(build_memory_plan(llama2_7b, gpu="A100-80GB", **kwargs), alternatives)
    assert "does NOT fit" in text and "16 B per trainable param" in text and "QLoRA r=16" in text
    assert "finetune=qlora model.gradient_checkpointing=true" in text  # each option says how to run it


def test_unknown_settings_name_the_valid_ones(llama2_7b):
    with pytest.raises(ValueError, match="deepspeed_zero3_offload"):
        build_memory_plan(
            llama2_7b, precision="bf16-mixed", strategy="zero3", world_size=1, micro_batch_size=1, seq_len=8
        )
    with pytest.raises(ValueError, match="H100-80GB"):
        build_memory_plan(
            llama2_7b, precision="32", strategy="auto", world_size=1, micro_batch_size=1, seq_len=8, gpu="B200"
        )


def saved_activation_bytes(config, mode, micro_batch_size, seq_len, checkpointing=False):
    """Bytes of the distinct non-parameter tensors autograd saves in one forward (and the autocast weight casts)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16 if mode == "16-bit" else torch.float32).train()
    if checkpointing:
        model.activation_checkpointing_enable()  # non-reentrant
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, config.vocab_size, (micro_batch_size, seq_len))
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=mode == "autocast")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(input_ids=ids, labels=ids)
    return sum(saved.values())


def saved_by_one_layer(mode, checkpointing=False, **config):
    """A 2-layer minus a 1-layer model's saved bytes: embeddings and loss cancel out."""
    configs = [LlamaConfig(**{**TINY, **config, "num_hidden_layers": n}) for n in (1, 2)]
    one, two = (saved_activation_bytes(c, mode, 2, 128, checkpointing) for c in configs)
    return two - one


@pytest.mark.parametrize("mode", ["fp32", "16-bit", "autocast"])
@pytest.mark.parametrize("kv_heads, attention", [(4, "sdpa"), (2, "sdpa"), (4, "eager")])
def test_layer_activation_formula_matches_saved_tensors(mode, kv_heads, attention):
    arch = describe(LlamaConfig(**TINY, num_key_value_heads=kv_heads, attn_implementation=attention))
    autocast_casts = 2 * arch.layer_linear // arch.layers if mode == "autocast" else 0  # 16-bit weight copies
    measured = saved_by_one_layer(mode, num_key_value_heads=kv_heads, attn_implementation=attention) - autocast_casts
    assert layer_activation_bytes(arch, mode, 2 * 128, 128) == pytest.approx(measured, rel=0.01)


@pytest.mark.parametrize("mode, residual_bytes", [("fp32", 4), ("16-bit", 2)])
def test_checkpointing_keeps_only_layer_inputs(mode, residual_bytes):
    measured = saved_by_one_layer(mode, checkpointing=True)
    assert measured == pytest.approx(2 * 128 * TINY["hidden_size"] * residual_bytes, rel=0.02)


MEASURED = dict(precision="32-true", strategy="auto", world_size=1, micro_batch_size=8, seq_len=256)


def measure_peak_rss(checkpointing: bool) -> int:
    """Peak RSS growth over 3 AdamW steps of the tiny Llama in a fresh process, steps in Lightning's order
    (forward, zero_grad, backward, step). A fixed mmap threshold makes freed tensors leave RSS."""
    path = os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    script = f"import test_memory; test_memory._rss_child({checkpointing})"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _rss_child(checkpointing: bool) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, TINY["vocab_size"], (MEASURED["micro_batch_size"], MEASURED["seq_len"]))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS); ru_maxrss would also count the parent's RSS at fork
    before = _status_bytes("VmRSS")
    model = LlamaForCausalLM(LlamaConfig(**TINY)).train()
    if checkpointing:
        model.activation_checkpointing_enable()  # non-reentrant
    head = install_label_loss_head(model, 1024)  # fulltune's loss, as CausalLMModule trains
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(3):
        with head.labels(ids):
            loss = model(input_ids=ids).logits
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    print(_status_bytes("VmHWM") - before)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="reads peak RSS from Linux /proc")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_plan_matches_measured_cpu_peak(checkpointing):
    """Plan (without the process overhead) within 20% of the measured peak RSS growth; RSS also holds ~20 MiB
    of allocator and library workspace the plan does not model. Numbers: docs/memory.md."""
    measured = measure_peak_rss(checkpointing)
    plan = build_memory_plan(LlamaConfig(**TINY), gradient_checkpointing=checkpointing, device="cpu", **MEASURED)
    planned = plan.total - plan.overhead  # growth: the process was there before
    assert planned == pytest.approx(measured, rel=0.2)


LLAMA3_8B = llama(4096, 14336, 32, 32, 8, vocab=128256)


@pytest.mark.parametrize("name, per_value", [("AdamW8bit", 1 + 4 / 256), ("AdamW4bit", 0.5 + 4 / 128),
                                             ("AdamWFp8", 1 + 4 / 256)])
def test_low_bit_state_bytes_are_what_torchao_allocates(name, per_value):
    import torchao.optim

    weight = torch.nn.Parameter(torch.zeros(256, 512))
    optimizer = getattr(torchao.optim, name)([weight])
    weight.grad = torch.ones_like(weight)
    with torch.compiler.set_stance("force_eager"):  # torchao compiles its step: same states, no compiling
        optimizer.step()
    held = sum(t.nbytes for state in optimizer.state[weight].values() if state.ndim
               for t in (state.codes, state.scale))
    plan = build_memory_plan(describe(LLAMA2["7B"]), precision="bf16-true", strategy="auto", world_size=1,
                             micro_batch_size=1, seq_len=8, optimizer=name.lower())
    assert held == 2 * per_value * weight.numel()
    assert plan.optimizer_states == int(2 * per_value * 6_738_415_616)


def test_step_in_backward_holds_one_parameters_gradient_and_steps_it_in_backward():
    arch = describe(LLAMA3_8B)
    kwargs = dict(precision="bf16-true", strategy="auto", world_size=1, micro_batch_size=1, seq_len=2048,
                  gradient_checkpointing=True, optimizer_impl="fused")
    ordinary = build_memory_plan(arch, **kwargs)
    in_backward = build_memory_plan(arch, step_in_backward=True, **kwargs)
    assert ordinary.gradients == 2 * arch.total and in_backward.gradients == 2 * arch.largest == 2 * 128256 * 4096
    assert ordinary.total - in_backward.total == 2 * (arch.total - arch.largest)
    assert "one parameter's at a time" in in_backward.accounting


def test_llama3_8b_full_finetuning_fits_one_48gb_gpu_with_8bit_states_and_the_step_in_backward():
    """The llama3_8b_48gb recipe's levers: bf16 weights, 8-bit AdamW states, the step in backward, activation
    checkpointing. torchao's README reports Llama-2-7B full FT (torchtune, bf16 weights, one A100) at 51.6 with
    fused AdamW and 39.1 with its 8-bit AdamW (no step in backward: whole bf16 gradients); those are GiB (8 B/param
    alone is 50.2 GiB) of allocated tensors (no CUDA context): this plan with those settings lands on both."""
    kwargs = dict(precision="bf16-true", strategy="auto", world_size=1, micro_batch_size=2, seq_len=2048,
                  gradient_checkpointing=True, optimizer="adamw8bit")
    plan = build_memory_plan(describe(LLAMA3_8B), step_in_backward=True, gpu="L40S", **kwargs)
    assert plan.fits() and plan.fits("A6000") and not plan.fits("RTX-4090")
    for optimizer, gib in (("adamw", 51.6), ("adamw8bit", 39.1)):
        anchor = build_memory_plan(describe(LLAMA2["7B"]), **{**kwargs, "micro_batch_size": 1, "optimizer": optimizer},
                                   optimizer_impl="fused")
        assert (anchor.total - anchor.overhead) / 2**30 == pytest.approx(gib, rel=0.05), optimizer


def test_every_alternative_can_be_selected_by_its_overrides():
    """The options a 24 GB GPU gets for Llama-3-8B: each names overrides that compose into a valid run and
    select what its plan assumed (tests/test_memory.py::test_every_alternative_trains trains them)."""
    alternatives = suggest_alternatives(describe(LLAMA3_8B), RTX4090_8B, "RTX-4090")
    labels = [alt.label for alt in alternatives]
    assert any("fp8 AdamW" in label for label in labels)  # sm89: fp8 states offered
    assert not any("fp8" in a.label for a in suggest_alternatives(describe(LLAMA3_8B), RTX4090_8B, "A100-80GB"))
    fitting = {alt.label for alt in alternatives if alt.plan.fits()}
    assert {"QLoRA r=16 (NF4 base) + checkpointing", "fsdp_offload on 1 device + checkpointing"} <= fitting
    for alt in alternatives:
        assert alt.overrides, alt.label


RTX4090_8B = dict(precision="bf16-mixed", strategy="auto", world_size=1, micro_batch_size=2, seq_len=2048)


def test_every_alternative_trains_from_its_overrides_for_2_steps(tmp_path, cache_dir):
    """Every single-process option the plan offers, applied as printed to the tiny model on CPU, trains 2
    steps; sharded and offloaded ones pass preflight (the shared strategy runs train those strategies)."""
    from fulltune.launch import plan_settings
    from fulltune.preflight import preflight
    from fulltune.train import fit

    from .conftest import compose_config

    base = ["model=tiny", "trainer.accelerator=cpu", "trainer.max_steps=2", "eval.task=null", "eval.forgetting=null",
            "export=false", "callbacks.model_checkpoint=null", "+trainer.enable_checkpointing=false",
            "callbacks.progress_bar=null", "trainer.enable_progress_bar=false", "data.batch_size=2"]
    for i, alt in enumerate(suggest_alternatives(describe(LLAMA3_8B), RTX4090_8B, "RTX-4090")):
        overrides = [o for o in alt.overrides if not o.startswith("trainer.devices=")]
        cfg = compose_config([*base, *overrides], tmp_path / str(i), cache_dir)
        preflight(cfg)
        settings = plan_settings(cfg)[1]  # what the run's own plan reads from its config: what the option assumed
        assert (settings["optimizer"], settings["step_in_backward"], settings["gradient_checkpointing"],
                settings["quantize_base"], settings["strategy"]) == (
            alt.plan.optimizer, alt.plan.step_in_backward, alt.plan.gradient_checkpointing,
            alt.plan.method.startswith("QLoRA"), alt.plan.strategy), alt.label
        if cfg.strategy.name == "auto":
            with torch.compiler.set_stance("force_eager"):  # torchao's low-bit steps: same math, no compiling
                assert fit(cfg)["global_step"] == 2, alt.label
