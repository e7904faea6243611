"""The project's own demo data, generated deterministically (no copied text) on first use.

- `dates_{train,val}.jsonl` (alpaca): rewrite a written date ("7 March 2024") as ISO ("2024-03-07").
  Short, exactly checkable, and beyond SmolLM2-135M-Instruct before fine-tuning.
- `dates_chat_{train,val}.jsonl` (messages): the same task as chat turns, some multi-turn.
- `dates_tools_{train,val}.jsonl` (messages, OpenAI tool calling) and `dates_tools_sharegpt_{train,val}.jsonl`
  (ShareGPT / LLaMA-Factory function_call + observation): questions about dates answered by calling
  `weekday` or `days_between`, reading the result and answering; some answered directly, with no call.
- `reviews_{train,val}.jsonl` (classification): generated product reviews, positive / negative.
- `prose_{train,val}.jsonl` (text): templated prose, the "pretraining" replay corpus.
- `long_documents` / `write_corpus`: articles of many paragraphs, any size (replay at scale).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

from fulltune.atomic import write_text

VERSION = 3  # bump when the generated content changes, so old copies are regenerated
SIZES = {"dates": (2000, 100), "dates_chat": (400, 50), "reviews": (400, 50), "prose": (2000, 100),
         "dates_tools": (400, 50), "dates_tools_sharegpt": (400, 50)}

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
DATE_INSTRUCTIONS = [
    "Convert the date to ISO format (YYYY-MM-DD).",
    "Rewrite this date as YYYY-MM-DD.",
    "Give this date in ISO 8601 form.",
    "Write the date as year-month-day in digits.",
    "Reformat the date to YYYY-MM-DD.",
]


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def written_date(d: dt.date, style: int) -> str:
    """One of six unambiguous ways people write a date (month always spelled out)."""
    month, day = MONTHS[d.month - 1], d.day
    return [
        f"{day} {month} {d.year}",
        f"{month} {day}, {d.year}",
        f"the {_ordinal(day)} of {month} {d.year}",
        f"{month[:3]} {day} {d.year}",
        f"{WEEKDAYS[d.weekday()]}, {day} {month} {d.year}",
        f"{_ordinal(day)} {month} {d.year}",
    ][style]


def _dates(rng: random.Random, n_train: int, n_val: int) -> tuple[list[dt.date], list[dt.date]]:
    """Distinct dates; validation dates never occur in training."""
    start, span = dt.date(1950, 1, 1), (dt.date(2049, 12, 31) - dt.date(1950, 1, 1)).days
    picked = rng.sample(range(span + 1), n_train + n_val)
    days = [start + dt.timedelta(days=k) for k in picked]
    return days[:n_train], days[n_train:]


def date_rows(seed: int, n_train: int, n_val: int) -> tuple[list[dict], list[dict]]:
    """The alpaca-format date task."""
    rng = random.Random(seed)

    def row(d: dt.date) -> dict:
        return {"instruction": rng.choice(DATE_INSTRUCTIONS), "input": written_date(d, rng.randrange(6)),
                "output": d.isoformat()}

    train, val = _dates(rng, n_train, n_val)
    return [row(d) for d in train], [row(d) for d in val]


def date_chat_rows(seed: int, n_train: int, n_val: int) -> tuple[list[dict], list[dict]]:
    """The date task as chat: a third of the conversations have a system turn, a third two rounds."""
    rng = random.Random(seed)

    def conversation(days: list[dt.date]) -> dict:
        messages = []
        if rng.random() < 1 / 3:
            messages.append({"role": "system", "content": "You rewrite dates in ISO format."})
        for d in days:
            messages.append({"role": "user",
                             "content": f"{rng.choice(DATE_INSTRUCTIONS)}\n{written_date(d, rng.randrange(6))}"})
            messages.append({"role": "assistant", "content": d.isoformat()})
        return {"messages": messages}

    train, val = _dates(rng, 2 * n_train, 2 * n_val)
    return ([conversation(train[2 * i: 2 * i + 1 + (rng.random() < 1 / 3)]) for i in range(n_train)],
            [conversation(val[2 * i: 2 * i + 1]) for i in range(n_val)])  # val: single round


DATE_TOOLS = [
    {"type": "function", "function": {
        "name": "weekday", "description": "Day of the week of a date (YYYY-MM-DD).",
        "parameters": {"type": "object", "properties": {"date": {"type": "string"}}, "required": ["date"]}}},
    {"type": "function", "function": {
        "name": "days_between", "description": "Days from start to end (YYYY-MM-DD).",
        "parameters": {"type": "object", "properties": {"start": {"type": "string"}, "end": {"type": "string"}},
                       "required": ["start", "end"]}}},
]


def date_tool_rows(seed: int, n_train: int, n_val: int) -> tuple[list[dict], list[dict]]:
    """OpenAI-format tool calling on dates: a call (arguments as a JSON string, as the API writes them),
    its result, the answer; a quarter of the calls reason first, a fifth of the questions need no tool."""
    rng = random.Random(seed)

    def conversation(d: dt.date, other: dt.date, n: int) -> dict:
        written = written_date(d, rng.randrange(4))  # no weekday in the question
        messages = [{"role": "system", "content": "You answer questions about dates, using the tools."}] * (n % 3 == 0)
        kind = rng.random()
        if kind < 0.2:
            messages += [{"role": "user", "content": f"{rng.choice(DATE_INSTRUCTIONS)}\n{written}"},
                         {"role": "assistant", "content": d.isoformat()}]
            return {"messages": messages, "tools": DATE_TOOLS}
        if kind < 0.6:
            question, name, args = f"What day of the week was {written}?", "weekday", {"date": d.isoformat()}
            result, answer = WEEKDAYS[d.weekday()], f"{d.isoformat()} was a {WEEKDAYS[d.weekday()]}."
        else:
            question = f"How many days are there from {written} to {written_date(other, rng.randrange(4))}?"
            name, args = "days_between", {"start": d.isoformat(), "end": other.isoformat()}
            result, answer = str((other - d).days), f"{(other - d).days} days."
        call = {"role": "assistant", "content": None, "tool_calls": [{
            "id": f"call_{n:05d}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]}
        if rng.random() < 0.25:
            call["reasoning_content"] = f"I need {name.replace('_', ' ')} for {', '.join(args.values())}."
        messages += [{"role": "user", "content": question}, call,
                     {"role": "tool", "tool_call_id": f"call_{n:05d}", "content": result},
                     {"role": "assistant", "content": answer}]
        return {"messages": messages, "tools": DATE_TOOLS}

    train, val = _dates(rng, 2 * n_train, 2 * n_val)
    return ([conversation(*sorted(train[2 * i: 2 * i + 2]), i) for i in range(n_train)],
            [conversation(*sorted(val[2 * i: 2 * i + 2]), i) for i in range(n_val)])


def as_sharegpt(row: dict) -> dict:
    """An OpenAI-format row as LLaMA-Factory writes ShareGPT: `conversations` of from/value, calls as
    `function_call` values, results as `observation`, `system` and `tools` (a JSON string) beside them."""
    roles = {"user": "human", "assistant": "gpt", "tool": "observation"}
    turns, system = [], ""
    for m in row["messages"]:
        if m["role"] == "system":
            system = m["content"]
        elif m.get("tool_calls"):
            call = m["tool_calls"][0]["function"]
            turns.append({"from": "function_call",
                          "value": json.dumps({"name": call["name"], "arguments": json.loads(call["arguments"])})})
        else:
            turns.append({"from": roles[m["role"]], "value": m["content"]})
    return {"conversations": turns, "system": system, "tools": json.dumps([t["function"] for t in row["tools"]])}


def date_tool_sharegpt_rows(seed: int, n_train: int, n_val: int) -> tuple[list[dict], list[dict]]:
    """The tool-calling date task in ShareGPT / LLaMA-Factory form."""
    train, val = date_tool_rows(seed, n_train, n_val)
    return [as_sharegpt(r) for r in train], [as_sharegpt(r) for r in val]


PRODUCTS = ["kettle", "backpack", "desk lamp", "pair of boots", "blender", "umbrella", "keyboard",
            "tent", "coffee grinder", "bicycle bell", "rain jacket", "phone case", "frying pan", "chair"]
GOOD = ["sturdy", "well made", "a delight", "worth every penny", "comfortable", "reliable", "excellent",
        "quiet", "easy to clean", "beautifully finished"]
BAD = ["flimsy", "badly made", "a letdown", "overpriced", "uncomfortable", "unreliable", "awful", "noisy",
       "hard to clean", "poorly finished"]
GOOD_AFTER = ["I would buy it again.", "It arrived early and works perfectly.", "My family loves it.",
              "Five stars from me.", "It has held up for months."]
BAD_AFTER = ["I sent it back after a week.", "It broke on the second day.", "Do not waste your money.",
             "One star, sadly.", "Customer service never replied."]


def review_rows(seed: int, n_train: int, n_val: int) -> tuple[list[dict], list[dict]]:
    """Generated product reviews with a sentiment label; the wording, not the template, carries it."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < n_train + n_val:
        label = rng.choice(["positive", "negative"])
        words, after = (GOOD, GOOD_AFTER) if label == "positive" else (BAD, BAD_AFTER)
        product = rng.choice(PRODUCTS)
        text = f"The {product} is {rng.choice(words)}. {rng.choice(after)}"
        if rng.random() < 0.5:
            text = f"Bought this {product} last {rng.choice(MONTHS)}. " + text.replace(f"The {product}", "It")
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": label})
    return rows[:n_train], rows[n_train:]


SYLLABLES = ["ar", "bel", "cor", "dun", "el", "fen", "gar", "hol", "ist", "kel", "lom", "mar", "nor", "ost",
             "pen", "rith", "sel", "tor", "ul", "ven", "wick", "yar"]
PROSE = {
    "town": [
        "{Name} is a small town on the banks of the {River}.",
        "Most people in {Name} work in {trade} or at the {building}.",
        "Every {season} the town holds a fair near the old {building}.",
        "The road north of {Name} climbs slowly towards the hills.",
        "Visitors often stop at the {building} before walking down to the river.",
    ],
    "weather": [
        "In {season} the valley around {Name} is often {weather}.",
        "Farmers watch the sky closely, because a {weather} week can ruin the harvest.",
        "By evening the wind usually turns and the air grows {temp}.",
        "Old records from {Name} describe a {season} so {weather} that the {River} froze.",
    ],
    "market": [
        "On market days traders bring {goods} and {goods2} to the square in {Name}.",
        "Prices rise in {season}, when {goods} become scarce.",
        "A good trader in {Name} knows every family that buys {goods2}.",
        "The market closes at noon, and the square is quiet again by one.",
    ],
    "river": [
        "The {River} rises in the hills and runs for many miles before reaching the sea.",
        "Boats once carried {goods} down the {River} to the coast.",
        "Herons fish in the shallow water near {Name}.",
        "After heavy rain the {River} floods the meadows on both banks.",
    ],
}
FILL = {
    "trade": ["farming", "fishing", "weaving", "carpentry", "brewing", "printing"],
    "building": ["mill", "library", "station", "church", "bridge", "school", "bakery"],
    "season": ["spring", "summer", "autumn", "winter"],
    "weather": ["wet", "dry", "windy", "foggy", "cold", "mild"],
    "temp": ["cool", "warm", "damp", "sharp"],
    "goods": ["apples", "wool", "cheese", "timber", "salt", "honey", "pottery"],
    "goods2": ["bread", "candles", "rope", "cloth", "eggs", "fish", "tools"],
}


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.choice([2, 2, 3]))).capitalize()


def prose_rows(seed: int, n_train: int, n_val: int) -> tuple[list[dict], list[dict]]:
    """Short generated paragraphs (2-5 sentences on one topic): plain text for replay."""
    rng = random.Random(seed)

    def paragraph() -> str:
        values = {k: rng.choice(v) for k, v in FILL.items()}
        values |= {"Name": _name(rng), "River": _name(rng) + " river"}
        sentences = rng.sample(PROSE[rng.choice(list(PROSE))], rng.randint(2, 4))
        return " ".join(s.format(**values) for s in sentences)

    rows = [{"text": paragraph()} for _ in range(n_train + n_val)]
    return rows[:n_train], rows[n_train:]


def long_documents(seed: int) -> Iterator[str]:
    """Endless generated articles shaped like web and book text: a title, then paragraphs on several
    topics about one town; log-normal lengths (SmolLM2 tokens: median ~430, mean ~660, a tail to
    ~9,000; 2.8 KB of jsonl a document), so most are longer than a typical max_length.
    For replay-at-scale benchmarks and tests."""
    rng = random.Random(seed)
    while True:
        values = {k: rng.choice(v) for k, v in FILL.items()} | {"Name": _name(rng), "River": _name(rng) + " river"}
        paragraphs = []
        for _ in range(min(400, max(1, round(rng.lognormvariate(2.2, 0.9))))):
            values |= {k: rng.choice(v) for k, v in FILL.items() if rng.random() < 0.3}
            sentences = rng.sample(PROSE[rng.choice(list(PROSE))], rng.randint(2, 4))
            paragraphs.append(" ".join(s.format(**values) for s in sentences))
        yield f"{values['Name']} and the {values['River']}\n\n" + "\n\n".join(paragraphs)


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> Path:
    """A jsonl replay corpus of `long_documents` of about `megabytes`, written a line at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for text in long_documents(seed):
            if f.tell() >= megabytes * 1e6:
                return path
            f.write(json.dumps({"text": text}) + "\n")
    return path


GENERATORS: dict[str, Callable[[int, int, int], tuple[list[dict], list[dict]]]] = {
    "dates": date_rows, "dates_chat": date_chat_rows, "reviews": review_rows, "prose": prose_rows,
    "dates_tools": date_tool_rows, "dates_tools_sharegpt": date_tool_sharegpt_rows,
}


def _write_jsonl(path: Path, rows: Iterator[dict] | list[dict]) -> None:
    """Write atomically: ranks generating at once never read a half-written file."""
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def ensure_demo_data(root: str | os.PathLike) -> Path:
    """Generate the demo files under `root` unless this version is there already; returns `root`."""
    root = Path(root)
    stamp = root / f".generated-v{VERSION}"
    if stamp.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, generate) in enumerate(GENERATORS.items()):
        train, val = generate(1000 + i, *SIZES[name])
        _write_jsonl(root / f"{name}_train.jsonl", train)
        _write_jsonl(root / f"{name}_val.jsonl", val)
    stamp.touch()
    return root


if __name__ == "__main__":
    import sys

    print(ensure_demo_data(sys.argv[1] if len(sys.argv) > 1 else "demo"))
