"""Token rows and batches of the causal-LM choice kind (training, log-likelihood dev, generation).

Training rows are ``context + target + EOS`` tokenized as :func:`~diffora_lab.scoring.encode_pair`
splits them (the same boundary the scorer uses). Too long a row loses context tokens from the left
(after a leading BOS, which stays), never the answer. The loss covers every token
(``train_on_inputs``, the LLM-Adapters default) or only the target's: masked labels are -100.

Batches are padded on the left with ``position_ids`` counting real tokens: the answers end in the
last columns, so a batch that trains on answers only asks the model for the logits of its last
``logits_to_keep`` positions (and labels of that width), not of the whole sequence.

Dev rows are one per (item, choice) for log-likelihood scoring (an item's rows are contiguous and
batched together) or one per item for generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from diffora_lab.scoring import ChoiceItem, collate_rows, encode_pairs, score_row, tok_encode
from diffora_lab.tasks.tokenized import TokenizedSplit, padded_length


def _fit(context: list[int], target: list[int], max_length: int, bos: int | None) -> list[int]:
    """Context truncated from the left (keeping a leading BOS) so context + target fits."""
    target = target[:max_length]
    room = max_length - len(target)
    if len(context) <= room:
        return context
    if room <= 0:
        return []
    if bos is not None and context and context[0] == bos and room > 1:
        return [bos, *context[len(context) - room + 1 :]]
    return context[len(context) - room :]


def train_columns(
    pairs: Sequence[tuple[str, str]], tokenizer, max_length: int, train_on_inputs: bool
) -> dict[str, list]:
    """``input_ids`` and ``n_masked`` (leading tokens without loss) of training rows."""
    eos = tokenizer.eos_token_id
    input_ids, n_masked = [], []
    for context_ids, target_ids in encode_pairs(tokenizer, pairs):
        if eos is not None and (not target_ids or target_ids[-1] != eos):
            target_ids = [*target_ids, eos]
        context_ids = _fit(context_ids, target_ids, max_length, tokenizer.bos_token_id)
        row = (context_ids + target_ids)[:max_length]
        input_ids.append(row)
        n_masked.append(0 if train_on_inputs else min(len(context_ids), len(row) - 1))
    return {"input_ids": input_ids, "n_masked": n_masked}


def dev_columns(items: Sequence[ChoiceItem], tokenizer, max_length: int) -> dict[str, list]:
    """One row per (item, choice): the model's input and the scored continuation tokens."""
    columns: dict[str, list] = {
        k: [] for k in ("input_ids", "targets", "item", "choice", "gold", "char_len")
    }
    pairs = iter(
        encode_pairs(tokenizer, [(i.context, c) for i in items for c in i.continuations()])
    )
    for index, item in enumerate(items):
        for choice in range(len(item.choices)):
            inputs, targets = score_row(*next(pairs), max_length)
            columns["input_ids"].append(inputs)
            columns["targets"].append(targets)
            columns["item"].append(index)
            columns["choice"].append(choice)
            columns["gold"].append(item.gold)
            columns["char_len"].append(len(item.choices[choice]))
    return columns


def generate_columns(
    contexts: Sequence[str], items: Sequence[ChoiceItem], tokenizer, max_length: int
) -> dict[str, list]:
    """One row per item: the prompt's tokens (left-truncated), its choices and gold index."""
    return {
        "input_ids": [tok_encode(tokenizer, context)[-max_length:] for context in contexts],
        "choices": [list(item.choices) for item in items],
        "gold": [item.gold for item in items],
    }


class ItemRows(TokenizedSplit):
    """Dev rows of multiple-choice items: ``len`` counts items (the dev set's size, as reported);
    batches come from :func:`item_batches` over the rows."""

    def __len__(self) -> int:
        return len(set(self.columns["item"]))


def _left_pad(rows: list[list[int]], pad: int, multiple: int, max_length: int | None):
    width = padded_length(max(len(r) for r in rows), multiple, max_length)
    width = max(width, max(len(r) for r in rows))
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention[i, width - len(row) :] = 1
    positions = (attention.cumsum(-1) - 1).clamp_min(0)
    return input_ids, attention, positions


class CausalCollator:
    """Training batches: left-padded rows, labels -100 on padding and masked context."""

    def __init__(self, pad_token_id: int, multiple: int = 0, max_length: int | None = None):
        self.pad_token_id, self.multiple, self.max_length = pad_token_id, multiple, max_length

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [row["input_ids"] for row in rows]
        input_ids, attention, positions = _left_pad(
            ids, self.pad_token_id, self.multiple, self.max_length
        )
        width = input_ids.shape[1]
        lengths = torch.tensor([len(r) for r in ids])
        masked = torch.tensor([row["n_masked"] for row in rows])
        first = (width - lengths + masked).unsqueeze(1)  # first column with a loss
        columns = torch.arange(width).unsqueeze(0)
        labels = torch.where(columns >= first, input_ids, torch.full_like(input_ids, -100))
        keep = 0
        if int(masked.min()) > 0:  # answers only: logits for the answer columns (+1 to predict)
            keep = min(width, int((lengths - masked).max()) + 1)
            labels = labels[:, width - keep :]
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "position_ids": positions,
            "labels": labels,
            "logits_to_keep": keep,
        }


class ChoiceDevCollator:
    """Dev batches of whole items: :func:`~diffora_lab.scoring.collate_rows` plus the grouping.

    ``item`` is renumbered 0..items-1 within the batch; ``gold`` has one entry per item.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate_rows([(r["input_ids"], r["targets"]) for r in rows], self.pad_token_id)
        items = torch.tensor([r["item"] for r in rows])
        first = torch.ones(len(rows), dtype=torch.bool)
        first[1:] = items[1:] != items[:-1]
        batch["item"] = first.long().cumsum(0) - 1
        batch["choice"] = torch.tensor([r["choice"] for r in rows])
        batch["gold"] = torch.tensor([r["gold"] for r in rows])[first]
        batch["char_len"] = torch.tensor([r["char_len"] for r in rows], dtype=torch.float32)
        return batch


class GenerateCollator:
    """Dev batches for generation: left-padded prompts, gold indices, choices (strings)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        input_ids, attention, _ = _left_pad(
            [r["input_ids"] for r in rows], self.pad_token_id, 0, None
        )
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "gold": torch.tensor([r["gold"] for r in rows]),
            "choices": [r["choices"] for r in rows],
        }


def item_batches(split: TokenizedSplit, batch_size: int) -> list[list[int]]:
    """Row indices per dev batch: whole items, by length, up to ``batch_size`` rows each."""
    items, lengths = split.columns["item"], split.lengths()  # one entry per row
    spans: list[list[int]] = []
    for row, item in enumerate(items):
        if not spans or items[spans[-1][0]] != item:
            spans.append([])
        spans[-1].append(row)
    spans.sort(key=lambda rows: max(lengths[r] for r in rows))
    batches: list[list[int]] = []
    for rows in spans:
        if batches and len(batches[-1]) + len(rows) <= batch_size:
            batches[-1].extend(rows)
        else:
            batches.append(list(rows))
    return batches
