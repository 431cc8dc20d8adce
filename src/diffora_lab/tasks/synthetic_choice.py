"""``synthetic_choice``: generated multiple-choice items in the commonsense (LLM-Adapters) format.

Each item asks for the sentiment of a generated "review" with three answers, ``Answer format:
positive/negative/neutral``, so it exercises the whole commonsense path (instruction,
answer-format parsing, Alpaca template, "the correct answer is X") offline. A review is six to
ten words of one lexicon (the ``synthetic`` task's positive and negative adjectives, and neutral
ones): a signal strong enough that LoRA alone on a tiny random decoder (frozen random embeddings
and attention) learns it within tens of steps, so the smoke run shows learning above chance (1/3).
Sentences with nouns and fillers, as the ``synthetic`` task has, dilute the words too much for
that; full fine-tuning learns them. Deterministic from the seed.
"""

from __future__ import annotations

import random

from diffora_lab.tasks.spec import Examples, RawSplits, TaskSpec, register_tasks
from diffora_lab.tasks.synthetic import _NEGATIVE, _POSITIVE

_NEUTRAL = (
    "ordinary", "average", "typical", "standard", "regular", "plain", "usual", "moderate",
    "common", "routine", "normal", "unremarkable", "middling", "conventional", "everyday",
    "familiar", "predictable", "modest", "acceptable", "adequate",
)  # fmt: skip
ANSWERS = ("positive", "negative", "neutral")
_LEXICONS = (_POSITIVE, _NEGATIVE, _NEUTRAL)

SPEC = TaskSpec(
    name="synthetic_choice",
    glue_dir="",
    text_fields=("instruction", "input"),
    num_labels=3,
    label_names=ANSWERS,
    metrics=("accuracy",),
    primary_metric="accuracy",
    dev_splits=("validation",),
    kinds=("choice",),
    source="synthetic_choice",
)
register_tasks(SPEC)


def _review(rng: random.Random, label: int) -> str:
    """Six to ten words of the label's lexicon: a strong, spread-out signal."""
    return " ".join(rng.sample(_LEXICONS[label], rng.randint(6, 10)))


def instruction(sentence: str) -> str:
    return (
        "Please answer the following question with positive, negative or neutral, review: "
        f"{sentence}\n\nAnswer format: {'/'.join(ANSWERS)}"
    )


def generate_choice_items(seed: int, n_train: int = 600, n_dev: int = 150) -> RawSplits:
    """Train and dev items, labels balanced over the three answers, no sentence twice.

    Raises:
        ValueError: A size below 3.
    """
    for setting, value in (("n_train", n_train), ("n_dev", n_dev)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 3:
            raise ValueError(f"task.synthetic.{setting}={value!r}: an integer >= 3.")
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[tuple[str, int]] = []
    for index in range(n_train + n_dev):
        label = index % 3
        sentence = _review(rng, label)
        while sentence in seen:
            sentence = _review(rng, label)
        seen.add(sentence)
        rows.append((instruction(sentence), label))
    train, dev = rows[:n_train], rows[n_train:]
    rng.shuffle(train)

    def split(part: list[tuple[str, int]]) -> Examples:
        return Examples([text for text, _ in part], None, [label for _, label in part])

    return RawSplits(train=split(train), dev={"validation": split(dev)})
