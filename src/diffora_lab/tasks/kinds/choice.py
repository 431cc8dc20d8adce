"""``task.kind=choice``: a causal LM answers multiple-choice questions (decoder backbones).

Training: the causal-LM loss on ``prompt + answer + EOS`` (``model(**batch).loss``; the
architecture step on search batches uses the same loss), over every token with
``task.train_on_inputs=true`` (the LLM-Adapters / DoRA default, and the commonsense tasks')
or over the answer's tokens only (the GLUE prompts' default). No head trains: the tied ``lm_head``
stays frozen, and peft's ``task_type`` is ``CAUSAL_LM``.

Scoring (``task.scoring``):

- ``loglik`` (default): every choice's log-likelihood given the prompt
  (:mod:`diffora_lab.scoring`, lm-evaluation-harness's convention); the task's metrics
  (``accuracy``, ``mcc`` for CoLA, ...) come from the most likely choice and ``acc_norm`` from
  the most likely per character of the choice;
- ``generate``: the papers' protocol: greedy generation of ``task.max_new_tokens`` tokens after
  the prompt, and the first answer word a regex finds there is the prediction (no word found
  counts as wrong). It measures format-following too, so it is not the default.

Settings read from ``task``: ``train_on_inputs`` (null: the prompt's default), ``scoring``,
``label_words`` (GLUE prompts' answer words, label order), ``eval_max_length`` (scoring context,
default the model's maximum), ``max_new_tokens``.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from diffora_lab import backbones
from diffora_lab.metrics import build_metrics
from diffora_lab.scoring import continuation_logprobs, encode_pair, model_inputs
from diffora_lab.tasks.kinds import TaskKind, register_kind
from diffora_lab.tasks.kinds import choice_data as rows
from diffora_lab.tasks.kinds.classification import _fingerprint
from diffora_lab.tasks.prompts import COMMONSENSE, PROMPTS, Prompt
from diffora_lab.tasks.spec import Examples
from diffora_lab.tasks.tokenized import TokenizedSplit, cached_columns, tokenizer_identity

SCORINGS = ("loglik", "generate")


class ChoiceMetrics(nn.Module):
    """The task's metrics of the predictions, plus ``acc_norm`` of the length-normalised ones."""

    def __init__(self, spec, normalized: bool = True) -> None:
        super().__init__()
        self.plain = build_metrics(spec)
        self.norm = MulticlassAccuracy(spec.num_labels, average="micro") if normalized else None

    def update(self, pred: torch.Tensor, pred_norm: torch.Tensor | None, gold: torch.Tensor):
        self.plain.update(pred, gold)
        if self.norm is not None:
            self.norm.update(pred_norm, gold)

    def compute(self) -> dict[str, torch.Tensor]:
        values = dict(self.plain.compute())
        if self.norm is not None:
            values["acc_norm"] = self.norm.compute()
        return values

    def reset(self) -> None:
        self.plain.reset()
        if self.norm is not None:
            self.norm.reset()


@register_kind
class Choice(TaskKind):
    """Causal-LM multiple choice (commonsense suite, GLUE as prompts, ``synthetic_choice``)."""

    name = "choice"
    causal_lm = True
    peft_task_type = "CAUSAL_LM"

    @property
    def _base_prompt(self) -> Prompt:
        return PROMPTS.get(self.spec.name, COMMONSENSE)

    @property
    def prompt(self) -> Prompt:
        prompt = self._base_prompt
        words = self.options.get("label_words")
        return prompt.with_words(tuple(str(w) for w in words)) if words is not None else prompt

    @property
    def scoring(self) -> str:
        return str(self.options.get("scoring") or "loglik")

    @property
    def train_on_inputs(self) -> bool:
        value = self.options.get("train_on_inputs")
        return self.prompt.train_on_inputs if value is None else bool(value)

    def check(self, tokenizer) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"task.scoring={self.scoring!r}: choose one of {list(SCORINGS)}.")
        if not isinstance(self.options.get("train_on_inputs", False) or False, bool):
            raise ValueError(
                f"task.train_on_inputs={self.options['train_on_inputs']!r}: true, false or null."
            )
        words = self.prompt.label_words
        if self.options.get("label_words") is not None and self._base_prompt.label_words is None:
            raise ValueError(
                f"task.label_words: task {self.spec.name!r} reads each item's answers from its "
                "'Answer format' line; remove task.label_words."
            )
        if words is None:
            return
        setting = "task.label_words" if self.options.get("label_words") is not None else "task"
        if len(words) != self.spec.num_labels:
            raise ValueError(
                f"{setting}={list(words)}: task {self.spec.name!r} has {self.spec.num_labels} "
                f"labels; give one answer word per label, in label order."
            )
        self._check_words(words, tokenizer, setting)

    def _check_words(self, words, tokenizer, setting: str) -> None:
        """Every answer is a distinct word with at least one token after the prompt."""
        context = self.prompt.item("x", "y").context
        for word in words:
            _, ids = encode_pair(tokenizer, context, self.prompt.delimiter + word)
            if not word.strip() or not ids:
                raise ValueError(
                    f"{setting}: the answer {word!r} of task {self.spec.name!r} tokenizes to "
                    "nothing; every answer needs a word the model can score."
                )
        if len(set(words)) != len(words):
            raise ValueError(f"{setting}={list(words)}: the answers must be distinct.")

    def check_data(self, raw_splits, tokenizer) -> None:
        if self.prompt.label_words is not None:
            return
        words: set[str] = set()
        for examples in [raw_splits.train, *raw_splits.dev.values()]:
            words.update(w for a in set(examples.text_a) for w in self.prompt.choices(a) or ())
        self._check_words(sorted(words), tokenizer, "the items' answer words")

    def head_modules(self, family_heads: tuple[str, ...], override: list[str] | None) -> list[str]:
        return []  # the (tied) lm_head stays frozen; only the adapters train

    def load_model(self, bcfg, vocab_size: int | None, pad_token_id: int | None) -> nn.Module:
        return backbones.load_backbone(
            bcfg, vocab_size=vocab_size, causal_lm=True, pad_token_id=pad_token_id
        )

    def _items(self, examples: Examples):
        second = examples.text_b or [None] * len(examples)
        return [
            self.prompt.item(a, b, y) for a, b, y in zip(examples.text_a, second, examples.labels)
        ]

    def tokenize(
        self, examples: Examples, tokenizer, max_length: int, cache_dir, dev: bool = False
    ) -> TokenizedSplit:
        prompt, scoring = self.prompt, self.scoring
        eval_length = int(self.options.get("eval_max_length") or max_length)
        mode = (scoring if dev else "train", self.train_on_inputs, eval_length if dev else None)
        key = [
            _fingerprint(examples),
            *tokenizer_identity(tokenizer),
            max_length,
            repr(prompt),
            *mode,
        ]

        def build() -> dict[str, list]:
            if not dev:
                second = examples.text_b or [None] * len(examples)
                pairs = [
                    prompt.train_pair(*x) for x in zip(examples.text_a, second, examples.labels)
                ]
                return rows.train_columns(pairs, tokenizer, max_length, self.train_on_inputs)
            items = self._items(examples)
            if scoring == "generate":
                second = examples.text_b or [None] * len(examples)
                contexts = [prompt.render(a, b) for a, b in zip(examples.text_a, second)]
                return rows.generate_columns(contexts, items, tokenizer, eval_length)
            return rows.dev_columns(items, tokenizer, eval_length)

        columns = cached_columns(key, cache_dir, build)
        if dev and scoring == "loglik":
            return rows.ItemRows(columns)
        return TokenizedSplit(columns)

    def collator(self, tokenizer, multiple: int, max_length: int, dev: bool = False):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if not dev:
            return rows.CausalCollator(pad, multiple, max_length)
        self.tokenizer = tokenizer  # generation decodes its answers
        return (
            rows.GenerateCollator(pad)
            if self.scoring == "generate"
            else rows.ChoiceDevCollator(pad)
        )

    def dev_batches(self, split: TokenizedSplit, batch_size: int, bucketing: int) -> dict:
        if self.scoring == "generate":
            lengths = split.lengths()
            order = sorted(range(len(split)), key=lengths.__getitem__)
            return {
                "batch_sampler": [
                    order[i : i + batch_size] for i in range(0, len(order), batch_size)
                ]
            }
        return {"batch_sampler": rows.item_batches(split, batch_size)}

    def build_metrics(self) -> nn.Module:
        return ChoiceMetrics(self.spec, normalized=self.scoring == "loglik")

    def validation_step(self, host, batch: dict, metrics: nn.Module) -> None:
        if self.scoring == "generate":
            self._generate_step(host, batch, metrics)
            return
        logits = host(model_inputs(batch)).logits
        loglik, _ = continuation_logprobs(logits, batch)
        shape = (batch["gold"].shape[0], self.spec.num_labels)
        scores = loglik.new_full(shape, float("-inf"))
        normed = loglik.new_full(shape, float("-inf"))
        scores[batch["item"], batch["choice"]] = loglik
        normed[batch["item"], batch["choice"]] = loglik / batch["char_len"]
        metrics.update(scores.argmax(-1), normed.argmax(-1), batch["gold"])

    def _generate_step(self, host, batch: dict, metrics: nn.Module) -> None:
        tokenizer, width = self.tokenizer, batch["input_ids"].shape[1]
        output = host.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=int(self.options.get("max_new_tokens") or 32),
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
        gold = batch["gold"]
        pred = [_first_answer(text, choices) for text, choices in zip(texts, batch["choices"])]
        # No answer found counts as wrong: the next choice stands in for it.
        preds = [
            p if p >= 0 else (int(g) + 1) % len(c) for p, g, c in zip(pred, gold, batch["choices"])
        ]
        metrics.update(torch.tensor(preds, device=gold.device), None, gold)


def _first_answer(text: str, choices: list[str]) -> int:
    """Index of the choice that occurs first in ``text`` (longest at a tie), or -1."""
    pattern = "|".join(re.escape(c) for c in sorted(choices, key=len, reverse=True))
    found = re.search(pattern, text)
    return choices.index(found.group(0)) if found else -1
