"""Conversation rows as the chat template sees them, every problem named before anything is rendered.

Accepted (one canonical form out, whichever came in):
- OpenAI: `messages` of {role, content}; assistant `tool_calls` (arguments an object or a JSON string;
  content may be null), `role: tool` results (`tool_call_id`, `name`), a row's `tools` (function schemas),
  a turn's `weight: 0|1`, `reasoning_content` (or `reasoning` / `thinking`).
- ShareGPT / LLaMA-Factory: `conversations` of {from, value} with human / gpt / system,
  `function_call` (the value: the call as JSON, or a list of calls) and `observation` (a tool result),
  the row's `system` and `tools` (a JSON string) fields, a turn's `loss_weight`.
- Content as a string or as parts `{"type": "text", "text"|"value": ...}`; other parts are refused.

Canonical turn: {"role": system|user|assistant|tool, "content": str} plus, where they apply,
`tool_calls` [{"id", "type": "function", "function": {"name", "arguments": dict}}], `tool_call_id` and
`name` (a result takes both from the call it answers when the row leaves them out), `reasoning_content`
and `weight` (assistant turns). Canonical tools: [{"type": "function", "function": {name, ...}}].
Templates are given dicts for arguments (what transformers documents), ids where a row has none
(9 alphanumerics, derived from the row: Mistral's templates insist on that shape).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool",  # OpenAI
         "human": "user", "gpt": "assistant", "function_call": "assistant", "observation": "tool",  # ShareGPT
         "developer": "system", "ipython": "tool", "function": "tool"}  # OpenAI's newer and older names, Llama's
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
CALL_SHAPE = '{"name": ..., "arguments": {...}}'


def short(value: Any) -> str:
    """A value as an error message shows it: type and a JSON excerpt."""
    if value is None:
        return "null"
    text = json.dumps(value) if isinstance(value, str | int | float | bool | list | dict) else repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{type(value).__name__} {text}" if not isinstance(value, str) else text


def conversation(row: dict, key: str, problems: list[str]) -> dict:
    """The row's `messages`, `system` and `tools` in canonical form; `key` is the turns' name in the file."""
    turns = _turns(row.get("messages"), key, "messages" in row, problems)
    tools = _tools(row.get("tools"), problems)
    if not problems:
        _check_calls_name_tools(turns, tools, key, problems)
    system = row.get("system")
    if system not in (None, ""):
        if not isinstance(system, str):
            problems.append(f"field 'system': expected a string, got {short(system)}")
        elif turns and turns[0]["role"] == "system":
            problems.append(f"field 'system': the row has a system turn too ({key}[0]); keep one of them")
        else:
            turns.insert(0, {"role": "system", "content": system})
    return {"messages": turns, **({"tools": tools} if tools else {})}


def kind(row: dict) -> tuple:
    """What a canonical row asks of a template (roles, turn keys, tools): rows of one kind render alike."""
    keys = {(m["role"], k) for m in row["messages"] for k in m if k not in ("content", "weight")}
    return tuple(sorted(keys)), bool(row.get("tools"))


def _turns(value: Any, key: str, present: bool, problems: list[str]) -> list[dict]:
    if not isinstance(value, list) or not value:
        got = short(value) if present else "nothing (field missing)"
        problems.append(f"field '{key}': expected a non-empty list of {{role, content}} turns, got {got}")
        return []
    turns = [_turn(turn, f"{key}[{i}]", problems) for i, turn in enumerate(value)]
    if not all(turns):  # a turn without a role: its place in the conversation means nothing
        return []
    _link_results(turns, key, problems)
    assistant = [t for t in turns if t["role"] == "assistant"]
    if not assistant:
        problems.append(f"field '{key}': expected at least one assistant turn (nothing to train on)")
    elif turns[-1]["role"] != "assistant":
        problems.append(f"field '{key}[{len(turns) - 1}]': expected the last turn to be the assistant's, "
                        f"got {turns[-1]['role']}")
    elif all(t.get("weight", 1) == 0 for t in assistant):
        problems.append(f"field '{key}': every assistant turn has weight 0 (nothing to train on); set weight 1 on "
                        "the turns to learn, or drop the row")
    return turns


def _turn(turn: Any, field: str, problems: list[str]) -> dict:
    if not isinstance(turn, dict):
        problems.append(f"field '{field}': expected an object with role and content, got {short(turn)}")
        return {}
    role_key = "role" if "role" in turn else "from"
    content_key = "value" if "content" not in turn and "value" in turn else "content"
    role, content = turn.get(role_key), turn.get(content_key)
    if role not in ROLES:
        problems.append(f"field '{field}.{role_key}': expected one of {', '.join(ROLES)}, got {short(role)}")
        return {}
    out: dict = {"role": ROLES[role]}
    if role == "function_call":  # ShareGPT: the value is the call
        out["content"], out["tool_calls"] = "", _calls(_json_value(content), f"{field}.{content_key}", problems)
        return out
    calls = turn.get("tool_calls")
    if calls is None and isinstance(turn.get("function_call"), dict):  # OpenAI's older single-call field
        calls = [{"type": "function", "function": turn["function_call"]}]
    if calls is not None:
        if out["role"] != "assistant":
            problems.append(f"field '{field}.tool_calls': only assistant turns call tools, this is a {role} turn")
        out["tool_calls"] = _calls(calls, f"{field}.tool_calls", problems)
    out["content"] = _content(content, f"{field}.{content_key}", out, problems)
    for name in ("tool_call_id", "name"):
        if out["role"] == "tool" and isinstance(turn.get(name), str):
            out[name] = turn[name]
    _assistant_only(turn, field, out, problems)
    return out


def _content(content: Any, field: str, turn: dict, problems: list[str]) -> str:
    """The turn's text; what may be empty depends on the role (a call needs no text, a system turn may be
    blank, a tool may return nothing); a tool's JSON result is kept as JSON text."""
    shown = len(problems)
    if isinstance(content, list) and all(isinstance(p, dict) and "type" in p for p in content):
        content = _text_of_parts(content, field, problems)
    elif turn["role"] == "tool" and isinstance(content, dict | list):
        content = json.dumps(content, ensure_ascii=False)
    if len(problems) > shown:
        return ""
    may_be_empty = turn["role"] in ("system", "tool") or "tool_calls" in turn
    if content is None and may_be_empty:
        return ""
    if not isinstance(content, str) or (not content.strip() and not may_be_empty):
        what = "a string" if may_be_empty else "a non-empty string"
        problems.append(f"field '{field}': expected {what}, got {short(content)}")
        return ""
    return content


def _text_of_parts(parts: list, field: str, problems: list[str]) -> str | None:
    """OpenAI-style content parts, `[{"type": "text", "text": ...}]` (or the text under `value`), as one
    string, parts joined by newlines. Other parts (images, audio) a text model cannot train on: a problem."""
    texts = []
    for j, part in enumerate(parts):
        text = part.get("text", part.get("value")) if part["type"] == "text" else None
        if part["type"] != "text":
            problems.append(f"field '{field}[{j}]': a part of type {part['type']!r}: fulltune trains text-only models; "
                            "keep the text parts (describe the media in text) or drop the row")
            return None
        if not isinstance(text, str):
            problems.append(f"field '{field}[{j}]': expected a text part {{type: text, text: ...}}, got {short(part)}")
            return None
        texts.append(text)
    return "\n".join(texts)


def _assistant_only(turn: dict, field: str, out: dict, problems: list[str]) -> None:
    """Reasoning and per-turn loss weights: assistant turns only."""
    for key in (*REASONING_KEYS, "weight", "loss_weight"):
        value = turn.get(key)
        if value is None:
            continue
        if out["role"] != "assistant":
            problems.append(f"field '{field}.{key}': only assistant turns are trained, this is a {out['role']} turn; "
                            "remove it")
        elif key in REASONING_KEYS and not isinstance(value, str):
            problems.append(f"field '{field}.{key}': expected the reasoning as a string, got {short(value)}")
        elif key in REASONING_KEYS:
            out["reasoning_content"] = value
        elif isinstance(value, bool) or value not in (0, 1):
            problems.append(f"field '{field}.{key}': expected 0 (masked) or 1 (trained), got {short(value)}")
        else:
            out["weight"] = int(value)


def _json_value(value: Any) -> Any:
    """A JSON string parsed (ShareGPT stores calls and tools as strings); anything else as it is."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _calls(value: Any, field: str, problems: list[str]) -> list[dict]:
    """Tool calls as [{id, type: function, function: {name, arguments: dict}}]; a flat {name, arguments}
    (ShareGPT, some exports) and Llama's `parameters` are accepted."""
    value = [value] if isinstance(value, dict) else value
    if not isinstance(value, list) or not value:
        problems.append(f"field '{field}': expected a call {CALL_SHAPE} or a non-empty list of them, "
                        f"got {short(value)}")
        return []
    calls = []
    for j, call in enumerate(value):
        where = f"{field}[{j}]" if len(value) > 1 or field.endswith("tool_calls") else field
        fn = call.get("function", call) if isinstance(call, dict) else None
        where = f"{where}.function" if isinstance(call, dict) and "function" in call else where
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            problems.append(f"field '{where}': expected a call {CALL_SHAPE} with the tool's name, got {short(fn)}")
            continue
        args_key = "arguments" if "arguments" in fn or "parameters" not in fn else "parameters"
        arguments = _json_value(fn.get(args_key, {}))
        if not isinstance(arguments, dict):
            problems.append(f"field '{where}.{args_key}': expected the arguments as a JSON object (or a string "
                            f"holding one), got {short(fn.get(args_key))}; write them as JSON, e.g. "
                            '{"city": "Paris"}')
            continue
        out = {"type": "function", "function": {"name": fn["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str) and call["id"]:
            out["id"] = call["id"]
        calls.append(out)
    return calls


def _link_results(turns: list[dict], key: str, problems: list[str]) -> None:
    """Each tool result answers a call of the assistant turn before it (by `tool_call_id`, else in order);
    calls without ids get one, and results their call's id and name."""
    calls: list[dict] = []
    answered = made = 0
    for i, turn in enumerate(turns):
        if turn["role"] != "tool":
            for call in turn.get("tool_calls", []):
                call.setdefault("id", _call_id(call, made))
                made += 1
            calls, answered = turn.get("tool_calls", []), 0
            continue
        ids = [c["id"] for c in calls]
        wanted = turn.get("tool_call_id")
        if not calls or (wanted is None and answered >= len(calls)):
            before = turns[i - 1]["role"] if i else "nothing"
            problems.append(f"field '{key}[{i}]': a tool result with no call before it (the turn before is "
                            f"{'an assistant turn without tool_calls' if before == 'assistant' else before}); "
                            "put the assistant turn that calls the tool first, or drop the result")
            return
        if wanted is not None and wanted not in ids:
            problems.append(f"field '{key}[{i}].tool_call_id': {wanted!r} answers no call of the assistant turn "
                            f"before it (its calls: {', '.join(ids)})")
            return
        call = calls[ids.index(wanted)] if wanted is not None else calls[answered]
        turn.setdefault("tool_call_id", call["id"])
        turn.setdefault("name", call["function"]["name"])
        answered += 1


def _call_id(call: dict, index: int) -> str:
    """An id for the row's `index`-th call when the row has none: 9 alphanumerics from the call, so rows differ."""
    text = json.dumps([index, call["function"]], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:9]


def _tools(value: Any, problems: list[str]) -> list[dict]:
    """The row's tools as OpenAI function schemas; bare {name, description, parameters} are wrapped."""
    if value in (None, "", []):
        return []
    value = _json_value(value)
    if not isinstance(value, list):
        problems.append(f"field 'tools': expected a list of function schemas (or a JSON string of one), "
                        f"got {short(value)}")
        return []
    tools = []
    for k, tool in enumerate(value):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        params = fn.get("parameters", {}) if isinstance(fn, dict) else None
        if (not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip()
                or not isinstance(params, dict) or not isinstance(fn.get("description", ""), str)):
            problems.append(f"field 'tools[{k}]': expected a function schema {{type: function, function: {{name, "
                            f"description, parameters: {{type: object, properties: ...}}}}}}, got {short(tool)}")
            continue
        tools.append({"type": "function", "function": fn})
    return tools


def _check_calls_name_tools(turns: list[dict], tools: list[dict], key: str, problems: list[str]) -> None:
    """With a `tools` list, every call names one of them (a model taught to call a tool that is not offered
    learns to invent tools)."""
    offered = {t["function"]["name"] for t in tools}
    for i, turn in enumerate(turns):
        for call in turn.get("tool_calls", []) if offered else []:
            if call["function"]["name"] not in offered:
                problems.append(f"field '{key}[{i}]': calls {call['function']['name']!r}, which is not in the row's "
                                f"tools ({', '.join(sorted(offered))}); fix the name or add the tool")
