"""Conversations with tool calls: masks proven against the model's own template, token for token.

Three template styles written for these tests (tests/data/templates): Qwen3-style ChatML with tools and
reasoning dropped from history, Llama-3.1-style headers with ipython results and <|eom_id|> after a call,
Mistral-style [TOOL_CALLS] with tools beside the last question. Each runs on the tiny tokenizer with the
style's special tokens added.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from fulltune.data import DataError
from fulltune.data.formats import FormatError, encode_batch, make_renderer
from fulltune.data.inspect import describe
from fulltune.data.validate import check_source, load_rows, normalize_row
from tests.data.helpers import datamodule, tiny_tokenizer, write_jsonl

TEMPLATES = Path(__file__).parent / "data" / "templates"
STYLES = {
    "qwen": {},  # the tiny tokenizer's own ChatML tokens
    "llama31": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>"]},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>",
                "additional_special_tokens": ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                                              "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]},
}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
ONE_ROUND = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}, CALL,
             {"role": "tool", "tool_call_id": "call00001", "content": "sunny, 21 C"},
             {"role": "assistant", "content": "Sunny, 21 C."}]
TWO_ROUNDS = [*ONE_ROUND, {"role": "user", "content": "And tomorrow?"}, {"role": "assistant", "content": "Rain."}]


def reasoned(messages: list[dict]) -> list[dict]:
    """The conversation with reasoning on the call and on the last answer."""
    out = copy.deepcopy(messages)
    out[2]["reasoning_content"] = "Paris needs a lookup."
    out[-1]["reasoning_content"] = "The forecast says rain."
    return out


# (style, conversation, the trained spans as the template renders them)
CASES = {
    "qwen": (reasoned(TWO_ROUNDS), [  # the call's reasoning is history by the last question: the template drops it
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "Sunny, 21 C.<|im_end|>", "<think>\nThe forecast says rain.\n</think>\n\nRain.<|im_end|>"]),
    "llama31": (TWO_ROUNDS, [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eom_id|>', "Sunny, 21 C.<|eot_id|>",
        "Rain.<|eot_id|>"]),
    "mistral": (ONE_ROUND, [
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00001"}]</s>',
        " Sunny, 21 C.</s>"]),
}


@pytest.fixture(scope="module")
def tok(cache_dir):
    return tiny_tokenizer(cache_dir)


def styled(tok, style: str):
    """The tiny tokenizer with a style's special tokens and its template as the model's own."""
    out = copy.deepcopy(tok)
    if STYLES[style]:
        out.add_special_tokens(STYLES[style])
    out.chat_template = (TEMPLATES / f"{style}_tools.jinja").read_text()
    return out


def canonical(messages: list[dict], tools: list[dict] | None = TOOLS) -> dict:
    row, problems = normalize_row({"messages": messages, **({"tools": tools} if tools else {})}, "messages", {}, None)
    assert not problems, problems
    return row


def trained_spans(tokenizer, ids: list[int], mask: list[bool]) -> list[str]:
    mask = np.asarray(mask, dtype=np.int8)
    starts, ends = np.flatnonzero(np.diff(mask, prepend=0) == 1), np.flatnonzero(np.diff(mask, append=0) == -1) + 1
    return [tokenizer.decode(ids[a:b]) for a, b in zip(starts, ends, strict=True)]


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("style", CASES)
def test_masks_are_the_assistant_spans_of_the_models_own_template_token_for_token(tok, style):
    tokenizer = styled(tok, style)
    messages, expected = CASES[style]
    row = canonical(messages)
    enc = encode_batch([make_renderer({"format": "messages"}, tokenizer, False)(row)], tokenizer)[0]

    whole = tokenizer.apply_chat_template(row["messages"], tools=row["tools"], tokenize=False)
    assert enc.ids == ids_of(tokenizer, whole)  # the pieces, tokenized apart, are the template's tokens
    assert trained_spans(tokenizer, enc.ids, enc.mask) == expected  # calls and answers + each turn end; no more
    prompt = tokenizer.apply_chat_template(row["messages"][:-1], tools=row["tools"], tokenize=False,
                                           add_generation_prompt=True)
    assert enc.ids[: enc.completion_start] == ids_of(tokenizer, prompt)  # generation starts where training did


def test_llama_style_stops_at_either_turn_end(tok, tmp_path):
    tokenizer = styled(tok, "llama31")
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": TWO_ROUNDS, "tools": TOOLS}])
    dm = datamodule(tokenizer, tmp_path / "cache", [{"path": path, "format": "messages"}])
    assert dm.stop_token_ids == sorted(tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|eom_id|>"]))


def test_a_jinja_file_is_the_same_as_that_template_in_the_tokenizer(tok):
    row = canonical(reasoned(TWO_ROUNDS))
    from_file = make_renderer({"format": "messages", "template": str(TEMPLATES / "qwen_tools.jinja")}, tok, False)
    from_tokenizer = make_renderer({"format": "messages"}, styled(tok, "qwen"), False)
    assert from_file(row) == from_tokenizer(row)


def test_the_builtin_chatml_renders_tools_calls_results_and_reasoning(tok):
    """`template: chatml` for models whose own template has no tools (the tiny one, SmolLM2): every turn's
    reasoning kept, so it renders prefix by prefix and trains each turn as written."""
    enc = encode_batch([make_renderer({"format": "messages", "template": "chatml"}, tok, False)(
        canonical(reasoned(TWO_ROUNDS)))], tok)[0]
    text = tok.decode(enc.ids)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call these functions:\n<tools>\n"
                           + json.dumps(TOOLS[0]) + "\n</tools>")
    assert ("<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
            in text)
    assert trained_spans(tok, enc.ids, enc.mask) == [
        '<think>\nParis needs a lookup.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}\n</tool_call><|im_end|>', "Sunny, 21 C.<|im_end|>",
        "<think>\nThe forecast says rain.\n</think>\n\nRain.<|im_end|>"]
    plain = canonical([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], tools=None)
    assert tok.decode(encode_batch([make_renderer({"format": "messages", "template": "chatml"}, tok, False)(plain)],
                                   tok)[0].ids) == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"


def test_turn_weights_and_train_on_choose_the_trained_turns(tok):
    chatml = {"format": "messages", "template": "chatml"}
    weighted = copy.deepcopy(TWO_ROUNDS)
    weighted[4]["weight"] = 0  # OpenAI fine-tuning's key: this answer is context, not a target

    def spans(source, messages):
        return trained_spans(tok, *_ids_mask(make_renderer(source, tok, False)(canonical(messages)), tok))

    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    assert spans(chatml, TWO_ROUNDS) == [call, "Sunny, 21 C.<|im_end|>", "Rain.<|im_end|>"]
    assert spans(chatml, weighted) == [call, "Rain.<|im_end|>"]
    assert spans({**chatml, "train_on": "last_assistant"}, TWO_ROUNDS) == ["Rain.<|im_end|>"]


def _ids_mask(rendered, tokenizer) -> tuple[list[int], list[bool]]:
    enc = encode_batch([rendered], tokenizer)[0]
    return enc.ids, enc.mask


def test_sharegpt_function_call_rows_are_the_openai_rows():
    """LLaMA-Factory's ShareGPT: `conversations`, function_call / observation turns, `system` and `tools`
    as a JSON string of bare function schemas, `loss_weight`."""
    sharegpt = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
            {"from": "observation", "value": "sunny, 21 C"},
            {"from": "gpt", "value": "Sunny, 21 C.", "loss_weight": 0},
            {"from": "human", "value": "And tomorrow?"},
            {"from": "gpt", "value": [{"type": "text", "value": "Rain."}]}],
        "system": "Be brief.", "tools": json.dumps([TOOLS[0]["function"]])}
    openai = copy.deepcopy(TWO_ROUNDS)
    del openai[2]["tool_calls"][0]["id"], openai[3]["tool_call_id"]  # ids the rows leave out are made alike
    openai[4]["weight"] = 0
    assert normalize_row(sharegpt, "messages", {}, None) == normalize_row({"messages": openai, "tools": TOOLS},
                                                                          "messages", {}, None)
    row, _ = normalize_row(sharegpt, "messages", {}, None)
    call, result = row["messages"][2], row["messages"][3]
    assert call["tool_calls"][0]["id"].isalnum() and len(call["tool_calls"][0]["id"]) == 9  # as Mistral wants
    assert (result["tool_call_id"], result["name"]) == (call["tool_calls"][0]["id"], "get_weather")


GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
USER = {"role": "user", "content": "Weather in Paris?"}


def _call(arguments):
    return {"role": "assistant", "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": arguments}}]}


BAD_ROWS = [
    ({"messages": [USER, _call("{city: Paris}"), {"role": "tool", "content": "x"},
                   {"role": "assistant", "content": "a"}]},
     "field 'messages[1].tool_calls[0].function.arguments': expected the arguments as a JSON object (or a string "
     "holding one), got \"{city: Paris}\"; write them as JSON"),
    ({"messages": [USER, {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "a"}]},
     "field 'messages[1]': a tool result with no call before it (the turn before is user); put the assistant turn "
     "that calls the tool first, or drop the result"),
    ({"messages": [USER, _call({"city": "Paris"}), {"role": "tool", "tool_call_id": "nope", "content": "x"},
                   {"role": "assistant", "content": "a"}]},
     "field 'messages[2].tool_call_id': 'nope' answers no call of the assistant turn before it"),
    ({**GOOD, "tools": ["get_weather"]}, "field 'tools[0]': expected a function schema"),
    ({"messages": [USER, _call({"city": "Paris"})], "tools": [{"name": "get_time", "parameters": {}}]},
     "field 'messages[1]': calls 'get_weather', which is not in the row's tools (get_time); fix the name or add "
     "the tool"),
    ({"messages": [USER, _call({"city": "Paris"}), {"role": "tool", "content": "x"}]},
     "field 'messages[2]': expected the last turn to be the assistant's, got tool"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_response", "value": "x"}]},
     "field 'conversations[1].from': expected one of system, user, assistant, tool, human, gpt, function_call, "
     "observation"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "get_weather(Paris)"}]},
     "field 'conversations[1].value': expected a call {\"name\": ..., \"arguments\": {...}}"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                   {"role": "assistant", "content": "a"}]},
     "field 'messages[0].content[0]': a part of type 'image_url': fulltune trains text-only models"),
    ({"messages": [USER, {"role": "assistant", "content": "a", "weight": 0.5}]},
     "field 'messages[1].weight': expected 0 (masked) or 1 (trained), got float 0.5"),
    ({"messages": [{**USER, "weight": 1}, {"role": "assistant", "content": "a"}]},
     "field 'messages[0].weight': only assistant turns are trained, this is a user turn; remove it"),
    ({"messages": [USER, {"role": "assistant", "content": "a", "loss_weight": 0}]},
     "field 'messages': every assistant turn has weight 0 (nothing to train on)"),
]


@pytest.mark.parametrize(("row", "message"), BAD_ROWS, ids=[m.split(": ", 1)[0][7:] + m[-12:] for _, m in BAD_ROWS])
def test_each_bad_conversation_names_file_line_field_and_the_fix(tmp_path, row, message):
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD, row, GOOD])
    with pytest.raises(DataError) as err:
        load_rows({"format": "messages"}, path, None, "stop")
    assert f"{path}:2: {message}" in str(err.value)
    assert load_rows({"format": "messages"}, path, None, "skip")[1] == 1


def test_every_problem_of_a_row_is_named():
    row = {"messages": [{"role": "user", "content": "q", "weight": 1}, _call("not json"),
                        {"role": "tool", "content": "x"}, {"role": "assistant", "content": "a"}],
           "tools": "not a list"}
    _, problems = normalize_row(row, "messages", {}, None)
    assert [p.split(":")[0] for p in problems] == ["field 'messages[0].weight'",
                                                   "field 'messages[1].tool_calls[0].function.arguments'",
                                                   "field 'messages[2]'", "field 'tools'"]


def test_a_template_that_cannot_render_the_rows_is_named_before_anything_is_tokenized(tok, tmp_path):
    cache = tmp_path / "cache"
    path = write_jsonl(tmp_path / "tools.jsonl", [GOOD, GOOD, {"messages": ONE_ROUND, "tools": TOOLS}])
    dm = datamodule(tok, cache, [{"path": path, "format": "messages"}])  # the tiny ChatML template: no tools
    with pytest.raises(FormatError, match=rf"{path}:3: the chat template \(the tokenizer's\) does not render the "
                                          r"tool 'get_weather' .*template: chatml"):
        dm.setup()
    assert not (cache / "tokenized").exists()

    short_ids = copy.deepcopy(ONE_ROUND)
    short_ids[2]["tool_calls"][0]["id"] = short_ids[3]["tool_call_id"] = "call_1"
    mistral = styled(tok, "mistral")
    for messages, error in ((TWO_ROUNDS, "does not render conversations prefix by prefix"),  # tools move on
                            (short_ids, "fails on this row: Tool call IDs should be alphanumeric strings")):
        path = write_jsonl(tmp_path / "mistral.jsonl", [{"messages": messages, "tools": TOOLS}])
        with pytest.raises(FormatError, match=rf"{path}:1: .*{error}"):
            datamodule(mistral, cache, [{"path": path, "format": "messages"}]).setup()


def test_val_size_splits_what_validation_left(tok, tmp_path):
    bad = {"messages": [USER, {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "a"}]}
    path = write_jsonl(tmp_path / "rows.jsonl", [bad] * 40)
    dm = datamodule(tok, tmp_path / "cache", [{"path": path, "format": "messages", "val_size": 5}])
    with pytest.raises(DataError, match=r"(?s)40 bad row\(s\) in .*rows.jsonl:1: field 'messages\[1\]': a tool result"):
        dm.setup()
    path = write_jsonl(tmp_path / "few.jsonl", [GOOD] * 3 + [bad])
    dm = datamodule(tok, tmp_path / "cache", [{"path": path, "format": "messages", "val_size": 3}],
                    on_bad_row="skip")
    with pytest.raises(DataError, match=r"val_size=3 leaves no training rows: the file has 3 usable rows \(1 bad rows "
                                        r"skipped\); lower val_size"):
        dm.setup()


def test_inspect_marks_the_trained_spans_of_a_tool_conversation(tok, tmp_path):
    rows = [GOOD, {"messages": ONE_ROUND, "tools": TOOLS}, GOOD]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    shown = describe(datamodule(tok, tmp_path / "cache", [{"path": path, "format": "messages", "template": "chatml"}],
                                max_length=512))
    assert ('<|im_start|>assistant\n[[<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            "</tool_call><|im_end|>]]\n<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>\n"
            "<|im_start|>assistant\n[[Sunny, 21 C.<|im_end|>]]") in shown


def test_conversation_settings_of_a_source_are_checked_before_reading():
    with pytest.raises(DataError, match="train_on='last': expected one of all_assistant, last_assistant"):
        check_source({"path": "x.jsonl", "format": "messages", "train_on": "last"}, "data.task[0]")
    with pytest.raises(DataError, match="template 'nope.jinja': no such file"):
        check_source({"path": "x.jsonl", "format": "messages", "template": "nope.jinja"}, "data.task[0]")
    with pytest.raises(DataError, match="template 'qwen' is not one of auto, tokenizer, chatml or a .jinja file"):
        check_source({"path": "x.jsonl", "format": "messages", "template": "qwen"}, "data.task[0]")
