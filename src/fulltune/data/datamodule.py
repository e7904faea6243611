"""FineTuneDataModule: task sources + replay sources -> validated, tokenized (cached), mixed, packed.

Training batches (dict of tensors):
    input_ids, labels, position_ids   (B, T) long; labels aligned with input_ids (-100 = not predicted)
    attention_mask                    (B, T) long, only when packing is off
    window_label_tokens               0-dim long: predicted label tokens, `(labels[:, 1:] != -100).sum()`,
                                      summed over every micro-batch of this batch's optimizer step on
                                      every rank (the exact token-normalised loss divides by it)
    nonpad_fraction                   0-dim float: real tokens / (B * T)
    num_examples                      0-dim long: the examples in the batch (a packed row holds several)
    squared_lengths                   0-dim long: Σ n² over those examples of n tokens (the causal attention
                                      work: a packed example attends within itself)
Validation: one loader per group with validation data (`val_source_names`, task first); their
batches carry `window_label_tokens` = the batch's own label-token count.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from .cache import TokenStore, build_store, cache_key, file_fingerprint, tokenizer_fingerprint
from .conversations import kind
from .formats import make_renderer, stop_token_ids
from .mixture import EpochPlan, MixtureSampler, SourcePlan, interleave, select
from .packing import collate, pack
from .validate import DataError, RowReport, check_source, good_rows, is_local

GROUPS = ("task", "replay")
# Per source split in stats: rows read (documents + bad), documents used, the examples (chunks) and
# tokens they gave, and what the length policy did.
STORE_COUNTS = ("rows", "bad_rows", "documents", "examples", "tokens", "chunked", "truncated", "dropped_overlong",
                "dropped_no_labels")


class _Batches(Dataset):
    """Builds a batch from a descriptor `(rows, window_label_tokens)`; rows are ((store, example), ...)."""

    def __init__(self, stores: list[TokenStore], pad_id: int, packed: bool) -> None:
        self.stores, self.pad_id, self.packed = stores, pad_id, packed

    def __getitem__(self, descriptor: tuple) -> dict[str, torch.Tensor]:
        rows, window_tokens = descriptor
        batch = collate([[self.stores[s].example(i) for s, i in row] for row in rows], self.pad_id, self.packed)
        batch["window_label_tokens"] = torch.tensor(window_tokens, dtype=torch.long)
        return batch


class _FixedBatches(Dataset):
    """A fixed list of batch descriptors (validation)."""

    def __init__(self, builder: _Batches, descriptors: list[tuple]) -> None:
        self.builder, self.descriptors = builder, descriptors

    def __len__(self) -> int:
        return len(self.descriptors)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.builder[self.descriptors[i]]


class FineTuneDataModule(L.LightningDataModule):
    """Task data mixed with pretraining replay; see conf/data/demo.yaml for every setting."""

    def __init__(
        self,
        tokenizer: Any,
        task: list[dict],
        replay: list[dict] | None = None,
        replay_ratio: float = 0.0,
        mix_by: str = "samples",
        max_length: int = 1024,
        packing: bool = False,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        train_on_prompt: bool = False,
        num_proc: int = 1,
        overlong: str = "chunk",
        on_bad_row: str = "stop",
        seed: int = 0,
        cache_dir: str | None = None,
        demo_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.sources = {"task": _plain(task) or [], "replay": _plain(replay) or []}
        self.replay_ratio, self.mix_by, self.max_length, self.packing = replay_ratio, mix_by, max_length, packing
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.train_on_prompt, self.num_proc, self.overlong, self.on_bad_row = (
            train_on_prompt, num_proc, overlong, on_bad_row)
        self.seed = seed
        self.cache_dir = Path(cache_dir or Path.home() / ".cache" / "fulltune").expanduser()
        self.demo_dir = demo_dir
        self._check_settings()
        self.stats: dict[str, Any] = {}
        self.plan: EpochPlan | None = None
        self.val_source_names: list[str] = []
        self._stores: dict[tuple[str, int, str], TokenStore] | None = None
        self._held: dict[str, set[int]] = {}  # val_size row numbers per source

    # -- settings -------------------------------------------------------------------------------------

    def _check_settings(self) -> None:
        choices = {"mix_by": ("samples", "tokens"), "overlong": ("chunk", "truncate", "drop"),
                   "on_bad_row": ("stop", "skip")}
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise DataError(f"data.{key}={getattr(self, key)!r}: expected one of {', '.join(valid)}")
        if not self.sources["task"]:
            raise DataError("data.task is empty: give at least one task source (path + format)")
        if not 0 <= self.replay_ratio < 1:
            raise DataError(f"data.replay_ratio={self.replay_ratio}: expected 0 <= replay_ratio < 1")
        if self.replay_ratio > 0 and not self.sources["replay"]:
            raise DataError(f"data.replay_ratio={self.replay_ratio} but data.replay has no sources")
        for key, low in (("max_length", 2), ("batch_size", 1), ("eval_batch_size", 1), ("num_proc", 1)):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < low:
                raise DataError(f"data.{key}={getattr(self, key)!r}: expected an integer >= {low}")
        names: set[str] = set()
        for group, sources in self.sources.items():
            for i, source in enumerate(sources):
                where = f"data.{group}[{i}]"
                if not isinstance(source, dict):
                    raise DataError(f"{where}: expected a mapping with path and format, got {source!r}")
                check_source(source, where)
                if group == "replay" and source["format"] != "text":
                    raise DataError(f"{where}: replay sources are pretraining text: format must be text, "
                                    f"got {source['format']}")
                source.setdefault("name", Path(str(source["path"])).stem if is_local(source["path"])
                                  else str(source["path"]).replace("/", "_"))
                if source["name"] in names:
                    raise DataError(f"{where}: source name {source['name']!r} is used twice; set `name`")
                names.add(source["name"])
            given = {s.get("weight") is not None for s in sources}
            if len(given) > 1:
                raise DataError(f"data.{group}: set `weight` on every source of the group or on none "
                                "(none = proportional to size)")

    # -- loading --------------------------------------------------------------------------------------

    def _units(self) -> list[tuple[str, int, str]]:
        """(group, source index, split) of every store: training splits, then validation splits."""
        train = [(g, i, "train") for g in GROUPS for i in range(len(self.sources[g]))]
        val = [(g, i, "val") for g in GROUPS for i, s in enumerate(self.sources[g])
               if s.get("val_path") or s.get("val_split") or s.get("val_size")]
        return train + val

    def _rows(self, source: dict, split: str, report: RowReport) -> Iterator[dict]:
        """A split's good rows, streamed (bad ones go to `report`); training takes `take_rows`."""
        separate_val = source.get("val_path") or source.get("val_split")
        if split == "val" and separate_val:
            return good_rows(source, source.get("val_path") or source["path"], source.get("val_split"), report)
        rows = good_rows(source, source["path"], source.get("split"), report)
        if source.get("val_size") and not separate_val:
            held = self._held_out(source)
            rows = (r for i, r in enumerate(rows) if (i in held) == (split == "val"))
        return itertools.islice(rows, source["take_rows"]) if split == "train" and source.get("take_rows") else rows

    def _held_out(self, source: dict) -> set[int]:
        """`val_size` row numbers drawn from the file's good rows (one counting pass, remembered)."""
        if source["name"] not in self._held:
            report = RowReport(source["path"], source["format"])
            count = sum(1 for _ in good_rows(source, source["path"], source.get("split"), report))
            report.check(self.on_bad_row)  # bad rows are named as such, before the split counts what is left
            if source["val_size"] >= count:
                bad = f" ({report.bad} bad rows skipped)" if report.bad else ""
                raise DataError(f"{source['path']}: val_size={source['val_size']} leaves no training rows: the file "
                                f"has {count} usable rows{bad}; lower val_size or give a val_path")
            self._held[source["name"]] = set(np.random.default_rng(0).permutation(count)[: source["val_size"]].tolist())
        return self._held[source["name"]]

    def overlong_policy(self, source: dict) -> str:
        """The source's own `overlong`, else `data.overlong`; instruction data cannot be chunked (an
        example cut in two loses its answer): under the default `chunk` it is truncated."""
        policy = source.get("overlong") or self.overlong
        return "truncate" if policy == "chunk" and source["format"] != "text" else policy

    def _key(self, source: dict, split: str, tokenizer_fp: str) -> str:
        files = [file_fingerprint(source["path"])]
        if split == "val" and source.get("val_path"):
            files = [file_fingerprint(source["val_path"])]
        settings = {k: v for k, v in source.items() if k not in ("name", "weight")}
        if str(source.get("template")).endswith(".jinja"):  # the template file's content decides the tokens
            files.append(file_fingerprint(source["template"]))
        return cache_key({"tokenizer": tokenizer_fp, "files": files, "split": split, "source": settings,
                          "max_length": self.max_length, "overlong": self.overlong_policy(source),
                          "train_on_prompt": self.train_on_prompt, "on_bad_row": self.on_bad_row})

    def _ensure_demo_data(self) -> None:
        """Generate the demo files the sources point at (`demo_dir`), once, before any is read."""
        if self.demo_dir:
            from .demo import ensure_demo_data

            ensure_demo_data(self.demo_dir)

    def _load_stores(self) -> dict[tuple[str, int, str], TokenStore]:
        """Open cached stores; for the missing ones, check their rows first (fail fast: one bad file
        stops the run before hours of tokenizing the others), then stream them into the cache."""
        if self._stores is not None:
            return self._stores
        self._ensure_demo_data()
        fp = tokenizer_fingerprint(self.tokenizer)
        stores, missing = {}, []
        for unit in self._units():
            group, i, split = unit
            path = self.cache_dir / "tokenized" / self._key(self.sources[group][i], split, fp)
            if (path / "meta.json").exists():
                stores[unit] = TokenStore.open(path)
            else:
                missing.append((unit, path))
        for (group, i, split), _ in missing:
            source = self.sources[group][i]
            if is_local(source["path"]) and not source.get("take_tokens"):  # the others check while streaming
                self._count(source, split)
        for unit, path in missing:
            group, i, split = unit
            stores[unit] = self.tokenize(self.sources[group][i], split, path, keep_answers=split == "val" and
                                         group == "task")
        self._stores = {unit: stores[unit] for unit in self._units()}
        return self._stores

    def tokenize(self, source: dict, split: str, path: Path, keep_answers: bool = False) -> TokenStore:
        """Stream one source split into the store at `path` (or open it, if another process built it)."""
        report = self._report(source, split)

        def finish() -> dict:
            report.check(self.on_bad_row)
            return {"source": source["name"], "split": split, "bad_rows": report.bad}

        return build_store(
            path, self._rows(source, split, report), make_renderer(source, self.tokenizer, self.train_on_prompt),
            self.tokenizer, max_length=self.max_length, overlong=self.overlong_policy(source),
            concat=bool(source.get("concat")), take_tokens=source.get("take_tokens") if split == "train" else None,
            num_proc=self.num_proc, keep_answers=keep_answers, finish=finish, label=f"{source['name']} ({split})")

    @staticmethod
    def _report(source: dict, split: str) -> RowReport:
        return RowReport(source.get("val_path") if split == "val" and source.get("val_path") else source["path"],
                         source["format"])

    def _count(self, source: dict, split: str) -> int:
        """Good rows of a split, read through once without tokenizing; raises DataError on bad rows. The
        first conversation of each kind (roles, tool calls, tools, reasoning...) is rendered: a chat template
        that cannot render what the data holds stops the run here, not hours into tokenizing."""
        report = self._report(source, split)
        chat = source["format"] == "messages"
        renderer = make_renderer(source, self.tokenizer, self.train_on_prompt) if chat else None
        count, kinds = 0, set()
        for row in self._rows(source, split, report):
            count += 1
            if renderer is not None and kind(row) not in kinds:
                kinds.add(kind(row))
                renderer(row)
        report.check(self.on_bad_row)
        return count

    def validate(self) -> dict[str, int]:
        """Read and check every row of every source (no tokenizing): rows per source split.
        Raises DataError on the first bad source (with on_bad_row=stop)."""
        self._ensure_demo_data()
        return {f"{self.sources[g][i]['name']}/{split}": self._count(self.sources[g][i], split)
                for g, i, split in self._units()}

    def prepare_data(self) -> None:
        """Generate demo data and fill the token cache once (Lightning runs this on one process)."""
        self._load_stores()

    def setup(self, stage: str | None = None) -> None:
        """Open the cached stores and build the epoch plan; cheap on a cache hit, safe to call twice."""
        if self.plan is not None:
            return
        stores = self._load_stores()
        self._index = self._units()  # store id -> unit; training stores first, in source order
        self._builder = _Batches([stores[u] for u in self._index], self._pad_id(), self.packing)
        train = [(u, stores[u]) for u in self._index if u[2] == "train"]
        sources = [SourcePlan(self.sources[g][i]["name"], g, self.sources[g][i].get("weight"), s.lengths,
                              s.n_labels) for (g, i, _), s in train]
        for (_, store), p in zip(train, sources, strict=True):
            if len(p.lengths) == 0:
                m = store.meta
                raise DataError(
                    f"source {p.name!r} has no training examples left: of {m['rows']} rows, {m['bad_rows']} were "
                    f"bad and {m['dropped_overlong'] + m['dropped_no_labels']} did not fit "
                    f"max_length={self.max_length} with a label token left; raise data.max_length")
        picks = select(sources, self.replay_ratio, self.mix_by, self.seed)
        items = interleave(picks, self.seed)
        lengths = _per_item([p.lengths for p in sources], items)
        labels = _per_item([p.n_labels for p in sources], items)
        rows = pack(lengths, self.max_length) if self.packing else [[k] for k in range(len(items))]
        rows = [np.array(r, dtype=np.int64) for r in rows]
        self.plan = EpochPlan(items, rows, _per_row(labels, rows), self.batch_size, self.seed)
        self.val_source_names = [g for g in GROUPS if any(u[0] == g and u[2] == "val" for u in self._index)]
        self.stats = self._stats(sources, picks, lengths, stores)

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    # -- loaders --------------------------------------------------------------------------------------

    def train_dataloader(self) -> Any:
        from torchdata.stateful_dataloader import StatefulDataLoader

        self.setup()
        trainer = self.trainer
        world, rank, accumulate = (trainer.world_size, trainer.global_rank, trainer.accumulate_grad_batches) if (
            trainer is not None) else (1, 0, 1)
        sampler = MixtureSampler(self.plan, rank=rank, world_size=world, accumulate=accumulate)
        return StatefulDataLoader(self._builder, sampler=sampler, batch_size=None, num_workers=self.num_workers)

    def val_dataloader(self) -> list[DataLoader]:
        self.setup()
        return [self._eval_loader(self._builder, [k for k, u in enumerate(self._index) if u[0] == g and u[2] == "val"])
                for g in self.val_source_names]

    def heldout_loader(self, source: dict, where: str) -> DataLoader:
        """A loader over a whole extra source (e.g. a forgetting set), streamed, tokenized, cached and
        chunked like the training data and batched like the validation data; `take_tokens` or
        `take_rows` bound it. `where` names the setting in errors."""
        source = {"name": Path(str(source.get("path"))).stem, **source}
        check_source(source, where)
        self._ensure_demo_data()
        path = self.cache_dir / "tokenized" / self._key(source, "train", tokenizer_fingerprint(self.tokenizer))
        store = TokenStore.open(path) if (path / "meta.json").exists() else self.tokenize(source, "train", path)
        return self._eval_loader(_Batches([store], self._pad_id(), self.packing), [0])

    def _eval_loader(self, builder: _Batches, ids: list[int]) -> DataLoader:
        """Every example of the stores `ids` once, packed like training when packing is on, else in
        batches of similar lengths (shortest first): a mean over all of them is the same whatever the
        batches, and rows padded to their batch's longest cost up to twice the tokens in item order."""
        stores = builder.stores
        items = [(s, i) for s in ids for i in range(len(stores[s]))]
        lengths = np.array([stores[s].lengths[i] for s, i in items])
        rows = pack(lengths, self.max_length) if self.packing else [[k] for k in np.argsort(lengths, kind="stable")]
        rows = [tuple(items[k] for k in row) for row in rows]
        batches = []
        for b in range(0, len(rows), self.eval_batch_size):
            chunk = tuple(rows[b: b + self.eval_batch_size])
            batches.append((chunk, int(sum(stores[s].n_labels[i] for row in chunk for s, i in row))))
        return DataLoader(_FixedBatches(builder, batches), batch_size=None, num_workers=self.num_workers)

    def num_train_batches(self, world_size: int) -> int:
        """Micro-batches per rank per epoch, without building a loader (for the LR schedule's length)."""
        self.setup()
        return self.plan.batches_per_rank(world_size)

    def generation_examples(self, n: int) -> list[dict]:
        """Held-out task prompts, exactly as rendered in training up to the completion, and answers;
        taken round-robin over the task sources."""
        self.setup()
        per_source = []
        for k, (group, _, split) in enumerate(self._index):
            store = self._builder.stores[k]
            if group != "task" or split != "val" or not store.meta.get("answers"):
                continue
            answers, starts = store.meta["answers"], store.completion_start
            per_source.append([
                {"prompt_ids": store.tokens[store.offsets[i]: store.offsets[i] + starts[i]].tolist(),
                 "answer": answers[i]}
                for i in range(len(store)) if 0 < starts[i] < store.lengths[i] and answers[i] is not None])
        return _round_robin(per_source)[:n]

    @property
    def stop_token_ids(self) -> list[int]:
        """Tokens that end a completion (EOS, or a chat template's turn end): what generation stops at."""
        ids = {i for s in self.sources["task"] for i in stop_token_ids(make_renderer(s, self.tokenizer, False),
                                                                       self.tokenizer)}
        return sorted(ids)

    # -- stats ----------------------------------------------------------------------------------------

    def _stats(self, sources: list[SourcePlan], picks: list[np.ndarray], lengths: np.ndarray,
               stores: dict) -> dict:
        per_source = {}
        for (group, i, split), store in stores.items():
            name = self.sources[group][i]["name"]
            entry = per_source.setdefault(name, {"group": group})
            meta = store.meta
            prefix = "" if split == "train" else "val_"
            entry.update({f"{prefix}{key}": meta[key] for key in STORE_COUNTS})
        samples = {"task": 0, "replay": 0}
        tokens = {"task": 0, "replay": 0}
        for source, pick in zip(sources, picks, strict=True):
            per_source[source.name]["epoch_samples"] = len(pick)
            per_source[source.name]["epoch_tokens"] = int(source.lengths[pick].sum())
            samples[source.group] += len(pick)
            tokens[source.group] += int(source.lengths[pick].sum())
        order, bounds = self.plan.epoch_batches(0, 1)
        row_tokens = _per_row(lengths, self.plan.rows)[order]
        widths = np.maximum.reduceat(row_tokens, bounds[:-1])
        return {
            "sources": per_source,
            "epoch_samples": sum(samples.values()),
            "epoch_tokens": sum(tokens.values()),
            "replay_fraction_samples": samples["replay"] / max(1, sum(samples.values())),
            "replay_fraction_tokens": tokens["replay"] / max(1, sum(tokens.values())),
            "rows_per_epoch": len(self.plan.rows),
            "nonpad_fraction": float(row_tokens.sum() / (widths * np.diff(bounds)).sum()),
        }


def _per_item(values: list[np.ndarray], items: np.ndarray) -> np.ndarray:
    """values[source][example] for each (source, example) item."""
    out = np.zeros(len(items), dtype=np.int64)
    for s, v in enumerate(values):
        mine = items[:, 0] == s
        out[mine] = v[items[mine, 1]]
    return out


def _per_row(values: np.ndarray, rows: list[np.ndarray]) -> np.ndarray:
    """Sum of the item values in each row."""
    if not rows:
        return np.zeros(0, dtype=np.int64)
    sizes = np.array([len(r) for r in rows])
    return np.add.reduceat(values[np.concatenate(rows)], np.cumsum(sizes) - sizes)


def _round_robin(lists: list[list]) -> list:
    out = []
    for k in range(max((len(x) for x in lists), default=0)):
        out += [x[k] for x in lists if k < len(x)]
    return out


def _plain(node: Any) -> Any:
    """Hydra hands over ListConfig/DictConfig; the module works on plain containers."""
    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=True)
    return [dict(s) if isinstance(s, dict) else s for s in node] if isinstance(node, list | tuple) else node
