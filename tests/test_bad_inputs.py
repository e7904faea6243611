"""The bad-input corpus: everything a user can get wrong gets one message naming the file, line, key
and fix, in seconds, before any weights load, and changes nothing it was given or found.

Each case runs `fulltune.train.train` in-process on the tiny model (or a model config whose weights
are the problem), composed as `python train.py` composes it; `main` prints that error alone and exits
with code 2 (`test_the_command_line_prints_the_message_alone_with_exit_code_2`). The inputs are the
files in tests/bad_inputs/, copied into a work dir, or built there by the case where they are big or
cannot live in git (a 2 MB row, an unreadable file, a model directory with code). Beside them lies an
earlier run's output dir; every file under the case's root is hashed before and after. An unchanged
tree also shows that no weights loaded: a run writes config.yaml before `trainer.fit`, where weights
load, and the new run's dir is inside the tree.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from fulltune.data.validate import load_rows
from fulltune.errors import exit_on_user_error, user_error_message
from fulltune.preflight import ConfigError, check_command_line
from fulltune.train import train

from .conftest import REPO, TINY_FAST, compose_config
from .data.helpers import tiny_tokenizer

CORPUS = Path(__file__).parent / "bad_inputs"
NOBODY = 65534
SECONDS = 15  # "in seconds", with room for a loaded 2-core machine; the cases take about 1 s each
BASE = [*TINY_FAST, "data.replay=[]", "data.replay_ratio=0.0", "data.demo_dir=null", "eval.forgetting=null"]
GOOD_ROW = {"instruction": "Add one.", "input": "1 plus one", "output": "2"}


@dataclass(frozen=True)
class Case:
    id: str
    message: str | tuple[str, ...]  # fragment(s) the message holds; {work} is the work dir
    task: dict | None = None  # the task source, paths relative to the work dir
    overrides: tuple[str, ...] = ()  # {work} and {earlier} are filled in
    build: Callable[[Path, object], None] | None = None  # (work dir, the tiny tokenizer)
    env: dict = field(default_factory=dict)
    absent: str | None = None  # what the message must not say
    as_nobody: bool = False  # permissions bind root too only through another user: run it as `nobody`


def alpaca(path: str, **extra) -> dict:
    return {"path": path, "format": "alpaca", "template": "instruction", "val_path": "good.jsonl", **extra}


def chat(path: str, **extra) -> dict:
    return {"path": path, "format": "messages", "val_path": "content_parts.jsonl", **extra}


def write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


def huge_row(work: Path, _tok) -> None:
    """A 2 MB answer whose row never closes: the message names the line, and stays short."""
    write(work / "huge_row.jsonl", json.dumps(GOOD_ROW) + '\n{"instruction": "Echo.", "output": "'
          + "ab" * 1_000_000 + '"\n')


def unreadable(work: Path, _tok) -> None:
    shutil.copy(work / "good.jsonl", work / "locked.jsonl")
    (work / "locked.jsonl").chmod(0)


def directory(work: Path, _tok) -> None:
    (work / "train_dir").mkdir()
    shutil.copy(work / "good.jsonl", work / "train_dir" / "part-0.jsonl")


def compressed(work: Path, _tok) -> None:
    write(work / "train.jsonl.gz", gzip.compress((work / "good.jsonl").read_bytes()))


def read_only(work: Path, _tok) -> None:
    (work / "readonly").mkdir()
    (work / "readonly").chmod(0o555)


def custom_code_model(work: Path, _tok) -> None:
    """A model dir whose config maps its architecture to its own code; running it leaves a mark."""
    model = work / "custom_model"
    write(model / "config.json", json.dumps({"model_type": "probe_arch", "auto_map": {
        "AutoConfig": "configuration_probe.ProbeConfig", "AutoModelForCausalLM": "modeling_probe.ProbeModel"}}))
    write(model / "configuration_probe.py", f"open({str(work / 'code_ran')!r}, 'w').close()\n")


def tokenizer_variant(name: str, **changes) -> Callable[[Path, object], None]:
    def build(work: Path, tok) -> None:
        import copy

        variant = copy.deepcopy(tok)
        for key, value in changes.items():
            setattr(variant, key, value)
        variant.save_pretrained(work / name)

    return build


CASES = [
    # -- data files -------------------------------------------------------------------------------
    Case("malformed_json", "malformed_json.jsonl:2: invalid JSON", alpaca("malformed_json.jsonl")),
    Case("missing_field", "missing_field.jsonl:2: field 'output': expected a non-empty string, got nothing",
         alpaca("missing_field.jsonl")),
    Case("empty_field", 'empty_field.jsonl:2: field \'output\': expected a non-empty string, got ""',
         alpaca("empty_field.jsonl")),
    Case("non_string_field", "non_string_field.jsonl:2: field 'output': expected a non-empty string, got int 3",
         alpaca("non_string_field.jsonl")),
    Case("empty_file", ("empty.jsonl: the file is empty", "source 'empty'"), alpaca("empty.jsonl")),
    Case("only_blank_lines", "blank_lines.jsonl: no usable rows", alpaca("blank_lines.jsonl")),
    Case("directory_for_a_file", "train_dir: a directory, not a file", alpaca("train_dir"), build=directory),
    Case("unreadable_file", ("locked.jsonl: cannot be read (Permission denied)", "chmod a+r"),
         alpaca("locked.jsonl"), build=unreadable, as_nobody=True),
    Case("non_utf8_bytes", ("latin1.jsonl:2: not UTF-8 text (byte 0xe9 at column 64)", "iconv -f CP1252 -t UTF-8"),
         alpaca("latin1.jsonl")),
    Case("utf16_file", ("utf16.jsonl: UTF-16 text", "iconv -f UTF-16 -t UTF-8"), alpaca("utf16.jsonl")),
    Case("two_megabyte_row", "huge_row.jsonl:2: invalid JSON", alpaca("huge_row.jsonl"), build=huge_row),
    Case("mixed_formats", "mixed_formats.jsonl:2: a row of format messages (fields messages) in a source of format "
         "alpaca", alpaca("mixed_formats.jsonl")),
    Case("unknown_role", "unknown_role.jsonl:2: field 'messages[1].role': expected one of system, user, assistant",
         chat("unknown_role.jsonl")),
    Case("no_assistant_turn", "no_assistant.jsonl:2: field 'messages': expected at least one assistant turn",
         chat("no_assistant.jsonl")),
    Case("image_content_part", "image_part.jsonl:2: field 'messages[0].content[1]': a part of type 'image_url': "
         "fulltune trains text-only models",
         chat("image_part.jsonl")),
    Case("not_parquet", "not_parquet.parquet: not a Parquet file", alpaca("not_parquet.parquet")),
    Case("compressed_file", "train.jsonl.gz: unsupported file type '.gz'", alpaca("train.jsonl.gz"),
         build=compressed),
    Case("own_column_names", ("renamed_columns.csv:2: field 'instruction'", "columns: {{instruction: prompt}}"),
         alpaca("renamed_columns.csv")),
    Case("missing_file", "nope.jsonl: no such file", alpaca("nope.jsonl")),
    Case("misspelled_source_key", "data.task[0]: unknown key 'val_pth' (did you mean 'val_path'?)",
         {"path": "good.jsonl", "format": "alpaca", "val_pth": "good.jsonl"}),
    Case("no_validation_split", ("eval.task scores the task's validation split", "eval.task=null"),
         {"path": "good.jsonl", "format": "alpaca", "template": "instruction"}),
    # -- models and tokenizers --------------------------------------------------------------------
    Case("model_path_missing", "model.pretrained='{work}/no_such_model': no such directory",
         overrides=("model=smollm2_135m", "model.pretrained={work}/no_such_model", "model.gguf=null")),
    Case("hub_id_offline", ("HF_HUB_OFFLINE=1", "hf download HuggingFaceTB/SmolLM2-135M-Instruct --local-dir"),
         overrides=("model=smollm2_135m", "model.name=offline_probe", "model.gguf=null"),
         env={"HF_HUB_OFFLINE": "1"}),
    Case("no_weights_anywhere", "model.pretrained and model.gguf are both null", absent="smollm2",
         overrides=("model=smollm2_135m", "model.name=no_weights", "model.pretrained=null", "model.gguf=null")),
    Case("model_ships_code", ("does not run code from a model directory", "model.trust_remote_code=true"),
         overrides=("model=smollm2_135m", "model.name=custom", "model.pretrained={work}/custom_model",
                    "model.gguf=null"), build=custom_code_model),
    Case("tokenizer_path_missing", "model.tokenizer='{work}/no_tokenizer': no such directory",
         overrides=("model.tokenizer={work}/no_tokenizer",)),
    Case("tokenizer_without_chat_template", "template=tokenizer but the tokenizer has no chat template",
         chat("content_parts.jsonl", template="tokenizer"), overrides=("model.tokenizer={work}/tok_no_template",),
         build=tokenizer_variant("tok_no_template", chat_template=None)),
    Case("tokenizer_without_eos_or_pad", "the tokenizer has no eos_token",
         alpaca("good.jsonl"), overrides=("model.tokenizer={work}/tok_no_eos",),
         build=tokenizer_variant("tok_no_eos", eos_token=None, pad_token=None)),
    # -- hardware, outputs, combinations ----------------------------------------------------------
    Case("fp16_on_cpu", "precision=16-mixed (fp16) needs a CUDA GPU", overrides=("precision=fp16_mixed",)),
    Case("more_gpus_than_exist", "trainer.accelerator=gpu but no CUDA GPU is visible",
         overrides=("trainer.accelerator=gpu", "trainer.devices=2")),
    Case("unknown_gpu", "gpu=H100: not a GPU the memory plan knows. Did you mean gpu=H100-80GB",
         overrides=("gpu=H100", "dry_run=true")),
    Case("lora_under_fsdp", "finetune=lora with strategy=fsdp is not supported",
         overrides=("finetune=lora", "strategy=fsdp")),
    Case("read_only_output_dir", "is not writable by this user", overrides=("paths.output_dir={work}/readonly/run",),
         build=read_only, as_nobody=True),
    Case("reused_run_dir", "already holds a run", overrides=("paths.output_dir={earlier}",)),
]


def tree_hashes(root: Path) -> dict[str, str]:
    """Every file and directory under root: content hashes (directories and unreadable files by name)."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_file() and path.stat().st_mode & stat.S_IRUSR:
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[key] = oct(path.stat().st_mode)
    return out


@contextmanager
def effective_user(uid: int | None) -> Iterator[None]:
    """Run the block as `uid` (root passes every permission check); as other users, as they are."""
    if uid is None or os.geteuid() != 0:
        yield
        return
    os.setegid(uid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture(scope="module")
def tiny(cache_dir):
    return tiny_tokenizer(cache_dir)


@pytest.fixture
def case_root() -> Iterator[Path]:
    """A root another user can enter (pytest's tmp dirs are root's alone): work/ and an earlier run."""
    root = Path(tempfile.mkdtemp(prefix="fulltune-bad-input-"))
    root.chmod(0o777)
    yield root
    for path in root.rglob("*"):
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    shutil.rmtree(root)


def earlier_run(run: Path) -> None:
    """What an earlier run left: its config, summary, metrics and a checkpoint."""
    write(run / "config.yaml", "run_name: earlier\n")
    write(run / "summary.json", json.dumps({"global_step": 8}))
    write(run / "csv" / "metrics.csv", "step,train/loss\n0,6.2\n")
    write(run / "checkpoints" / "last.ckpt", os.urandom(4096))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_its_message_and_changes_nothing(case, case_root, cache_dir, tiny, monkeypatch):
    work, earlier = case_root / "work", case_root / "earlier_run"
    shutil.copytree(CORPUS, work)
    write(work / "good.jsonl", "".join(json.dumps(GOOD_ROW) + "\n" for _ in range(4)))
    earlier_run(earlier)
    cache = cache_dir
    if case.as_nobody:  # its own cache, holding the tokenizer, that `nobody` can read
        cache = case_root / "cache"
        shutil.copytree(cache_dir / "tokenizers", cache / "tokenizers")
    if case.build:
        case.build(work, tiny)
    for path in [case_root, *case_root.rglob("*")] if case.as_nobody else []:
        if path.is_dir() and path.name != "readonly":
            path.chmod(0o777)  # `nobody` may write where the run would: the message is about the one path
    fill = {"work": str(work), "earlier": str(earlier)}
    overrides = [o.format(**fill) for o in case.overrides]
    keys = {o.partition("=")[0] for o in overrides}
    base = [o for o in BASE if o.partition("=")[0] not in keys]  # Hydra refuses two values for one group
    cfg = compose_config([*base, *overrides], case_root / "run", cache)
    with open_dict(cfg):
        if case.task is not None:
            cfg.data.task = [{k: str(work / v) if k in ("path", "val_path") else v for k, v in case.task.items()}]
        for override in overrides:
            key, _, value = override.partition("=")
            if key.startswith("paths."):  # compose_config pins the paths; the case moves one
                OmegaConf.update(cfg, key, value)
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    before = tree_hashes(case_root)

    started = time.perf_counter()
    with effective_user(NOBODY if case.as_nobody else None), pytest.raises(Exception) as raised:
        train(cfg)
    seconds = time.perf_counter() - started

    message = user_error_message(raised.value)  # what `main` prints (a ConfigError, maybe Hydra-wrapped)
    assert message is not None, raised.value
    for fragment in [case.message] if isinstance(case.message, str) else case.message:
        assert fragment.format(**fill) in message
    assert case.absent is None or case.absent not in message.lower()
    assert len(message) < 1500, message[:300]  # one readable message, even for a 2 MB row
    assert seconds < SECONDS
    assert tree_hashes(case_root) == before  # inputs, the earlier run, no new run dir, no code ran


def test_accepted_inputs_read_like_their_plain_forms(tmp_path):
    """A UTF-8 BOM, and content parts (OpenAI `text`, and the text under `value`) are read, not refused."""
    assert load_rows({"format": "alpaca"}, str(CORPUS / "bom_utf8.jsonl"), None, "stop") == ([GOOD_ROW] * 3, 0)
    rows, bad = load_rows({"format": "messages"}, str(CORPUS / "content_parts.jsonl"), None, "stop")
    assert bad == 0 and [[t["content"] for t in r["messages"]] for r in rows] == [
        ["1 plus one?\nDigits only.", "2"], ["2 plus one?", "3"]]
    csv_bom = tmp_path / "bom.csv"
    csv_bom.write_bytes(b"\xef\xbb\xbfinstruction,output\nAdd one to 1.,2\n")
    assert load_rows({"format": "alpaca"}, str(csv_bom), None, "stop")[0] == [
        {"instruction": "Add one to 1.", "input": "", "output": "2"}]


def test_group_options_and_keys_are_checked_before_hydra(capsys):
    with pytest.raises(ConfigError, match=r"model=tinny: no such option.*Did you mean 'tiny'"):
        check_command_line(["model=tinny"])
    with pytest.raises(SystemExit) as exit_code, exit_on_user_error():
        check_command_line(["trainer.max_stepz=3"])
    assert exit_code.value.code == 2
    assert capsys.readouterr().err.startswith("error: Unknown config key 'trainer.max_stepz'. Did you mean")


@pytest.mark.parametrize("multirun", [False, True], ids=["run", "multirun"])
def test_a_read_only_log_dir_is_named_before_hydra_creates_the_run_dir(multirun):
    """Hydra creates `hydra.run.dir` (`hydra.sweep.dir`) under `paths.log_dir` before any fulltune code
    runs, and would fail there with its own trace: the launch check names the key first. /proc/1 is
    read-only for every user, root too (and the check reads the repo's config as this user)."""
    overrides = ["paths.log_dir=/proc/1/logs", *(["optimizer.lr=1e-5,2e-5"] if multirun else [])]
    with pytest.raises(ConfigError, match=r"paths.log_dir=/proc/1/logs: /proc/1 is not writable"):
        check_command_line(overrides, multirun=multirun)
    with pytest.raises(ConfigError, match=r"hydra.run.dir=/proc/1/x: /proc/1 is not writable"):
        check_command_line(["hydra.run.dir=/proc/1/x"])


def test_traces_are_shown_only_when_asked(monkeypatch):
    with pytest.raises(ConfigError), exit_on_user_error(debug=True):
        raise ConfigError("shown with its trace")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError), exit_on_user_error():
        raise ConfigError("shown with its trace")
    monkeypatch.delenv("HYDRA_FULL_ERROR")
    with pytest.raises(KeyError), exit_on_user_error():  # a bug keeps its trace
        raise KeyError("not a user error")
    full = OSError(28, "No space left on device", "/data/ckpt")
    assert user_error_message(full) == "No space left on device: /data/ckpt; free space there, or point " \
        "paths.log_dir / paths.output_dir (outputs, checkpoints) or paths.cache_dir (token caches, converted " \
        "models) at a disk with room"


def test_the_command_line_prints_the_message_alone_with_exit_code_2(tmp_path):
    """The real entry point: a user error inside the Hydra app is one line on stderr and exit code 2
    (`debug=true` passes the same switch as `test_traces_are_shown_only_when_asked`)."""
    args = [sys.executable, "train.py", "model=tiny", "precision=fp16_mixed", f"hydra.run.dir={tmp_path}/run"]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: precision=16-mixed (fp16) needs a CUDA GPU")
    assert "Traceback" not in result.stderr and "Error executing job" not in result.stderr
