"""Tiny random models of the architecture families users bring, built offline from configs and saved
with `save_pretrained` (with the tiny tokenizer), as a user's own model directory would be.

Each family carries what sets it apart from the Llama the project started with: Llama 3.1's rope
scaling and untied embeddings, Qwen2's q/k/v biases, Qwen3's q/k norms, Mistral's sliding window,
Gemma 2's soft-capping, scaled embeddings and its own norm, Phi-3's fused qkv and gate_up, and a
mixture of experts (Qwen3-MoE) whose experts transformers stores one per expert and fuses in memory.
"""

from __future__ import annotations

from pathlib import Path

COMMON = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
          "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
FAMILIES = {
    "llama31": {"model_type": "llama", "tie_word_embeddings": False, "rope_theta": 500000.0,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": True, "rope_theta": 1000000.0},
    "qwen3": {"model_type": "qwen3", "tie_word_embeddings": True, "head_dim": 32},
    "mistral": {"model_type": "mistral", "sliding_window": 32, "tie_word_embeddings": False},
    "gemma2": {"model_type": "gemma2", "head_dim": 16, "final_logit_softcapping": 30.0,
               "attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 16, "sliding_window": 32},
    "phi3": {"model_type": "phi3", "tie_word_embeddings": False},
    "qwen3_moe": {"model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "decoder_sparse_step": 1, "head_dim": 16, "tie_word_embeddings": False},
}


def save_family(name: str, target: Path, tokenizer_from: Path) -> Path:
    """Family `name` with random weights (seed 0, drawn in float64) saved as an HF dir at `target`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (target / "config.json").is_file():
        config = AutoConfig.for_model(**{**COMMON, **FAMILIES[name]})
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float64).float()
        if name == "llama31":  # like Llama 3.1's generation_config: several EOS ids (<|end_of_text|>, <|eot_id|> ...)
            model.generation_config.eos_token_id = [0, 2]
        model.save_pretrained(target)
        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(target)
    return target
