"""Packing: examples in one row do not see each other, and rows are nearly full on the demo data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fulltune.data.packing import collate, pack
from tests.conftest import compose_config
from tests.data.helpers import alpaca_rows, datamodule, text_rows, tiny_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tok(cache_dir):
    return tiny_tokenizer(cache_dir)


def example_losses(model, batch, row_examples):
    """Summed next-token CE per example, found by the restarts of position_ids."""
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
        logits = model(**inputs, use_cache=False).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                           reduction="none", ignore_index=-100)
    losses = []
    for b, n_examples in enumerate(row_examples):
        starts = torch.nonzero(batch["position_ids"][b] == 0).flatten().tolist()
        bounds = [*starts, batch["input_ids"].shape[1]]
        for k in range(n_examples):  # the targets of an example sit at its positions 1.. (shifted by one)
            losses.append(ce[b, bounds[k]: bounds[k + 1] - 1].sum().item())
    return losses


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_equals_unpacked_per_example(tok, tmp_path, attn):
    task = write_jsonl(tmp_path / "t.jsonl", alpaca_rows(5))
    text = write_jsonl(tmp_path / "x.jsonl", text_rows(4))
    sources = [{"path": task, "format": "alpaca", "template": "instruction"}, {"path": text, "format": "text"}]
    dm = datamodule(tok, tmp_path / "cache", sources, packing=True, max_length=128)
    dm.setup()
    stores = dm._builder.stores
    examples = [(0, i) for i in range(5)] + [(1, i) for i in range(4)]
    parts = [stores[s].example(i) for s, i in examples]
    rows = pack(np.array([len(ids) for ids, _ in parts]), 128)
    assert max(len(r) for r in rows) >= 3 and len(rows) >= 2  # rows of several examples + padding tails
    packed = collate([[parts[k] for k in r] for r in rows], tok.pad_token_id, packed=True)
    unpacked = collate([[p] for p in parts], tok.pad_token_id, packed=False)
    assert "attention_mask" not in packed and packed["input_ids"].shape[1] <= 128
    assert (packed["position_ids"][:, 0] == 0).all() and (packed["labels"][:, 0] == -100).all()

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         attn_implementation=attn)
    model = LlamaForCausalLM(config).eval()
    got = example_losses(model, packed, [len(r) for r in rows])
    want = example_losses(model, unpacked, [1] * len(examples))
    want = [want[k] for r in rows for k in r]  # in packed order
    assert np.allclose(got, want, rtol=0, atol=1e-5), (got, want)
    # the same number of predicted tokens either way: the first label of each example is masked
    assert (packed["labels"][:, 1:] != -100).sum() == (unpacked["labels"][:, 1:] != -100).sum()


def test_collate_positions_and_padding_segments():
    a = (np.array([5, 6, 7]), np.array([0, 1, 1], dtype=np.uint8))
    b = (np.array([8, 9]), np.array([0, 1], dtype=np.uint8))
    batch = collate([[a, b], [b]], pad_id=2, packed=True)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 9, -100, -100, -100]]
    assert batch["input_ids"][1].tolist() == [8, 9, 2, 2, 2]
    assert batch["nonpad_fraction"].item() == pytest.approx(7 / 10)
    assert batch["squared_lengths"].item() == 3**2 + 2**2 + 2**2  # attention within each example only
    padded = collate([[a], [b]], pad_id=2, packed=False)
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert padded["squared_lengths"].item() == 3**2 + 2**2  # not the padded width's 2 * 3**2
    assert padded["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]


def test_pack_is_first_fit_decreasing_and_keeps_every_item_once():
    lengths = np.array([60, 60, 30, 10, 50, 40])
    rows = pack(lengths, 100)
    assert rows == [[0, 5], [1, 2, 3], [4]]
    assert sorted(i for r in rows for i in r) == list(range(6))


def test_demo_data_packs_to_at_least_95_percent_real_tokens(tok, cache_dir, tmp_path):
    from hydra.utils import instantiate

    # the tiny tokenizer makes demo examples ~75 tokens: 1024 holds ~13 (SmolLM2's: ~50 tokens, 512 is enough)
    cfg = compose_config(["data=demo", "data.packing=true", "data.max_length=1024"], tmp_path, cache_dir)
    dm = instantiate(cfg.data, tokenizer=tok, seed=cfg.seed)
    fractions = [b["nonpad_fraction"].item() for b in dm.train_dataloader()]
    assert dm.stats["nonpad_fraction"] >= 0.95 and np.mean(fractions) >= 0.95
    unpacked = instantiate(compose_config(["data=demo"], tmp_path, cache_dir).data, tokenizer=tok, seed=cfg.seed)
    unpacked.setup()
    assert unpacked.stats["nonpad_fraction"] < dm.stats["nonpad_fraction"]


def test_overlong_examples_are_truncated_or_dropped_and_counted(tok, tmp_path):
    long_prompt = {"instruction": "Add one. " * 40, "output": "1"}
    long_answer = {"instruction": "x", "output": "y " * 80}
    rows = [*alpaca_rows(6), long_prompt, long_answer]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    source = {"path": path, "format": "alpaca", "name": "t", "template": "instruction"}
    # truncate: both long rows are cut; the one whose prompt fills max_length has no label left: dropped
    for overlong, examples, truncated, dropped in (("truncate", 7, 2, 1), ("drop", 6, 0, 2)):
        dm = datamodule(tok, tmp_path / "cache", [source], max_length=64, overlong=overlong)
        dm.setup()
        s = dm.stats["sources"]["t"]
        assert (s["examples"], s["truncated"], s["dropped_overlong"] + s["dropped_no_labels"]) == (
            examples, truncated, dropped)
        assert max(len(r) for r in [b["input_ids"][0] for b in dm.train_dataloader()]) <= 64
