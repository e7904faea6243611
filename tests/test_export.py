"""The end-of-run export (weights only, from the live model, in the training dtype) and
`python -m fulltune.export <checkpoint>`: every checkpoint a run writes becomes an HF dir that
`from_pretrained` loads, holding the trained weights, without ever holding more than one shard."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from fulltune.export import checkpoint_format, export_dtype, main, write_hf_dir
from fulltune.preflight import ConfigError
from fulltune.train import fit

from .conftest import REPO
from .strategy_runs import hf_weights, max_abs_diff, subprocess_env


def export_cli(capsys, checkpoint: Path, *args: str) -> Path:
    """`python -m fulltune.export ...`, in-process (the last test runs the real command line)."""
    main([str(checkpoint), *args])
    return Path(capsys.readouterr().out.strip().splitlines()[-1])


def same_logits(exported: Path, reference: Path) -> None:
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(exported).eval()(input_ids=ids).logits
        want = AutoModelForCausalLM.from_pretrained(reference).eval()(input_ids=ids).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("strategy", "kind"),
    [("ddp", "lightning"), ("fsdp", "dcp"), ("deepspeed_zero1", "deepspeed"), ("deepspeed_zero2", "deepspeed"),
     ("deepspeed_zero3", "deepspeed")],
)
def test_last_checkpoint_exports_the_trained_weights(strategy, kind, run, capsys):
    """The final checkpoint of each strategy, converted by the CLI, is bit-identical to the model the
    run exported at its end (from memory for ddp, through the converter for the sharded ones) and to
    the DDP run's weights within 1e-5."""
    run_dir = run(strategy)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint_format(checkpoint) == kind
    out = export_cli(capsys, checkpoint)
    assert out == run_dir / "checkpoints" / "last-hf"
    assert max_abs_diff(hf_weights(out), hf_weights(run_dir / "hf")) == 0
    assert max_abs_diff(hf_weights(out), hf_weights(run("ddp") / "hf")) <= 1e-5
    same_logits(out, run_dir / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_zero3"])
def test_sharded_runs_export_weights_only_at_the_end(strategy, run):
    """The end-of-run export of a sharded run comes from the live model: no `final.ckpt` (for 7B ~80
    GB of weights and optimizer state written only to be converted), and the HF dir holds weights,
    config and tokenizer only. The periodic checkpoints are ModelCheckpoint's, as configured."""
    run_dir = run(strategy)
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert checkpoints == ["last.ckpt", "step000002.ckpt", "step000004.ckpt"]  # no final.ckpt
    files = {p.name for p in (run_dir / "hf").iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= files
    assert not [f for f in files if f.endswith((".pt", ".ckpt", ".distcp", ".bin")) or "optim" in f]
    assert json.loads((run_dir / "hf" / "config.json").read_text())["dtype"] == "float32"  # auto: fp32 run


def test_export_dtype_follows_the_training_precision():
    assert [export_dtype("auto", p) for p in ("bf16-mixed", "bf16-true", "16-mixed", "32-true")] == [
        torch.bfloat16, torch.bfloat16, torch.float16, torch.float32]
    assert export_dtype("bf16", "32-true") == torch.bfloat16 and export_dtype("fp32", "bf16-mixed") == torch.float32
    with pytest.raises(ConfigError, match="export_dtype='int8' is not known; choose auto, fp32, bf16, fp16"):
        export_dtype("int8", "32-true")


def test_bf16_export_of_an_fp32_run_is_its_weights_cast_to_bf16(tiny_cfg, tmp_path):
    """Cast tensor by tensor while writing: each weight is exactly the trained fp32 one in bf16, and
    `from_pretrained` loads the directory as a bf16 model."""
    fit(tiny_cfg("export_dtype=bf16", "trainer.max_steps=2", "save_steps=2", "eval.task=null",
                 "eval.forgetting=null"))
    trained = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    expected = {k.removeprefix("model."): v.to(torch.bfloat16) for k, v in trained.items()
                if k.startswith("model.") and k != "model.lm_head.weight"}  # tied: left out
    exported = hf_weights(tmp_path / "hf")
    assert {v.dtype for v in exported.values()} == {torch.bfloat16}
    assert max_abs_diff(exported, expected) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").dtype == torch.bfloat16


def test_fsdp_export_equals_torch_consolidation(run, tmp_path, capsys):
    """The key-by-key DCP reader gives exactly what torch's own whole-checkpoint conversion gives."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    checkpoint = run("fsdp") / "checkpoints" / "last.ckpt"
    dcp_to_torch_save(checkpoint, tmp_path / "whole.pt")
    whole = torch.load(tmp_path / "whole.pt", weights_only=False)["state_dict"]
    expected = {k.removeprefix("model."): v for k, v in whole.items() if k.startswith("model.")}
    expected.pop("lm_head.weight")  # tied to the embeddings: left out, as save_pretrained does
    assert max_abs_diff(hf_weights(export_cli(capsys, checkpoint, "--out", str(tmp_path / "hf"))), expected) == 0


def test_large_models_are_written_in_shards_that_from_pretrained_reads(run, tmp_path, capsys):
    run_dir = run("deepspeed_zero3")
    out = export_cli(capsys, run_dir / "checkpoints" / "last.ckpt", "--out", str(tmp_path), "--shard-gb", "0.0001")
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 3 and set(index["weight_map"].values()) == {s.name for s in shards}
    same_logits(out, run_dir / "hf")


def test_writer_streams_one_shard_at_a_time(tmp_path, monkeypatch):
    """Tensors are loaded one at a time and each shard is written (and dropped) as soon as it is full:
    never more than one shard's tensors (+ the one that overflowed it) are held."""
    import safetensors.torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    loaded, written, held = [0], [0], []
    save_file = safetensors.torch.save_file

    def counting_save(tensors, path, metadata=None):
        written[0] += len(tensors)
        save_file(tensors, path, metadata=metadata)

    def loader(i: int):
        def load() -> torch.Tensor:
            loaded[0] += 1
            held.append(loaded[0] - written[0])
            return torch.full((256, 256), float(i))  # 256 KiB
        return load

    monkeypatch.setattr(safetensors.torch, "save_file", counting_save)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), eos_token="</s>", pad_token="</s>")
    tensors = ((f"w{i}", loader(i)) for i in range(20))
    out = write_hf_dir(tensors, LlamaConfig(tie_word_embeddings=False), tokenizer, tmp_path, shard_bytes=1024**2)
    assert max(held) <= 5 and written[0] == 20
    assert len(list(out.glob("model-*-of-00005.safetensors"))) == 5
    assert torch.equal(hf_weights(out)["w13"], torch.full((256, 256), 13.0))


def test_command_line(run, tmp_path, capsys):
    """The real command line: a checkpoint converts; a path that is none gets one clear message."""
    checkpoint = run("deepspeed_zero2") / "checkpoints" / "step000002.ckpt"
    command = [sys.executable, "-m", "fulltune.export"]
    result = subprocess.run([*command, str(checkpoint), "--out", str(tmp_path / "hf")], cwd=REPO,
                            capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").num_parameters() == 106_816
    with pytest.raises(SystemExit) as failed:  # the same entry point, in-process
        main([str(tmp_path)])
    assert failed.value.code == 2 and "not a checkpoint this project writes" in capsys.readouterr().err
