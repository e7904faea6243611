"""Packing examples into rows, and turning rows into the training batch tensors.

Packed rows carry no attention mask: `position_ids` restart at 0 for every example (and for the
padding tail), and transformers builds a block-diagonal causal mask from them, so an example attends
only to itself. Each example's first label is masked (it is never predicted by its own tokens), so
the last token of one example never learns to predict the first of the next.
"""

from __future__ import annotations

import numpy as np
import torch

CHUNK = 1024  # items packed together; bigger packs tighter, smaller keeps the stream order closer


def pack(lengths: np.ndarray, max_length: int, chunk: int = CHUNK) -> list[list[int]]:
    """Rows of item indices whose lengths sum to at most max_length: first-fit decreasing within
    consecutive chunks of the stream (tight rows, and each chunk keeps the mixture's proportions)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    rows: list[list[int]] = []
    for start in range(0, len(lengths), chunk):
        ids = start + np.argsort(-lengths[start: start + chunk], kind="stable")
        room = np.zeros(0, dtype=np.int64)  # space left in each open row of this chunk
        members: list[list[int]] = []
        for i in ids.tolist():
            fits = np.flatnonzero(room >= lengths[i])
            if len(fits):
                room[fits[0]] -= lengths[i]
                members[fits[0]].append(i)
            else:
                room = np.append(room, max_length - lengths[i])
                members.append([i])
        rows += [sorted(m) for m in members]
    return rows


def collate(rows: list[list[tuple[np.ndarray, np.ndarray]]], pad_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Rows of (token ids, label mask) examples -> the batch dict of the training contract.

    Padded to the longest row. `labels` are the ids where the mask is set, -100 elsewhere (aligned
    with `input_ids`; the model shifts). `attention_mask` only when not packed.
    """
    row_lengths = [sum(len(ids) for ids, _ in row) for row in rows]
    batch, width = len(rows), max(row_lengths)
    input_ids = np.full((batch, width), pad_id, dtype=np.int64)
    labels = np.full((batch, width), -100, dtype=np.int64)
    position_ids = np.zeros((batch, width), dtype=np.int64)
    for b, row in enumerate(rows):
        at = 0
        for ids, mask in row:
            n = len(ids)
            input_ids[b, at: at + n] = ids
            labels[b, at: at + n] = np.where(mask.astype(bool), ids, -100)
            position_ids[b, at: at + n] = np.arange(n)
            at += n
        position_ids[b, at:] = np.arange(width - at)  # the padding tail is a segment of its own
    out = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
           "position_ids": torch.from_numpy(position_ids)}
    if not packed:
        out["attention_mask"] = torch.from_numpy(
            (np.arange(width)[None, :] < np.array(row_lengths)[:, None]).astype(np.int64))
    out["nonpad_fraction"] = torch.tensor(sum(row_lengths) / (batch * width), dtype=torch.float32)
    out["num_examples"] = torch.tensor(sum(len(row) for row in rows))  # packed rows hold several
    out["squared_lengths"] = torch.tensor(sum(len(ids) ** 2 for row in rows for ids, _ in row))
    return out
