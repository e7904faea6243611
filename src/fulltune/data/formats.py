"""Row formats: how one row becomes text pieces, each either in the loss or masked.

A renderer turns a row into `Rendered.pieces`: text (or token ids) with a flag saying whether its tokens
are labels. Pieces are tokenized separately and concatenated, so the prompt a model is evaluated on
(`prompt_ids`) is exactly the token prefix it was trained on.

Formats (`format:` of a source):
- `alpaca`: instruction / input (optional) / output, rendered with `template` (`alpaca`: the Stanford
  prompt, `instruction`: the same headings without the preamble, `chat`: the tokenizer's chat template).
- `messages`: role/content turns (OpenAI style, content a string or a list of text parts, joined by
  newlines; ShareGPT from/value accepted), rendered with the tokenizer's chat template, or the named
  `chatml` template when it has none; every assistant turn is trained.
- `text`: raw text, every token in the loss.
- `classification`: text + label, trained as `instruction` + text -> the label word (alpaca rendering).

EOS: plain templates end the answer with the tokenizer's EOS id; chat templates end each assistant
turn with the template's own turn-end token (`<|im_end|>`, `<|eot_id|>`...). It is always a label —
masks are positional, so `pad_token == eos_token` cannot hide it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fulltune.preflight import ConfigError

FORMATS = ("alpaca", "messages", "text", "classification")
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}

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
    template: str
    eos_id: int
    bos_ids: list[int]
    train_on_prompt: bool = False
    instruction: str | None = None
    labels: list[str] | None = None
    chat_template: str | None = None  # the tokenizer's Jinja template when `template` resolves to it
    turn_end: str | None = None  # text of the token that ends an assistant turn
    special_tokens: dict = field(default_factory=dict)  # bos_token, eos_token... as templates expect

    def __call__(self, row: dict) -> Rendered:
        if self.format == "text":
            return Rendered([(self.bos_ids, False), (row["text"], True), ([self.eos_id], True)])
        if self.format == "messages":
            return self._chat(row["messages"])
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
        return self._chat([{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}])

    def _chat(self, messages: list[dict]) -> Rendered:
        messages = [{"role": ROLES[m["role"]], "content": m["content"]} for m in messages]
        pieces = self._chatml(messages) if self.template == "chatml" else self._jinja_pieces(messages)
        start = max(i for i, (_, train) in enumerate(pieces) if train)
        while start > 0 and pieces[start - 1][1]:  # the final assistant turn: its run of trained pieces
            start -= 1
        if self.train_on_prompt:
            pieces = [(p, True) for p, _ in pieces]
        return Rendered(pieces, answer_piece=start, answer=messages[-1]["content"])

    def _chatml(self, messages: list[dict]) -> list[Piece]:
        pieces: list[Piece] = [(self.bos_ids, False)]
        for m in messages:
            if m["role"] == "assistant":
                pieces += [("<|im_start|>assistant\n", False), (m["content"] + self.turn_end, True), ("\n", False)]
            else:
                pieces.append((f"<|im_start|>{m['role']}\n{m['content']}{self.turn_end}\n", False))
        return pieces

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template  # compiled templates are cached

        rendered, _ = render_jinja_template(conversations=[messages], chat_template=self.chat_template,
                                            add_generation_prompt=generation_prompt, **self.special_tokens)
        return rendered[0]

    def _jinja_pieces(self, messages: list[dict]) -> list[Piece]:
        """Split the template's rendering at each assistant turn (needs prefix-stable templates)."""
        pieces: list[Piece] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render(messages[:i], generation_prompt=True)
            upto = self._render(messages[: i + 1], generation_prompt=False)
            if not (before.startswith(done) and upto.startswith(before)):
                raise FormatError(
                    "the tokenizer's chat template does not render conversations prefix by prefix "
                    "(an earlier turn changes when later turns are added), so assistant turns cannot be "
                    "masked exactly; set `template: chatml` on this source")
            turn = upto[len(before):]
            at = turn.find(self.turn_end) if self.turn_end else -1
            if at >= 0:  # trained up to and including the turn end; what follows (a newline) is masked
                end = at + len(self.turn_end)
                trained: list[Piece] = [(turn[:end], True), (turn[end:], False)]
            else:  # the template ends turns with no special token: EOS is added so the model can stop
                trained = [(turn, True), ([self.eos_id], True)]
            pieces += [(before[len(done):], False), *trained]
            done = upto
        full = self._render(messages, generation_prompt=False)
        pieces.append((full[len(done):], False))
        return [(p, t) for p, t in pieces if len(p)]


def _single_token(tokenizer: Any, text: str) -> bool:
    return text is not None and len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1


def detect_turn_end(tokenizer: Any, chat_template: str) -> str | None:
    """The special token a chat template puts after an assistant's reply, e.g. `<|im_end|>`."""
    probe = Renderer("messages", "tokenizer", 0, [], chat_template=chat_template,
                     special_tokens=dict(tokenizer.special_tokens_map))
    text = probe._render([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A7"}], False)
    tail = text[text.rindex("A7") + 2:]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    for token_id in tokenizer(tail, add_special_tokens=False)["input_ids"]:
        if token_id in special:
            return tokenizer.convert_ids_to_tokens(token_id)
    return None


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
    if fmt != "text" and template not in valid:
        raise FormatError(f"template={template!r} is not one of {', '.join(valid)} for format {fmt}")
    if tokenizer.eos_token_id is None:
        raise FormatError("the tokenizer has no eos_token, so the model could never learn to stop: set "
                          "`eos_token` in its tokenizer_config.json (the tokenizer of model.tokenizer, or of the "
                          "weights when that is null)")
    renderer = Renderer(fmt, template, tokenizer.eos_token_id, bos_prefix(tokenizer),
                        train_on_prompt=train_on_prompt and fmt != "text")
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
    if renderer.chat_template is None:
        renderer.template = "chatml"
        renderer.turn_end = "<|im_end|>" if _single_token(tokenizer, "<|im_end|>") else tokenizer.eos_token
    else:
        renderer.template = "tokenizer"
        renderer.special_tokens = dict(tokenizer.special_tokens_map)
        renderer.turn_end = detect_turn_end(tokenizer, renderer.chat_template)
    return renderer


def stop_token_id(renderer: Renderer, tokenizer: Any) -> int:
    """The token generation should stop at: the chat turn end, else EOS."""
    if renderer.turn_end:
        return tokenizer.convert_tokens_to_ids(renderer.turn_end)
    return tokenizer.eos_token_id


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
