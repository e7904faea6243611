"""Security: no code runs from what a run loads, and no secret reaches what it writes.

The end-to-end checks ride on runs other tests make anyway: test_wandb's Optuna search scans every
file it wrote (config.yaml, logs, checkpoints, the W&B run) for a secret from the environment;
test_train loads its checkpoint with weights_only=True; test_bad_inputs refuses a model directory
that ships code, before that code could run.
"""

from __future__ import annotations

import pickle

import pytest
import torch
from omegaconf import OmegaConf

from fulltune.errors import user_error_message
from fulltune.export import read_checkpoint
from fulltune.models import refuse_remote_code
from fulltune.redact import REDACTED, redacted
from fulltune.safe_load import load_checkpoint_file
from fulltune.train import detached

from .conftest import compose_config


class RunsCode:
    """Unpickling this calls `open(marker, "w")`: what a hostile checkpoint does with os.system."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": RunsCode(str(marker))}, evil)
    with pytest.raises(pickle.UnpicklingError) as err:
        read_checkpoint(evil)  # `python -m fulltune.export evil.ckpt OUT`
    assert not marker.exists()
    assert "Unsupported global" in user_error_message(err.value)
    # fulltune's own hyper-parameters (OmegaConf configs) still load
    ours = tmp_path / "ours.ckpt"
    torch.save({"hyper_parameters": {"model": OmegaConf.create({"name": "tiny", "config": {"layers": [1, 2]}})}}, ours)
    assert load_checkpoint_file(ours)["hyper_parameters"]["model"].config.layers == [1, 2]


def test_secrets_are_redacted_by_key_and_by_value(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_probeSECRET1234567")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # named like one, but no secret
    config = {
        "model": {"hub_token": "typed-in", "tokenizer": "tiny", "loss_chunk_tokens": 1024, "config": {"a": [1]}},
        "logger": {"wandb": {"api_key": "abc", "notes": "token hf_probeSECRET1234567 inside", "tags": ["x"]}},
        "eval": {"task": {"max_new_tokens": 16}}, "data": {"task": [{"take_tokens": 10, "password": None}]},
    }
    out = redacted(config)
    assert out["model"] == {"hub_token": REDACTED, "tokenizer": "tiny", "loss_chunk_tokens": 1024,
                            "config": {"a": [1]}}
    assert out["logger"]["wandb"] == {"api_key": REDACTED, "notes": REDACTED, "tags": ["x"]}
    assert out["eval"] == config["eval"] and out["data"] == config["data"]  # an empty password hides nothing


def test_remote_code_runs_only_when_the_config_trusts_it(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "probe_arch", "auto_map": {"AutoConfig": "c.C"}}')
    spec = OmegaConf.create({"name": "custom", "trust_remote_code": False})
    with pytest.raises(ValueError, match=r"c\.py.*model.trust_remote_code=true"):
        refuse_remote_code(tmp_path, spec)
    spec.trust_remote_code = True
    assert refuse_remote_code(tmp_path, spec) == str(tmp_path)
    # an architecture transformers has is loaded by transformers' own code, its auto_map ignored
    (tmp_path / "config.json").write_text('{"model_type": "llama", "auto_map": {"AutoConfig": "c.C"}}')
    assert refuse_remote_code(tmp_path, OmegaConf.create({"name": "x", "trust_remote_code": False}))


def test_checkpoint_hyper_parameters_hold_no_secret_and_no_whole_config(monkeypatch, tmp_path):
    """What `fit` gives the module to save in every checkpoint: its own resolved nodes, redacted."""
    secret = "hf_probeSECRETvalue0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    cfg = compose_config(["model=tiny", "+model.hub_token=${oc.env:HF_TOKEN}", "+run_note=${oc.env:HF_TOKEN}"],
                         tmp_path, tmp_path)
    torch.save({"hyper_parameters": {"model": detached(cfg.model), "finetune": detached(cfg.finetune)}},
               tmp_path / "hparams.ckpt")
    assert secret.encode() not in (tmp_path / "hparams.ckpt").read_bytes()
    assert b"run_note" not in (tmp_path / "hparams.ckpt").read_bytes()  # no parent config rides along
    loaded = load_checkpoint_file(tmp_path / "hparams.ckpt")["hyper_parameters"]
    assert loaded["model"].hub_token == REDACTED and loaded["finetune"].method == cfg.finetune.method
