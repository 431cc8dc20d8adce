"""Prompts: how an example becomes a causal-LM question with answer choices (``task.kind=choice``).

GLUE tasks use lm-evaluation-harness's GLUE prompts and label words (0.4.13,
``tasks/glue/*/default.yaml``), so a decoder's GLUE numbers here are those of ``lm_eval --tasks
sst2,...`` on the same model: SST-2 "...\\nQuestion: Is this sentence positive or negative?\\n
Answer:" with ``negative``/``positive``, CoLA ``no``/``yes``, RTE ``True``/``False``, ... The
synthetic task reads like SST-2. ``task.label_words=[a,b]`` replaces the words (label order).

The commonsense suite (LLM-Adapters / DoRA format) puts each item's instruction into the Alpaca
template (the input-less variant when ``input`` is empty) and answers "the correct answer is X",
where X is one of the words listed on the instruction's ``Answer format: a/b/c`` line. The
template is Stanford Alpaca's, without the indentation the LLM-Adapters scripts' triple-quoted
strings carry.

Training text is ``context + target``: the target is ``delimiter + word`` (GLUE) or
``"the correct answer is" + delimiter + word`` (commonsense, the item's ``output``). Scoring reads
``context (+ answer prefix)`` and compares ``delimiter + word`` over the choices.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from diffora_lab.scoring import ChoiceItem

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ANSWER_FORMAT = re.compile(r"Answer format:\s*([^\n]+)")


def answer_format(instruction: str) -> tuple[str, ...] | None:
    """The choices an instruction's ``Answer format: a/b/c`` line lists, or None."""
    found = ANSWER_FORMAT.search(instruction)
    if found is None:
        return None
    return tuple(part.strip() for part in found.group(1).strip().split("/"))


@dataclass(frozen=True)
class Prompt:
    """How one task's examples read as questions.

    Attributes:
        template: ``str.format`` template over ``a`` (first text) and ``b`` (second text).
        label_words: The answer words in label order; None: each item's instruction lists them.
        answer_prefix: Text the answer follows (``the correct answer is``), scored as context.
        delimiter: Between the context and the answer word.
        train_on_inputs: Default of ``task.train_on_inputs`` (loss on the prompt's tokens too).
        alpaca: ``template`` is ignored; the Alpaca template wraps the instruction (and input).
        period_b: Ends the second text with a period (lm-evaluation-harness's MNLI prompt).
    """

    template: str
    label_words: tuple[str, ...] | None
    answer_prefix: str = ""
    delimiter: str = " "
    train_on_inputs: bool = False
    alpaca: bool = False
    period_b: bool = False

    def render(self, a: str, b: str | None) -> str:
        """The prompt for one example, up to where the response starts."""
        if self.alpaca:
            if b:
                return ALPACA_INPUT.format(instruction=a, input=b)
            return ALPACA.format(instruction=a)
        if self.period_b and b is not None:
            b = b.strip() + ("" if b.strip().endswith(".") else ".")
        return self.template.format(a=a, b=b)

    def choices(self, a: str) -> tuple[str, ...] | None:
        """The answer words of an example (None: its instruction lists none)."""
        return self.label_words if self.label_words is not None else answer_format(a)

    def item(self, a: str, b: str | None, label: int | None = None) -> ChoiceItem:
        """The scored question: context with the answer prefix, the choices, the gold index."""
        context = self.render(a, b) + self.answer_prefix
        return ChoiceItem(context, tuple(self.choices(a) or ()), label, self.delimiter)

    def train_pair(self, a: str, b: str | None, label: int) -> tuple[str, str]:
        """``(context, target)`` of a training example: the prompt and its answer text."""
        words = self.choices(a) or ()
        answer = self.answer_prefix + self.delimiter if self.answer_prefix else self.delimiter
        return self.render(a, b), answer + words[label]

    def with_words(self, words: tuple[str, ...]) -> Prompt:
        return replace(self, label_words=tuple(words))


def _glue(template: str, *words: str, period_b: bool = False) -> Prompt:
    return Prompt(template, tuple(words), period_b=period_b)


_QUESTION = "\nQuestion: "
PROMPTS: dict[str, Prompt] = {
    "sst2": _glue(
        "{a}" + _QUESTION + "Is this sentence positive or negative?\nAnswer:",
        "negative",
        "positive",
    ),
    "synthetic": _glue(
        "{a}" + _QUESTION + "Is this sentence positive or negative?\nAnswer:",
        "negative",
        "positive",
    ),
    "cola": _glue("{a}" + _QUESTION + "Does this sentence make sense?\nAnswer:", "no", "yes"),
    "rte": _glue("{a}" + _QUESTION + "{b} True or False?\nAnswer:", "True", "False"),
    "mrpc": _glue(
        "Sentence 1: {a}\nSentence 2: {b}"
        + _QUESTION
        + "Do both sentences mean the same thing?\nAnswer:",
        "no",
        "yes",
    ),
    "qnli": _glue(
        "{a}\n{b}" + _QUESTION + "Does this response answer the question?\nAnswer:", "yes", "no"
    ),
    "qqp": _glue(
        "Question 1: {a}\nQuestion 2: {b}"
        + _QUESTION
        + "Do both questions ask the same thing?\nAnswer:",
        "no",
        "yes",
    ),
    "mnli": _glue(
        "{a}" + _QUESTION + "{b} True, False or Neither?\nAnswer:",
        "True",
        "Neither",
        "False",
        period_b=True,
    ),
}
"""GLUE-style prompts by task name (lm-evaluation-harness's, label words in label-id order)."""

COMMONSENSE = Prompt(
    "", None, answer_prefix="the correct answer is", train_on_inputs=True, alpaca=True
)
"""The LLM-Adapters / DoRA commonsense format (Alpaca template, answers from ``Answer format:``)."""
