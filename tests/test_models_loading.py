"""Weights load as they will be trained: in the precision plugin's dtype, and under FSDP2 each rank
reads only its own rows of each tensor."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import safetensors
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import HalfPrecision, Precision
from omegaconf import open_dict
from safetensors.torch import save_file
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.testing._internal.distributed.fake_pg import FakeStore

from fulltune.models import build_model
from fulltune.strategies import load_sharded_weights, shard_rows

from .conftest import compose_config


@pytest.fixture
def tiny_pretrained(tmp_path, cache_dir):
    """The tiny model saved as an HF directory (fp32), and a spec that loads it."""
    spec = compose_config(["model=tiny"], tmp_path, cache_dir).model
    model = build_model(spec)
    model.save_pretrained(tmp_path / "tiny-hf")
    with open_dict(spec):
        spec.source, spec.pretrained = "pretrained", str(tmp_path / "tiny-hf")
    return spec, model.state_dict()


def test_bf16_true_loads_bf16_weights_equal_to_the_fp32_ones_rounded(tiny_pretrained):
    spec, fp32 = tiny_pretrained
    with HalfPrecision("bf16-true").module_init_context():  # what Lightning wraps around configure_model
        model = build_model(spec)
        meta = build_model(spec, device="meta")
    assert {p.dtype for p in [*model.parameters(), *meta.parameters()]} == {torch.bfloat16}
    for name, value in model.state_dict().items():
        assert torch.equal(value, fp32[name].to(torch.bfloat16)), name


def test_fp32_and_mixed_precision_load_fp32_masters(tiny_pretrained):
    spec, fp32 = tiny_pretrained
    with Precision().module_init_context():  # 32-true and *-mixed: no dtype context
        model = build_model(spec)
    assert all(torch.equal(value, fp32[name]) for name, value in model.state_dict().items())


def test_config_models_draw_the_same_random_weights_in_every_dtype(tmp_path, cache_dir):
    spec = compose_config(["model=tiny"], tmp_path, cache_dir).model
    fp32, bf16 = build_model(spec).state_dict(), build_model(spec, dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(bf16[name], value.to(torch.bfloat16)) for name, value in fp32.items())


def test_from_pretrained_follows_an_active_device_context(tiny_pretrained):
    """transformers takes a `torch.device(...)` context as the device map, which is how weights load
    straight onto the strategy's root device; a meta context is the one it refuses, which shows it looks."""
    spec, _ = tiny_pretrained
    with torch.device("meta"), pytest.raises(RuntimeError, match="meta device context"):
        build_model(spec)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("n", [1, 3, 7, 8])
def test_shard_rows_are_torch_chunks_even_uneven_and_empty(world, n):
    chunks = torch.arange(n).chunk(world)
    for rank in range(world):
        lo, hi = shard_rows(n, world, rank)
        assert list(range(lo, hi)) == (chunks[rank].tolist() if rank < len(chunks) else [])


class Toy(nn.Module):
    """Parameters whose dim 0 splits unevenly (7, 3 rows) or evenly (8) over 2-5 ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 7, bias=False)
        self.b = nn.Linear(2, 8, bias=False)
        self.c = nn.Parameter(torch.empty(3))


@contextmanager
def fake_rank(rank: int, world: int):
    """This process as `rank` of `world` (torch's fake process group: collectives do nothing)."""
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield init_device_mesh("cpu", (world,))
    finally:
        dist.destroy_process_group()


class SlicesOnly:
    """`safe_open` that refuses to read a tensor whole: sharded tensors must be read as slices."""

    open = safetensors.safe_open

    def __init__(self, *args, **kwargs) -> None:
        self._file = SlicesOnly.open(*args, **kwargs)

    def __enter__(self):
        self._file.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._file.__exit__(*exc)

    def keys(self) -> list[str]:
        return self._file.keys()

    def get_slice(self, name: str):
        return self._file.get_slice(name)

    def get_tensor(self, name: str):
        raise AssertionError(f"{name} was read whole")


@pytest.mark.parametrize("world", [2, 3, 5])
def test_each_fsdp2_rank_reads_exactly_its_own_rows(world, tmp_path, monkeypatch):
    full = {"a.weight": torch.randn(7, 4), "b.weight": torch.randn(8, 2), "c": torch.randn(3)}
    save_file(full, tmp_path / "model.safetensors")
    monkeypatch.setattr(safetensors, "safe_open", SlicesOnly)
    for rank in range(world):
        with fake_rank(rank, world) as mesh:
            with torch.device("meta"):
                model = Toy().to(torch.bfloat16)
            fully_shard(model, mesh=mesh)
            load_sharded_weights(model, tmp_path, torch.device("cpu"))
            for name, param in model.state_dict().items():
                chunks = full[name].chunk(world)
                want = chunks[rank] if rank < len(chunks) else full[name][:0]
                assert torch.equal(param.to_local(), want.to(torch.bfloat16)), (rank, name)


def test_a_float32_rounded_setting_and_metadata_are_not_architecture_differences():
    """A GGUF-converted config.json writes 1e-5 as float32 (9.99999975e-06) and adds metadata: the run
    must not warn that the architecture changed (the default job did), but a real change is named."""
    from fulltune.models import architecture_diff

    yaml = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "rms_norm_eps": 1e-5}
    converted = {**yaml, "rms_norm_eps": 9.999999747378752e-06, "unk_token_id": 0, "_model_name_or_path": "x"}
    assert architecture_diff(yaml, converted) == []
    assert architecture_diff(yaml, {**yaml, "rms_norm_eps": 1e-6}) == ["rms_norm_eps: 1e-05 -> 1e-06"]
