"""Formats: what is in the loss (completion-only masks, EOS), and fail-fast row validation."""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fulltune.data import DataError
from fulltune.data.formats import FormatError, encode_batch, make_renderer
from fulltune.data.validate import check_source, load_rows, normalize_row
from tests.data.helpers import alpaca_rows, datamodule, tiny_tokenizer, variant, write_jsonl

# SmolLM2-Instruct's template: a default system turn when the conversation has none.
SYSTEM_DEFAULT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok(cache_dir):
    return tiny_tokenizer(cache_dir)


def render(tokenizer, source, rows, train_on_prompt=False):
    """(full text, text of the label tokens, prompt text, encoded) for each row."""
    renderer = make_renderer(source, tokenizer, train_on_prompt)
    out = []
    for enc in encode_batch([renderer(r) for r in rows], tokenizer):
        labels = [i for i, m in zip(enc.ids, enc.mask, strict=True) if m]
        out.append((tokenizer.decode(enc.ids), tokenizer.decode(labels),
                    tokenizer.decode(enc.ids[: enc.completion_start]), enc))
    return out


CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "first question"},
    {"role": "assistant", "content": "first answer"},
    {"role": "user", "content": "second question"},
    {"role": "assistant", "content": "second answer"},
]}


def test_alpaca_trains_only_the_answer_and_eos(tok):
    assert tok.pad_token_id == tok.eos_token_id  # the "model never stops" setting
    row = {"instruction": "Convert the date.", "input": "7 March 2024", "output": "2024-03-07"}
    text, labels, prompt, enc = render(tok, {"format": "alpaca", "template": "instruction"}, [row])[0]
    assert text == ("### Instruction:\nConvert the date.\n\n### Input:\n7 March 2024\n\n### Response:\n"
                    "2024-03-07<|im_end|>")
    assert labels == "2024-03-07<|im_end|>"
    assert prompt == text.removesuffix(labels)
    assert enc.ids[-1] == tok.eos_token_id and enc.mask[-1]

    no_input = dict(row, input="")
    assert "### Input" not in render(tok, {"format": "alpaca", "template": "alpaca"}, [no_input])[0][0]
    _, all_labels, _, enc = render(tok, {"format": "alpaca", "template": "instruction"}, [row], train_on_prompt=True)[0]
    assert sum(enc.mask) == len(enc.ids) - 1  # everything but position 0, which nothing predicts


def test_messages_mask_every_assistant_turn_with_chatml_fallback(tok):
    no_template = variant(tok, chat_template=None)
    text, labels, prompt, _ = render(no_template, {"format": "messages"}, [CONVERSATION])[0]
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nfirst question<|im_end|>\n"
                    "<|im_start|>assistant\nfirst answer<|im_end|>\n<|im_start|>user\nsecond question<|im_end|>\n"
                    "<|im_start|>assistant\nsecond answer<|im_end|>\n")
    assert labels == "first answer<|im_end|>second answer<|im_end|>"  # turn end learned, user turns masked
    assert prompt.endswith("second question<|im_end|>\n<|im_start|>assistant\n")


def test_messages_with_the_tokenizers_template_match_apply_chat_template(tok):
    smol_like = variant(tok, chat_template=SYSTEM_DEFAULT_TEMPLATE)
    conversation = {"messages": CONVERSATION["messages"][1:]}  # no system turn: the template adds one
    text, labels, prompt, enc = render(smol_like, {"format": "messages"}, [conversation])[0]
    expected = smol_like.apply_chat_template(conversation["messages"], tokenize=False)
    assert text == expected
    assert labels == "first answer<|im_end|>second answer<|im_end|>"
    assert prompt == smol_like.apply_chat_template(conversation["messages"][:-1], tokenize=False,
                                                   add_generation_prompt=True)
    sharegpt, problems = normalize_row(
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "messages",
        {"messages": "conversations"}, None)
    assert not problems
    assert render(smol_like, {"format": "messages"}, [sharegpt])[0][1] == "a<|im_end|>"


def test_a_template_that_rewrites_earlier_turns_is_refused(tok):
    counting = variant(tok, chat_template="{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(FormatError, match="prefix by prefix.*template: chatml"):
        render(counting, {"format": "messages"}, [CONVERSATION])


def test_classification_and_text(tok):
    source = {"format": "classification", "labels": ["positive", "negative"], "template": "instruction"}
    rows = [{"text": "It broke.", "label": "negative"}, {"text": "Lovely.", "label": 0}]
    (_, neg, prompt, _), (_, pos, _, _) = render(tok, source, rows)
    assert (neg, pos) == ("negative<|im_end|>", "positive<|im_end|>")
    assert "Answer with one of: positive, negative." in prompt
    text, labels, _, enc = render(tok, {"format": "text"}, [{"text": "the river rises"}])[0]
    assert text == "the river rises<|im_end|>" and sum(enc.mask) == len(enc.ids) - 1


def test_eos_is_in_the_labels_of_every_training_example_when_pad_is_eos(tok, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(20))
    chat = write_jsonl(tmp_path / "c.jsonl", [CONVERSATION] * 5)
    dm = datamodule(tok, tmp_path / "cache", [{"path": path, "format": "alpaca"},
                                             {"path": chat, "format": "messages"}], batch_size=5)
    for batch in dm.train_dataloader():
        labels = batch["labels"]
        assert ((labels == tok.eos_token_id).sum(1) >= 1).all()
        assert (labels[batch["attention_mask"] == 0] == -100).all()


BAD_ROWS = [
    ('{"instruction": "x", "input": "", "output": 5}', "alpaca",
     "1: field 'output': expected a non-empty string, got int 5"),
    ('{"instruction": "x"}', "alpaca", "1: field 'output': expected a non-empty string, got nothing (field missing)"),
    ('{"instruction": "  ", "output": "y"}', "alpaca", "1: field 'instruction': expected a non-empty string"),
    ('{"instruction": "x", "output": "y"', "alpaca", "1: invalid JSON"),
    ('["not", "an", "object"]', "alpaca", "1: expected an object with fields instruction, input, output"),
    ('{"text": ""}', "text", "1: field 'text': expected a non-empty string, got \"\""),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "messages",
     "1: field 'messages[0].role': expected one of system, user, assistant"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "messages",
     "1: field 'messages': expected at least one assistant turn"),
    ('{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}', "messages",
     "1: field 'messages[1]': expected the last turn to be the assistant's, got user"),
    ('{"messages": []}', "messages", "1: field 'messages': expected a non-empty list"),
    ('{"text": "ok", "label": "meh"}', "classification", "1: field 'label': expected one of ['pos', 'neg']"),
    ('{"text": "ok", "label": 7}', "classification",
     "1: field 'label': expected one of ['pos', 'neg'] or an index 0..1"),
]


@pytest.mark.parametrize(("line", "fmt", "message"), BAD_ROWS, ids=[m.split(": ", 1)[1][:40] for *_, m in BAD_ROWS])
def test_each_bad_row_names_file_line_field_and_expectation(tmp_path, line, fmt, message):
    good = {"alpaca": '{"instruction": "i", "output": "o"}', "text": '{"text": "t"}',
            "messages": '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
            "classification": '{"text": "t", "label": "pos"}'}[fmt]
    path = write_jsonl(tmp_path / "rows.jsonl", [line, good, good])
    source = {"format": fmt, "labels": ["pos", "neg"]}
    with pytest.raises(DataError) as err:
        load_rows(source, path, None, "stop")
    assert f"{path}:{message}" in str(err.value)
    assert "on_bad_row=skip" in str(err.value)
    rows, bad = load_rows(source, path, None, "skip")
    assert (len(rows), bad) == (2, 1)


def test_bad_settings_and_files_fail_before_tokenizing(tok, tmp_path):
    with pytest.raises(DataError, match=r"unknown key 'ouput_field'.*valid keys"):
        check_source({"path": "x.jsonl", "format": "alpaca", "ouput_field": 1}, "data.task[0]")
    with pytest.raises(DataError, match=r"unknown key 'val_pth' \(did you mean 'val_path'\?\)"):
        check_source({"path": "x.jsonl", "format": "alpaca", "val_pth": "y"}, "data.task[0]")
    with pytest.raises(DataError, match="format 'alpacca' is not one of .*did you mean 'alpaca'"):
        check_source({"path": "x.jsonl", "format": "alpacca"}, "data.task[0]")
    with pytest.raises(DataError, match="data.replay_ratio=0.2 but data.replay has no sources"):
        datamodule(tok, tmp_path, [{"path": "x.jsonl", "format": "alpaca"}], replay_ratio=0.2)
    with pytest.raises(DataError, match=r"replay\[0\]: replay sources are pretraining text"):
        datamodule(tok, tmp_path, [{"path": "x.jsonl", "format": "alpaca"}],
                   replay=[{"path": "y.jsonl", "format": "alpaca"}], replay_ratio=0.1)
    missing = datamodule(tok, tmp_path, [{"path": str(tmp_path / "nope.jsonl"), "format": "alpaca"}])
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nope.jsonl'}: no such file")):
        missing.setup()
    # A bad row in the second source stops the run before the first source is tokenized.
    good = write_jsonl(tmp_path / "good.jsonl", alpaca_rows(4))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x", "output": ""}])
    dm = datamodule(tok, tmp_path / "cache", [{"path": good, "format": "alpaca"}, {"path": bad, "format": "alpaca"}])
    with pytest.raises(DataError, match="bad.jsonl:1: field 'output'"):
        dm.setup()
    assert not (tmp_path / "cache" / "tokenized").exists()


def test_csv_parquet_txt_and_json_sources_read_with_their_locations(tmp_path):
    csv_path = tmp_path / "rows.csv"
    csv_path.write_text("prompt,answer\nq1,a1\nq2,\n")
    with pytest.raises(DataError, match=r"rows.csv:3: field 'output'"):  # line 3: header is line 1
        load_rows({"format": "alpaca", "columns": {"instruction": "prompt", "output": "answer"}}, str(csv_path),
                  None, "stop")
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["one", "two"], "label": [0, 1]}), parquet)
    rows, _ = load_rows({"format": "classification", "labels": ["a", "b"]}, str(parquet), None, "stop")
    assert rows == [{"text": "one", "label": 0}, {"text": "two", "label": 1}]
    txt = tmp_path / "corpus.txt"
    txt.write_text("first doc\nstill first\n\nsecond doc\n\n\nthird\n")
    rows, _ = load_rows({"format": "text", "sample_by": "paragraph"}, str(txt), None, "stop")
    assert [r["text"] for r in rows] == ["first doc\nstill first", "second doc", "third"]
    array = tmp_path / "rows.json"
    array.write_text('[{"text": "a"}, {"text": 3}]')
    with pytest.raises(DataError, match=r"rows.json row 1: field 'text'"):
        load_rows({"format": "text"}, str(array), None, "stop")


def test_hub_sources_are_read_through_datasets_with_row_numbers(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return [{"text": "fine"}, {"text": None}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(DataError, match=r"org/corpus row 1: field 'text'"):
        load_rows({"format": "text", "subset": "en"}, "org/corpus", "validation", "stop")
    assert calls == [("org/corpus", "en", "validation")]


def test_the_fast_path_tokenizes_exactly_like_the_tokenizer_call(tok):
    texts = ["### Response:\n", "2024-03-07", "<|im_start|>user\nhi<|im_end|>\n", " the river  rises\t"]
    source = {"format": "alpaca", "template": "instruction"}
    renderer = make_renderer(source, tok, False)
    enc = encode_batch([renderer({"instruction": t, "input": "", "output": t}) for t in texts], tok)
    prompts = [renderer({"instruction": t, "input": "", "output": t}).pieces[1][0] for t in texts]
    for e, prompt, text in zip(enc, prompts, texts, strict=True):
        expected = tok(prompt, add_special_tokens=False)["input_ids"] + tok(text, add_special_tokens=False)["input_ids"]
        assert e.ids == [*expected, tok.eos_token_id]


def test_a_template_without_a_turn_end_token_gets_eos_appended(tok):
    plain = variant(tok, chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                       "{% if add_generation_prompt %}assistant: {% endif %}")
    text, labels, prompt, enc = render(plain, {"format": "messages"}, [CONVERSATION])[0]
    assert labels == "first answer\n<|im_end|>second answer\n<|im_end|>"
    assert prompt.endswith("user: second question\nassistant: ")
    assert make_renderer({"format": "messages"}, plain, False).turn_end is None
