"""Multiple-choice scoring of a causal LM by log-likelihood, as lm-evaluation-harness does it.

An item is a context and its choices; each choice is scored by the summed log-probability of its
continuation (``delimiter + choice``) given the context. ``acc`` takes the highest sum, ``acc_norm``
the highest sum divided by the choice's length in characters (lm-evaluation-harness 0.4.13,
``api/task.py``, ``output_type: multiple_choice``).

The tokenization follows lm-evaluation-harness 0.4.13's ``HFLM`` exactly (``api/model.py``
``_encode_pair``, ``models/huggingface.py`` ``tok_encode`` and ``_loglikelihood_tokens``):

- trailing whitespace of the context moves to the front of the continuation;
- ``whole = encode(context + continuation)``, ``context_ids = encode(context)`` and the
  continuation is ``whole[len(context_ids):]`` (a token that straddles the boundary belongs to
  the continuation);
- ``encode`` is ``tokenizer.encode(text)`` with the tokenizer's own special-token default (a
  Llama-3 tokenizer adds its BOS, Qwen2's and SmolLM2's add nothing), except that a text that
  already starts with the prefix token's string is encoded without special tokens;
- an empty context becomes the prefix token (BOS, else EOS);
- the model reads ``(context_ids + continuation_ids)[-(max_length + 1):][:-1]``: truncation from
  the left, at the model's maximum length (``n_positions``, ``max_position_embeddings`` or
  ``n_ctx`` of its config, else 2048).

:func:`encode_pair` and :func:`score_choices` are the public pair (the export checks compare them
against lm-evaluation-harness on the same items); :func:`collate_rows` and
:func:`continuation_logprobs` are what the training loop's dev evaluation batches with (the
``choice`` task kind), so both paths compute the same numbers.

Batches are padded on the left and carry ``position_ids`` (positions count real tokens only, as in
``generate``), so the continuation of every row ends at the last column and the model computes
logits only for the last ``logits_to_keep`` positions instead of the whole sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

DEFAULT_MAX_LENGTH = 2048  # lm-evaluation-harness's default when a config names no length
_LENGTH_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx")


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question.

    Attributes:
        context: The prompt, up to where the answer starts.
        choices: The answer strings, as written after the delimiter (``acc_norm`` divides by
            their length in characters).
        gold: Index of the correct choice (None when unknown).
        delimiter: What separates the context from a choice (lm-evaluation-harness's
            ``target_delimiter``, a space by default).
    """

    context: str
    choices: tuple[str, ...]
    gold: int | None = None
    delimiter: str = " "

    def continuations(self) -> list[str]:
        """The scored strings: ``delimiter + choice`` for each choice."""
        return [self.delimiter + choice for choice in self.choices]


def prefix_token_id(tokenizer) -> int:
    """The token an empty context becomes: BOS, else EOS (``HFLM.prefix_token_id``)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def tok_encode(tokenizer, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """``HFLM.tok_encode``: the tokenizer's default special tokens, none if ``text`` has BOS."""
    kwargs: dict[str, Any] = {}
    if add_special_tokens is not None:
        kwargs["add_special_tokens"] = add_special_tokens
    else:
        prefix = prefix_token_id(tokenizer)
        if prefix is not None and text.startswith(tokenizer.decode(prefix)):
            kwargs["add_special_tokens"] = False
    return tokenizer.encode(text, **kwargs)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context and its continuation, split as lm-evaluation-harness splits them.

    Args:
        tokenizer: A Hugging Face tokenizer.
        context: The conditioning text.
        continuation: The scored text (usually ``" " + choice``).

    Returns:
        ``(context_ids, continuation_ids)``.
    """
    if context == "":
        continuation_ids = tok_encode(tokenizer, continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        if prefix != continuation_ids[0]:
            return [prefix], continuation_ids
        return continuation_ids[:1], continuation_ids[1:]
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tok_encode(tokenizer, context + continuation)
    context_ids = tok_encode(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


def _encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    """:func:`tok_encode` of many texts with two batched tokenizer calls (same ids)."""
    prefix = prefix_token_id(tokenizer)
    marker = tokenizer.decode(prefix) if prefix is not None else None
    plain = [i for i, t in enumerate(texts) if not (marker and t.startswith(marker))]
    marked = [i for i, t in enumerate(texts) if marker and t.startswith(marker)]
    ids: list[list[int]] = [[] for _ in texts]
    for group, special in ((plain, {}), (marked, {"add_special_tokens": False})):
        if group:
            encoded = tokenizer([texts[i] for i in group], **special)["input_ids"]
            for i, row in zip(group, encoded):
                ids[i] = list(row)
    return ids


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """:func:`encode_pair` of many pairs, batched (a split's worth of prompts at once)."""
    contexts, wholes, empty = [], [], {}
    for index, (context, continuation) in enumerate(pairs):
        if context == "":
            empty[index] = encode_pair(tokenizer, context, continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation, context = context[-spaces:] + continuation, context[:-spaces]
        contexts.append(context)
        wholes.append(context + continuation)
    context_ids = _encode_many(tokenizer, contexts)
    whole_ids = _encode_many(tokenizer, wholes)
    return [
        empty[i] if i in empty else (ctx, whole[len(ctx) :])
        for i, (ctx, whole) in enumerate(zip(context_ids, whole_ids))
    ]


def model_max_length(model: nn.Module, tokenizer=None) -> int:
    """The context length lm-evaluation-harness would use for this model."""
    config = getattr(model, "config", None)
    for attr in _LENGTH_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10**9:
        return limit
    return DEFAULT_MAX_LENGTH


def score_row(
    context_ids: list[int], continuation_ids: list[int], max_length: int
) -> tuple[list[int], list[int]]:
    """The model's input for one (context, continuation) pair, and the scored tokens.

    Raises:
        ValueError: The continuation is empty (nothing to score).
    """
    if not continuation_ids:
        raise ValueError("a continuation tokenizes to nothing; there is no token to score")
    return (context_ids + continuation_ids)[-(max_length + 1) :][:-1], list(continuation_ids)


def collate_rows(rows: Sequence[tuple[list[int], list[int]]], pad_token_id: int) -> dict:
    """A left-padded batch of ``(input_ids, continuation_ids)`` rows (see :func:`score_row`).

    Rows with the same input (the choices of an item whose continuations differ only in their
    last token: one-token answers, ``answer1``/``answer2``) are run once, as lm-evaluation-harness
    does with its logits cache.

    Returns:
        ``input_ids``, ``attention_mask``, ``position_ids`` (the distinct inputs, what the model
        reads), the int ``logits_to_keep`` (the longest continuation), ``row_input`` (each row's
        input), and ``targets`` / ``target_mask`` (continuation tokens right-aligned in
        ``logits_to_keep`` columns, one row per row).
    """
    distinct: dict[tuple[int, ...], int] = {}
    row_input = [distinct.setdefault(tuple(inputs), len(distinct)) for inputs, _ in rows]
    inputs_list = list(distinct)
    width = max(len(inputs) for inputs in inputs_list)
    keep = max(len(targets) for _, targets in rows)
    input_ids = torch.full((len(inputs_list), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(inputs_list), width), dtype=torch.long)
    for i, inputs in enumerate(inputs_list):
        input_ids[i, width - len(inputs) :] = torch.tensor(inputs)
        attention[i, width - len(inputs) :] = 1
    targets = torch.zeros((len(rows), keep), dtype=torch.long)
    target_mask = torch.zeros((len(rows), keep), dtype=torch.bool)
    for i, (_, scored) in enumerate(rows):
        targets[i, keep - len(scored) :] = torch.tensor(scored)
        target_mask[i, keep - len(scored) :] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "position_ids": left_padded_positions(attention),
        "logits_to_keep": keep,
        "row_input": torch.tensor(row_input),
        "targets": targets,
        "target_mask": target_mask,
    }


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only (0 for padding), as ``generate`` computes them."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp_min(0)


def continuation_logprobs(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the continuations, and whether each is the greedy one.

    Args:
        logits: ``[inputs, logits_to_keep, vocab]``: the model's last ``logits_to_keep`` logits
            for each distinct input, whose last column predicts the token after the input.
        batch: A :func:`collate_rows` batch (``row_input``, ``targets``, ``target_mask``).

    Returns:
        ``(loglik, is_greedy)``, each ``[rows]`` (float32 and bool), on the logits' device.
    """
    targets, target_mask = batch["targets"], batch["target_mask"]
    logprobs = torch.log_softmax(logits.float(), dim=-1)[batch["row_input"]]
    picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    loglik = (picked * target_mask).sum(-1)
    greedy = ((logprobs.argmax(-1) == targets) | ~target_mask).all(-1)
    return loglik, greedy


def model_inputs(batch: dict) -> dict:
    """The keys of a :func:`collate_rows` batch that the model reads."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "logits_to_keep")}


def _item_batches(lengths: list[int], sizes: list[int], batch_size: int) -> list[list[int]]:
    """Whole items per batch, longest first: up to ``batch_size`` rows (or one larger item)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    rows = 0
    for index in order:
        if batches and rows + sizes[index] <= batch_size:
            batches[-1].append(index)
            rows += sizes[index]
        else:
            batches.append([index])
            rows = sizes[index]
    return batches


@torch.no_grad()
def score_choices(
    model: nn.Module,
    tokenizer,
    items: Sequence[ChoiceItem],
    batch_size: int = 16,
    max_length: int | None = None,
) -> list[list[tuple[float, bool]]]:
    """``(loglik, is_greedy)`` of every choice of every item, as lm-evaluation-harness computes.

    Args:
        model: A causal LM (a transformers model or a peft model around one), in eval mode.
        tokenizer: Its tokenizer.
        items: The questions.
        batch_size: Rows (choices) per forward pass; an item's choices share one batch.
        max_length: Context length (default: :func:`model_max_length`).

    Returns:
        One list per item, one ``(loglik, is_greedy)`` per choice, in the given order.
    """
    max_length = max_length or model_max_length(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [
        [
            score_row(*encode_pair(tokenizer, item.context, c), max_length)
            for c in item.continuations()
        ]
        for item in items
    ]
    lengths = [max(len(inputs) for inputs, _ in item_rows) for item_rows in rows]
    device = next(model.parameters()).device
    results: list[list[tuple[float, bool]]] = [[] for _ in items]
    for indices in _item_batches(lengths, [len(r) for r in rows], batch_size):
        batch = collate_rows([row for i in indices for row in rows[i]], pad)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        logits = model(**model_inputs(batch)).logits
        loglik, greedy = continuation_logprobs(logits, batch)
        pairs = list(zip(loglik.tolist(), greedy.tolist()))
        for i in indices:
            results[i], pairs = pairs[: len(rows[i])], pairs[len(rows[i]) :]
    return results


def choice_predictions(scores: list[tuple[float, bool]], choices: Sequence[str]) -> tuple[int, int]:
    """``(acc, acc_norm)`` predictions of one item: argmax of loglik, of loglik / characters."""
    logliks = [loglik for loglik, _ in scores]
    normed = [loglik / len(choice) for loglik, choice in zip(logliks, choices)]
    return max(range(len(logliks)), key=logliks.__getitem__), max(
        range(len(normed)), key=normed.__getitem__
    )
