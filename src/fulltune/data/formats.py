"""Row formats: how one row becomes text pieces, each either in the loss or masked.

A renderer turns a row into `Rendered.pieces`: text (or token ids) with a flag saying whether its tokens
are labels. Pieces are tokenized separately and concatenated, so the prompt a model is evaluated on
(`prompt_ids`) is exactly the token prefix it was trained on.

Formats (`format:` of a source):
- `alpaca`: instruction / input (optional) / output, rendered with `template` (`alpaca`: the Stanford
  prompt, `instruction`: the same headings without the preamble, `chat`: the tokenizer's chat template).
- `messages`: conversations (OpenAI or ShareGPT / LLaMA-Factory rows, tool calls, tool results, a row's
  tools and reasoning included: conversations.py), rendered with the tokenizer's chat template
  (`auto`, `tokenizer`), the built-in `chatml` (ChatML with Qwen-style `<tool_call>` tags and `<think>`
  reasoning; `auto` when the tokenizer has no template) or a `.jinja` file; every assistant turn is trained
  (tool calls and reasoning included), unless a turn's `weight` is 0 or `train_on: last_assistant`.
- `text`: raw text, every token in the loss.
- `classification`: text + label, trained as `instruction` + text -> the label word (alpaca rendering).

EOS: plain templates end the answer with the tokenizer's EOS id; chat templates end each assistant
turn with the template's own turn-end token (`<|im_end|>`, `<|eot_id|>`, `<|eom_id|>` after a call...).
It is always a label — masks are positional, so `pad_token == eos_token` cannot hide it.

How a chat template is split: the whole conversation is rendered once; each trained assistant turn starts
where the rendering of the conversation before it (with the generation prompt) ends, and runs to the end
of its own rendering, or, when the template renders it differently once later turns follow (reasoning
dropped from history), to its turn-end token. A template that does not render the conversation before a
turn as a prefix of the whole, or drops what a row holds (tool calls, tools, results, reasoning), is
refused with the row and a fix: the mask is never a guess.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fulltune.preflight import ConfigError

FORMATS = ("alpaca", "messages", "text", "classification")

PLAIN_TEMPLATES = {
    # (with input, without input)
    "alpaca": (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n",
    ),
    "instruction": (
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "### Instruction:\n{instruction}\n\n### Response:\n",
    ),
}
CHAT_TEMPLATES = ("auto", "tokenizer", "chatml")
TRAIN_ON = ("all_assistant", "last_assistant")
# The built-in `chatml`: ChatML; calls and results as Qwen2.5 / Hermes write them (a shorter tools preamble:
# it costs tokens in every example); reasoning in <think>
# tags, kept in every turn (so the template renders conversations prefix by prefix). `<|im_end|>` stands for
# the tokenizer's turn end (EOS where <|im_end|> is not one token).
CHATML_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\n' }}{%- if messages[0].role == 'system' %}"
    "{{- messages[0].content + '\n\n' }}{%- endif %}"
    "{{- '# Tools\n\nYou may call these functions:\n<tools>' }}"
    "{%- for tool in tools %}{{- '\n' + tool | tojson }}{%- endfor %}"
    "{{- '\n</tools>\n\nTo call one, write <tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}{%- if not (tools and loop.first) %}"
    "{{- '<|im_start|>system\n' + message.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant\n' }}"
    "{%- if message.reasoning_content %}{{- '<think>\n' + message.reasoning_content + '\n</think>\n\n' }}"
    "{%- endif %}{{- message.content }}"
    "{%- for call in message.tool_calls or [] %}{%- if message.content or not loop.first %}{{- '\n' }}{%- endif %}"
    "{{- '<tool_call>\n{\"name\": \"' + call.function.name + '\", \"arguments\": ' + "
    "call.function.arguments | tojson + '}\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
FIX = ("use a template that renders them: template: chatml (ChatML with <tool_call> tags and <think> reasoning) "
       "or template: path/to/your.jinja")
DEFAULT_CLASSIFICATION_INSTRUCTION = "Classify the text. Answer with one of: {labels}."

Piece = tuple[str | list[int], bool]


class FormatError(ConfigError):
    """A source whose format settings cannot work with this tokenizer; the message says the fix."""


@dataclass
class Rendered:
    """One row as pieces; `answer_piece` indexes the final completion (None for plain text)."""

    pieces: list[Piece]
    answer_piece: int | None = None
    answer: str | None = None


@dataclass
class Renderer:
    """Renders rows of one source; picklable, so tokenizer worker processes can use it."""

    format: str
    template: str  # resolved: a plain template's name; chat: tokenizer | chatml | a .jinja path
    eos_id: int
    bos_ids: list[int]
    train_on_prompt: bool = False
    instruction: str | None = None
    labels: list[str] | None = None
    chat_template: str | None = None  # the Jinja chat template
    turn_ends: tuple[str, ...] = ()  # texts of the tokens that end an assistant turn (answer first, then a call)
    special_tokens: dict = field(default_factory=dict)  # bos_token, eos_token... as templates expect
    train_on: str = "all_assistant"

    @property
    def turn_end(self) -> str | None:
        """The token an answer ends with."""
        return self.turn_ends[0] if self.turn_ends else None

    def __call__(self, row: dict) -> Rendered:
        if self.format == "text":
            return Rendered([(self.bos_ids, False), (row["text"], True), ([self.eos_id], True)])
        if self.format == "messages":
            return self._chat(row)
        if self.format == "classification":
            label = row["label"]
            label = self.labels[label] if isinstance(label, int) else label
            row = {"instruction": self.instruction.replace("{labels}", ", ".join(self.labels)),
                   "input": row["text"], "output": label}
        if self.template in PLAIN_TEMPLATES:
            with_input, without_input = PLAIN_TEMPLATES[self.template]
            prompt = (with_input if row.get("input") else without_input).format(**row)
            return Rendered([(self.bos_ids, False), (prompt, self.train_on_prompt), (row["output"], True),
                             ([self.eos_id], True)], answer_piece=2, answer=row["output"])
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return self._chat({"messages": [{"role": "user", "content": user},
                                        {"role": "assistant", "content": row["output"]}]})

    def _chat(self, row: dict) -> Rendered:
        """A canonical conversation (conversations.py) as pieces: each trained assistant turn, up to and
        including its turn end, is in the loss; the rest is masked."""
        messages, tools, where = row["messages"], row.get("tools") or None, row.get("where", "a row")
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        trained = [m["role"] == "assistant" and m.get("weight", 1) == 1
                   and (self.train_on == "all_assistant" or i == last) for i, m in enumerate(messages)]
        messages = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
        pieces = [(self.bos_ids, False)] if self.template == "chatml" else []
        pieces += self._pieces(messages, tools, trained, where)
        marks = [i for i, (_, train) in enumerate(pieces) if train]
        start = marks[-1] if marks else None
        while start and pieces[start - 1][1]:  # the final trained assistant turn: its run of trained pieces
            start -= 1
        if self.train_on_prompt:
            pieces = [(p, True) for p, _ in pieces]
        final = messages[-1]
        plain = trained[-1] and not final.get("tool_calls") and not final.get("reasoning_content")
        return Rendered(pieces, answer_piece=start, answer=final["content"] if plain else None)

    def _render(self, messages: list[dict], tools: list[dict] | None, generation_prompt: bool,
                where: str = "a row") -> str:
        from jinja2 import TemplateError
        from transformers.utils.chat_template_utils import render_jinja_template  # compiled templates are cached

        try:
            rendered, _ = render_jinja_template(conversations=[messages], tools=tools, chat_template=self.chat_template,
                                                add_generation_prompt=generation_prompt, **self.special_tokens)
        except (TemplateError, TypeError, ValueError, KeyError) as err:
            raise FormatError(f"{where}: the chat template ({self._name}) fails on this row: {err}; fix the row, "
                              f"or {FIX}") from err
        return rendered[0]

    @property
    def _name(self) -> str:
        return "the tokenizer's" if self.template == "tokenizer" else self.template

    def _pieces(self, messages: list[dict], tools: list[dict] | None, trained: list[bool], where: str) -> list[Piece]:
        """Split the whole rendering at each trained assistant turn (see the module's docstring)."""
        full = self._render(messages, tools, False, where)
        self._check_renders(full, messages, tools, where)
        pieces: list[Piece] = []
        done = 0
        for i in (i for i, t in enumerate(trained) if t):
            before = self._render(messages[:i], tools, True, where)
            upto = self._render(messages[: i + 1], tools, False, where)
            own = upto[len(before):] if upto.startswith(before) else ""
            self._check_turn(messages[i], own, i, where)
            if own and full.startswith(upto):  # rendered prefix by prefix up to here
                start, turn = len(before), own
            else:  # the turn, or what precedes it, renders differently once later turns follow
                start, turn = self._located(full, messages, i, tools, where)
            if start < done:
                raise self._unsplittable(where)
            pieces += [(full[done:start], False), *self._split_turn(turn)]
            done = start + len(turn)
        pieces.append((full[done:], False))
        return [(p, t) for p, t in pieces if len(p)]

    def _unsplittable(self, where: str) -> FormatError:
        return FormatError(
            f"{where}: the chat template ({self._name}) does not render conversations prefix by prefix (an earlier "
            "turn changes when later turns are added) and its turns cannot be found in the whole rendering, so "
            "assistant turns cannot be masked exactly; set `template: chatml` on this source, train the last turn "
            "only (train_on: last_assistant), or give a .jinja template that renders each turn the same whatever "
            "follows")

    def _check_turn(self, message: dict, own: str, i: int, where: str) -> None:
        """The turn, rendered as the conversation's last, holds its tool calls and reasoning."""
        missing = [c["function"]["name"] for c in message.get("tool_calls", []) if c["function"]["name"] not in own]
        if missing or message.get("reasoning_content", "").strip() not in own:
            what = f"the tool call to {missing[0]}" if missing else "the reasoning (reasoning_content)"
            raise FormatError(f"{where}: the chat template ({self._name}) does not render {what} of assistant turn "
                              f"{i}, so the model would not learn it; {FIX}")

    def _located(self, full: str, messages: list[dict], i: int, tools: list[dict] | None,
                 where: str) -> tuple[str, str]:
        """Assistant turn i as the whole rendering has it (reasoning dropped from history, say): after the
        generation prompt's n-th occurrence, up to its turn end; it must hold the turn's text and calls."""
        opener = self._render(messages[:i], tools, True, where)[len(self._render(messages[:i], tools, False, where)):]
        starts, at = [], full.find(opener) if opener else -1
        while at >= 0:
            starts.append(at + len(opener))
            at = full.find(opener, at + 1)
        if len(starts) != sum(m["role"] == "assistant" for m in messages):
            raise self._unsplittable(where)
        start = starts[sum(m["role"] == "assistant" for m in messages[:i])]
        rest = full[start:]
        ends = [(rest.find(e), e) for e in self.turn_ends if e in rest]
        turn = rest[: min(ends)[0] + len(min(ends)[1])] if ends else ""
        names = [c["function"]["name"] for c in messages[i].get("tool_calls", [])]
        if not turn or messages[i]["content"].strip() not in turn or any(n not in turn for n in names):
            raise self._unsplittable(where)
        return start, turn

    def _split_turn(self, turn: str) -> list[Piece]:
        """Trained up to and including the turn end; what follows (a newline) is masked. A template that
        ends turns with no special token gets EOS, so the model can stop."""
        ends = sorted((turn.find(e), e) for e in self.turn_ends if e in turn)
        if not ends:
            return [(turn, True), ([self.eos_id], True)]
        stop = ends[0][0] + len(ends[0][1])
        return [(turn[:stop], True), (turn[stop:], False)]

    def _check_renders(self, full: str, messages: list[dict], tools: list[dict] | None, where: str) -> None:
        """The rendering holds the row's tools and tool results (a template without tool support drops them)."""
        names = [t["function"]["name"] for t in tools or []]
        results = [m["content"] for m in messages if m["role"] == "tool" and m["content"].strip()]
        lost = [f"the tool {n!r} of the row's tools" for n in names if n not in full]
        lost += [f"the tool result {r[:30]!r}" for r in results if r not in full and json.dumps(r)[1:-1] not in full]
        if lost:
            raise FormatError(f"{where}: the chat template ({self._name}) does not render {lost[0]}, so the model "
                              f"would not see it; {FIX}")


def _single_token(tokenizer: Any, text: str) -> bool:
    return text is not None and len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1


PROBE_CALL = {"id": "probe0001", "type": "function", "function": {"name": "probe_fn", "arguments": {"x": "A7"}}}
PROBE_TOOLS = [{"type": "function", "function": {"name": "probe_fn", "description": "A probe.", "parameters": {
    "type": "object", "properties": {"x": {"type": "string"}}}}}]


def detect_turn_ends(tokenizer: Any, chat_template: str) -> tuple[str, ...]:
    """The special tokens a chat template puts after an assistant's answer (e.g. `<|im_end|>`) and after
    a tool call (Llama 3.1's `<|eom_id|>`, where it differs)."""
    probe = Renderer("messages", "tokenizer", 0, [], chat_template=chat_template,
                     special_tokens=dict(tokenizer.special_tokens_map))
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special = set(tokenizer.all_special_ids) | {i for i, t in decoder.items() if getattr(t, "special", False)}
    answer = ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A7"}], None)
    call = ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "", "tool_calls": [PROBE_CALL]}],
            PROBE_TOOLS)
    ends: list[str] = []
    for i, (messages, tools) in enumerate((answer, call)):
        try:
            text = probe._render(messages, tools, False)
        except FormatError:
            if i == 0:
                raise
            continue  # a template without tool calls
        tail = text[text.rindex("A7") + 2:] if "A7" in text else ""
        found = [t for t in tokenizer(tail, add_special_tokens=False)["input_ids"] if t in special][:1]
        ends += [e for e in tokenizer.convert_ids_to_tokens(found) if e not in ends]
    return tuple(ends)


def bos_prefix(tokenizer: Any) -> list[int]:
    """[bos] when the tokenizer itself adds BOS to plain text (Llama), else []."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return [bos] if bos is not None and ids and ids[0] == bos else []


def make_renderer(source: dict, tokenizer: Any, train_on_prompt: bool) -> Renderer:
    """The renderer for one source's settings with this tokenizer."""
    fmt = source["format"]
    default_template = "auto" if fmt == "messages" else "alpaca"
    template = source.get("template") or default_template
    valid = CHAT_TEMPLATES if fmt == "messages" else (*PLAIN_TEMPLATES, "chat")
    if fmt != "text" and template not in valid and not (fmt == "messages" and template.endswith(".jinja")):
        raise FormatError(f"template={template!r} is not one of {', '.join(valid)} for format {fmt}")
    if tokenizer.eos_token_id is None:
        raise FormatError("the tokenizer has no eos_token, so the model could never learn to stop: set "
                          "`eos_token` in its tokenizer_config.json (the tokenizer of model.tokenizer, or of the "
                          "weights when that is null)")
    renderer = Renderer(fmt, template, tokenizer.eos_token_id, bos_prefix(tokenizer),
                        train_on_prompt=train_on_prompt and fmt != "text",
                        train_on=source.get("train_on") or "all_assistant")
    if fmt == "classification":
        renderer.labels = [str(x) for x in source.get("labels") or []]
        if not renderer.labels:
            raise FormatError("a classification source needs `labels`: the label words, e.g. [positive, negative]")
        renderer.instruction = source.get("instruction") or DEFAULT_CLASSIFICATION_INSTRUCTION
    if fmt == "text" or template in PLAIN_TEMPLATES:
        return renderer
    if template in ("chat", "auto", "tokenizer"):
        renderer.chat_template = getattr(tokenizer, "chat_template", None) or None
        if isinstance(renderer.chat_template, dict):  # several named templates: use the default one
            renderer.chat_template = renderer.chat_template.get("default")
        if renderer.chat_template is None and template == "tokenizer":
            raise FormatError("template=tokenizer but the tokenizer has no chat template; use template: chatml")
        renderer.template = "tokenizer"
    elif template.endswith(".jinja"):
        renderer.chat_template = Path(template).read_text()
    renderer.special_tokens = dict(tokenizer.special_tokens_map)
    if renderer.chat_template is None:
        renderer.template = "chatml"
        turn_end = "<|im_end|>" if _single_token(tokenizer, "<|im_end|>") else tokenizer.eos_token
        renderer.chat_template = CHATML_TEMPLATE.replace("<|im_end|>", turn_end)
        renderer.turn_ends = (turn_end,)
    else:
        renderer.turn_ends = detect_turn_ends(tokenizer, renderer.chat_template)
    return renderer


def stop_token_ids(renderer: Renderer, tokenizer: Any) -> list[int]:
    """The tokens generation should stop at: the chat turn ends (after an answer, after a call), else EOS."""
    if renderer.turn_ends:
        return [tokenizer.convert_tokens_to_ids(e) for e in renderer.turn_ends]
    return [tokenizer.eos_token_id]


@dataclass
class Encoded:
    """One tokenized example: ids, which ids are labels, and where the final completion starts."""

    ids: list[int]
    mask: list[bool]
    completion_start: int


def _token_ids(texts: list[str], tokenizer: Any) -> list[list[int]]:
    """`tokenizer(texts, add_special_tokens=False).input_ids`; for fast tokenizers straight from the Rust
    backend (parallel over cores), skipping the Python conversion that takes half the time."""
    backend = getattr(tokenizer, "_tokenizer", None)
    direct = (backend is not None and hasattr(backend, "encode_batch_fast") and backend.truncation is None
              and backend.padding is None and not getattr(tokenizer, "split_special_tokens", False))
    if not direct:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


def encode_batch(rendered: list[Rendered], tokenizer: Any) -> list[Encoded]:
    """Tokenize every text piece of a batch of rows in one call (fast tokenizers run it in Rust)."""
    texts = [p for r in rendered for p, _ in r.pieces if isinstance(p, str)]
    token_lists = iter(_token_ids(texts, tokenizer) if texts else [])
    out = []
    for r in rendered:
        ids: list[int] = []
        mask: list[bool] = []
        start = 0
        for i, (piece, train) in enumerate(r.pieces):
            if i == r.answer_piece:
                start = len(ids)
            toks = next(token_lists) if isinstance(piece, str) else piece
            ids += toks
            mask += [train] * len(toks)
        if mask:
            mask[0] = False  # position 0 is never predicted; masking it keeps packed rows independent
        out.append(Encoded(ids, mask, start))
    return out
