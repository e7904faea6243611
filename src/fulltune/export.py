"""Export a trained model as an HF directory that plain `transformers` loads."""

from __future__ import annotations

from pathlib import Path

from torch import nn


def export_hf(model: nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """`save_pretrained` safetensors + tokenizer + a generation config whose EOS and pad are the
    tokenizer's (so generation stops at the turn end the model was trained to emit)."""
    out = Path(out_dir)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
