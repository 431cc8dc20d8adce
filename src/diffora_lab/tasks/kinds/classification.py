"""``task.kind=classification``: a classifier head on the backbone, cross-entropy on the label.

The GLUE path for encoders: texts (one or a pair) are tokenized with the tokenizer's special
tokens and truncated to ``task.max_length``; the head (``backbone.head_modules``, or the family's:
``classifier``/``pooler`` for BERT-likes, ``score`` for decoders) trains beside the adapters and is
saved with them; dev metrics come from the argmax of the logits (the regression score for STS-B).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffora_lab import backbones
from diffora_lab.metrics import build_metrics, predictions_from_logits
from diffora_lab.tasks.kinds import TaskKind, register_kind
from diffora_lab.tasks.spec import Examples
from diffora_lab.tasks.tokenized import (
    TokenizedSplit,
    cached_columns,
    padded_length,
    tokenizer_identity,
)


class PadCollator:
    """Dynamic padding: each batch is padded to its own longest sequence.

    With ``multiple`` > 0 the width is rounded up to a multiple of it (capped at ``max_length``),
    so batches take one of a bounded set of shapes.
    """

    def __init__(
        self,
        pad_token_id: int,
        regression: bool,
        multiple: int = 0,
        max_length: int | None = None,
    ) -> None:
        self.pad_token_id = pad_token_id
        self.label_dtype = torch.float32 if regression else torch.long
        self.multiple = multiple
        self.max_length = max_length

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(row["input_ids"]) for row in rows)
        width = padded_length(longest, self.multiple, self.max_length)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        has_types = "token_type_ids" in rows[0]
        types = torch.zeros((len(rows), width), dtype=torch.long) if has_types else None
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"])
            attention[i, :n] = 1
            if types is not None:
                types[i, :n] = torch.tensor(row["token_type_ids"])
        batch = {"input_ids": input_ids, "attention_mask": attention}
        if types is not None:
            batch["token_type_ids"] = types
        batch["labels"] = torch.tensor([row["labels"] for row in rows], dtype=self.label_dtype)
        return batch


def _fingerprint(examples: Examples) -> str:
    digest = hashlib.sha1()
    for i in range(len(examples)):
        digest.update(examples.text_a[i].encode())
        if examples.text_b is not None:
            digest.update(b"\x00" + examples.text_b[i].encode())
        digest.update(f"\x01{examples.labels[i]}\x02".encode())
    return digest.hexdigest()


def tokenize(
    examples: Examples,
    tokenizer,
    max_length: int,
    cache_dir: str | Path | None,
) -> TokenizedSplit:
    """Tokenizes a split (truncating to ``max_length``), reusing a disk cache when present.

    The cache key covers the texts and labels, the tokenizer (name, vocabulary size, class) and
    ``max_length``, so a changed file or setting never reads a stale cache.
    """

    def build() -> dict[str, list]:
        args = (examples.text_a,) if examples.text_b is None else (examples.text_a, examples.text_b)
        encoded = tokenizer(*args, truncation=True, max_length=max_length)
        columns = {"input_ids": encoded["input_ids"], "labels": list(examples.labels)}
        if "token_type_ids" in encoded:
            columns["token_type_ids"] = encoded["token_type_ids"]
        return columns

    key = [_fingerprint(examples), *tokenizer_identity(tokenizer), max_length]
    return TokenizedSplit(cached_columns(key, cache_dir, build))


@register_kind
class Classification(TaskKind):
    """Sequence classification (and STS-B regression) with a trained head."""

    name = "classification"
    causal_lm = False
    peft_task_type = "SEQ_CLS"

    def head_modules(self, family_heads: tuple[str, ...], override: list[str] | None) -> list[str]:
        return list(override) if override is not None else list(family_heads)

    def load_model(self, bcfg, vocab_size: int | None, pad_token_id: int | None) -> nn.Module:
        return backbones.load_backbone(
            bcfg, self.spec.num_labels, vocab_size=vocab_size, pad_token_id=pad_token_id
        )

    def tokenize(
        self, examples: Examples, tokenizer, max_length: int, cache_dir, dev: bool = False
    ) -> TokenizedSplit:
        return tokenize(examples, tokenizer, max_length, cache_dir)

    def collator(self, tokenizer, multiple: int, max_length: int, dev: bool = False):
        pad = tokenizer.pad_token_id or 0
        return PadCollator(pad, self.spec.is_regression, multiple, max_length)

    def dev_batches(self, split: TokenizedSplit, batch_size: int, bucketing: int) -> dict:
        if not bucketing:
            return {"batch_size": batch_size, "shuffle": False}
        # Dev metrics do not depend on the order: evaluate in length order, little padding.
        lengths = split.lengths()
        order = sorted(range(len(split)), key=lengths.__getitem__)
        return {
            "batch_sampler": [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        }

    def build_metrics(self) -> nn.Module:
        return build_metrics(self.spec)

    def validation_step(self, host, batch: dict, metrics: nn.Module) -> None:
        labels = batch.pop("labels")
        logits = host(batch).logits
        metrics.update(predictions_from_logits(self.spec, logits), labels)
