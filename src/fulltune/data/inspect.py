"""Print the mixture plan and one rendered example per source with its loss mask visible.

    python -m fulltune.data.inspect                       # the default job's data (data=demo)
    python -m fulltune.data.inspect data=chat model=tiny  # any train.py overrides
    python -m fulltune.data.inspect data=alpaca --tokenizer path/to/hf_tokenizer_dir

In the rendered examples (per source, the one of its first 50 with the most trained spans: a tool call and
the answer after its result, say), text inside [[ ]] is in the loss; everything else is masked (-100).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np

from .cache import TokenStore
from .datamodule import GROUPS, FineTuneDataModule

TRAINED = ("[[", "]]")


def show_mask(ids: np.ndarray, mask: np.ndarray, tokenizer: Any) -> str:
    """The example's text with each run of label tokens wrapped in [[ ]]."""
    out, start = [], 0
    for end in [*np.flatnonzero(np.diff(mask.astype(np.int8))) + 1, len(ids)]:
        text = tokenizer.decode(ids[start:end].tolist())
        out.append(f"{TRAINED[0]}{text}{TRAINED[1]}" if mask[start] else text)
        start = end
    return "".join(out)


def _most_spans(store: TokenStore, first: int = 50) -> int:
    """Of the first examples, the one with the most trained spans (a tool call, its answer...): the one
    that shows the most of the mask."""
    return max(range(min(first, len(store))), key=lambda i: (np.diff(store.example(i)[1].astype(np.int8)) == 1).sum())


def describe(dm: FineTuneDataModule) -> str:
    """The mixture plan as a table, then one rendered training example per source."""
    dm.setup()
    st = dm.stats
    lines = [
        f"Mixture plan: seed {dm.seed}, mix_by {dm.mix_by}, replay_ratio {dm.replay_ratio}, "
        f"packing {'on' if dm.packing else 'off'}, max_length {dm.max_length}, batch_size {dm.batch_size}",
        "",
        f"{'source':<14}{'group':<8}{'format':<16}{'weight':>8}{'rows':>8}{'bad':>6}{'examples':>10}{'tokens':>12}"
        f"{'chunked':>9}{'truncated':>11}{'dropped':>9}{'samples/ep':>12}{'tokens/ep':>12}{'val':>6}",
    ]
    for group in GROUPS:
        for source in dm.sources[group]:
            s = st["sources"][source["name"]]
            weight = "natural" if source.get("weight") is None else f"{source['weight']:g}"
            dropped = s["dropped_overlong"] + s["dropped_no_labels"]
            lines.append(
                f"{source['name']:<14}{group:<8}{source['format']:<16}{weight:>8}{s['rows']:>8}{s['bad_rows']:>6}"
                f"{s['examples']:>10}{s['tokens']:>12}{s['chunked']:>9}{s['truncated']:>11}{dropped:>9}{s['epoch_samples']:>12}"
                f"{s['epoch_tokens']:>12}{s.get('val_examples', 0):>6}")
    lines += [
        "",
        f"Per epoch: {st['epoch_samples']} samples, {st['epoch_tokens']} tokens in {st['rows_per_epoch']} rows, "
        f"{dm.num_train_batches(1)} micro-batches on 1 device; replay {st['replay_fraction_samples']:.1%} of "
        f"samples, {st['replay_fraction_tokens']:.1%} of tokens; non-pad tokens {st['nonpad_fraction']:.1%}",
        f"Validation loaders: {', '.join(dm.val_source_names) or 'none'}",
        "rows: read (bad: unusable); examples: what training draws from, one per row or per max_length "
        "window of a chunked document (chunked: documents split; truncated / dropped: cut or left out)",
        f"Loss mask: text inside {TRAINED[0]} {TRAINED[1]} is in the loss, the rest is masked.",
    ]
    for k, (group, i, split) in enumerate(dm._index):
        if split != "train":
            continue
        store = dm._builder.stores[k]
        ids, mask = store.example(_most_spans(store))
        lines += ["", f"--- {dm.sources[group][i]['name']} ({group}, {len(ids)} tokens) ---",
                  show_mask(np.asarray(ids), np.asarray(mask), dm.tokenizer)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fulltune.data.inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="train.py overrides, e.g. data=chat model=tiny")
    parser.add_argument("--tokenizer", help="an HF tokenizer dir to use instead of the model config's")
    args = parser.parse_args(argv)

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from fulltune.preflight import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=args.overrides)
    with open_dict(cfg):  # no Hydra run here: resolve the run-time paths against the current dir
        cfg.paths.root_dir = os.getcwd()
        cfg.paths.output_dir = os.getcwd()
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, trust_remote_code=False)  # no code from its files
    else:
        from fulltune.models import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
    print(describe(instantiate(cfg.data, tokenizer=tokenizer, seed=cfg.seed)))


if __name__ == "__main__":
    main()
