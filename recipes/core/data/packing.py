"""Sequences into training rows, and rows into batches.

- Text (`concatenate_into_blocks`): documents, each ending in EOS, are one token stream cut into `block_size`
  blocks; a block may span documents (pre-training style), the remainder is dropped.
- Instruction and chat examples (`pack_examples`, `--packing true`): whole examples share a row of at most
  `block_size` tokens, placed best-fit decreasing. `position_ids` restart at 0 for each example, which is how
  transformers (5.x, `attention_mask` None, no cache) tells packed examples apart: sdpa and eager attention then keep
  each example to itself, and flash attention uses the same positions. The first label of each example is ignored,
  so no example is trained to predict its first token from the one before it.
- `--packing false`: one example per row; the collator pads each batch to its longest row with an attention mask.

`PaddingCollator` pads a batch and reports `token_counts` (non-padding input tokens, tokens the loss is on), which
the loop takes out of the batch before the forward pass.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from itertools import chain

import torch
from optimizer_recipes.core.data.chat_masks import IGNORE_INDEX


def concatenate_into_blocks(batch: dict, block_size: int) -> dict:
    """datasets.map(batched=True): tokenized documents -> `block_size` blocks of the stream, labels = inputs."""
    stream = list(chain.from_iterable(batch["input_ids"]))
    usable = len(stream) // block_size * block_size
    blocks = [stream[i:i + block_size] for i in range(0, usable, block_size)]
    return {"input_ids": blocks, "labels": [list(b) for b in blocks]}


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity`, longest first, each into the fullest bin it
    fits (a sorted list of free space: O(n log n) look-ups)."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[index]
        at = bisect_left(free, (length, -1))
        if at < len(free):
            space, target = free.pop(at)
        else:
            space, target = capacity, len(bins)
            bins.append([])
        bins[target].append(index)
        if space - length > 0:
            insort(free, (space - length, target))
    return bins


def pack_examples(batch: dict, block_size: int) -> dict:
    """datasets.map(batched=True): examples (each at most block_size long) -> packed rows with restarting
    position_ids."""
    rows = {"input_ids": [], "labels": [], "position_ids": []}
    for members in best_fit_decreasing([len(ids) for ids in batch["input_ids"]], block_size):
        ids, labels, positions = [], [], []
        for index in members:
            example_ids = batch["input_ids"][index]
            ids += example_ids
            labels += [IGNORE_INDEX] + batch["labels"][index][1:]
            positions += range(len(example_ids))
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
        rows["position_ids"].append(positions)
    return rows


class PaddingCollator:
    """Pads rows to the batch's longest: input_ids with `pad_token_id`, labels with IGNORE_INDEX; packed rows get
    padding positions that restart at 0 (a separate, ignored sequence), unpacked rows an attention mask."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        pad = [longest - len(r["input_ids"]) for r in rows]
        batch = {"input_ids": torch.tensor([r["input_ids"] + [self.pad_token_id] * n for r, n in zip(rows, pad)]),
                 "labels": torch.tensor([r["labels"] + [IGNORE_INDEX] * n for r, n in zip(rows, pad)])}
        if "position_ids" in rows[0]:
            batch["position_ids"] = torch.tensor([list(r["position_ids"]) + list(range(n)) for r, n in zip(rows, pad)])
        elif any(pad):
            batch["attention_mask"] = torch.tensor([[1] * (longest - n) + [0] * n for n in pad])
        trained = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()  # the model shifts labels by one
        batch["token_counts"] = torch.stack([torch.tensor(longest * len(rows) - sum(pad)), trained])
        return batch
