"""The synthetic task: generated reviews whose label needs word order, deterministic from a seed.

A bag of words cannot solve it, so a pretrained sentence encoder has to adapt: a clause's
polarity is its adjective's, flipped by a negation (``the soup was not very lovely`` is
negative), and a sentence of two clauses of opposite polarity takes the polarity of the clause
its connective stresses (``the soup was lovely but the service was awful``: negative;
``the soup was lovely although the service was awful``: positive). Both clauses of such a
sentence carry the same kinds of words, so only their order and the connective decide. Knobs
(``task.synthetic.*``): the share of negated clauses, the share of two-clause sentences, the
number of adjectives per polarity, and label noise (a share of labels flipped, in train and dev
alike, which caps the dev accuracy at about ``1 - noise``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields

from diffora_lab.tasks.spec import Examples, RawSplits

_POSITIVE = (
    "wonderful", "delightful", "excellent", "superb", "charming", "brilliant", "lovely",
    "pleasant", "fantastic", "marvelous", "terrific", "splendid", "enjoyable", "graceful",
    "inspiring", "gorgeous", "cheerful", "outstanding", "impressive", "elegant", "refreshing",
    "heartwarming", "magnificent", "remarkable", "satisfying", "uplifting", "wholesome",
)  # fmt: skip
_NEGATIVE = (
    "terrible", "awful", "dreadful", "horrible", "boring", "dull", "disappointing", "miserable",
    "unpleasant", "mediocre", "clumsy", "tedious", "annoying", "painful", "gloomy", "ugly",
    "bland", "frustrating", "lousy", "shoddy", "tiresome", "depressing", "awkward",
    "forgettable", "pathetic", "dismal", "sloppy",
)  # fmt: skip
_NOUNS = (
    "movie", "meal", "hotel", "concert", "service", "book", "game", "trip", "lecture", "show",
    "album", "performance", "restaurant", "apartment", "coffee", "story", "class", "party",
    "flight", "museum", "garden", "play", "song", "camera", "interview", "festival", "workshop",
    "visit", "ferry", "soup", "novel", "tour",
)  # fmt: skip
_DETERMINERS = ("the", "our", "this", "that", "my", "their")
_INTENSIFIERS = ("", "", "", "very", "really", "quite", "truly", "rather", "so", "pretty")
_NEGATORS = ("not", "not", "never", "hardly", "far from", "not at all")
_VERBS = ("was", "seemed", "felt", "looked", "turned out")
_FILLERS = (
    "", "", "", "in my opinion", "this time around", "on that rainy evening",
    "according to my friends", "during our last visit", "overall", "if you ask me",
    "last weekend", "by the end",
)  # fmt: skip
# Two clauses of opposite polarity; {main} decides the label, {other} is conceded.
_CONTRASTS = (
    "{other} but {main}",
    "{other} , yet {main}",
    "{other} ; however {main}",
    "although {other} , {main}",
    "{main} although {other}",
    "{main} even though {other}",
    "while {other} , {main}",
    "{main} , despite the fact that {other}",
)
_MAX_WORDS = 24  # MiniLM's word pieces of the longest sentence stay within task.max_length=32
KINDS = ("single", "contrast", "majority")


def _share(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"task.synthetic.{name}={value!r}: a share in [0, 1].")


@dataclass(frozen=True)
class SyntheticSettings:
    """How the synthetic task is generated (``task.synthetic.*``).

    Attributes:
        n_train: Training examples (>= 2).
        n_dev: Dev examples, returned as split ``"validation"`` (>= 2).
        negation: Share of clauses negated (their adjective's polarity flips), in [0, 1].
        contrast: Share of sentences made of two clauses of opposite polarity, where the
            connective decides (``A but B``: B; ``A although B``: A).
        majority: Share of sentences made of three clauses, labelled by the polarity most of
            them have (a count). The rest (1 - contrast - majority) are single clauses.
        lexicon: Adjectives per polarity, 2 to 27 (fewer: each is seen more often).
        noise: Share of labels flipped after generation, in [0, 0.5).
    """

    n_train: int = 2000
    n_dev: int = 400
    negation: float = 0.3
    contrast: float = 0.3
    majority: float = 0.4
    lexicon: int = 27
    noise: float = 0.05

    def __post_init__(self) -> None:
        for name in ("n_train", "n_dev"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ValueError(
                    f"task.synthetic.{name} must be an integer >= 2, got {value!r}; set it to "
                    "a positive even number such as 2000."
                )
        for name in ("negation", "contrast", "majority"):
            _share(name, getattr(self, name))
        if self.contrast + self.majority > 1:
            raise ValueError(
                f"task.synthetic.contrast={self.contrast} + majority={self.majority}: shares of "
                "the sentences, at most 1 together."
            )
        noise = self.noise
        if isinstance(noise, bool) or not isinstance(noise, int | float) or not 0 <= noise < 0.5:
            raise ValueError(
                f"task.synthetic.noise={noise!r}: the share of flipped labels, in [0, 0.5)."
            )
        lexicon = self.lexicon
        if isinstance(lexicon, bool) or not isinstance(lexicon, int) or not 2 <= lexicon <= 27:
            raise ValueError(
                f"task.synthetic.lexicon={lexicon!r}: adjectives per polarity, a whole number "
                "in [2, 27]."
            )


SETTINGS: tuple[str, ...] = tuple(f.name for f in fields(SyntheticSettings))
"""The keys ``task.synthetic`` accepts."""


class _Writer:
    """Writes sentences of a given label with the settings' mix of constructions."""

    def __init__(self, rng: random.Random, settings: SyntheticSettings) -> None:
        self.rng = rng
        self.settings = settings
        self.lexicons = {1: _POSITIVE[: settings.lexicon], 0: _NEGATIVE[: settings.lexicon]}

    def clause(self, polarity: int, noun: str, terse: bool = False) -> str:
        """``the movie was (not) (very) ADJ``: polarity is the adjective's, flipped if negated."""
        rng = self.rng
        negated = rng.random() < self.settings.negation
        adjective = rng.choice(self.lexicons[1 - polarity if negated else polarity])
        negator = rng.choice(_NEGATORS) if negated else ""
        verb = "was" if terse else rng.choice(_VERBS)
        # "not very lovely", but not "hardly very lovely"
        choices = _INTENSIFIERS if not negated else _INTENSIFIERS[:6] if negator == "not" else ("",)
        intensifier = "" if terse else rng.choice(choices)
        return f"{rng.choice(_DETERMINERS)} {noun} {verb} {negator} {intensifier} {adjective}"

    def sentence(self, label: int) -> tuple[str, str]:
        """A sentence of ``label`` and its kind (one of :data:`KINDS`)."""
        rng = self.rng
        draw = rng.random()
        if draw < self.settings.contrast:
            noun, other_noun = rng.sample(_NOUNS, 2)
            main, other = self.clause(label, noun), self.clause(1 - label, other_noun)
            kind, text = "contrast", rng.choice(_CONTRASTS).format(main=main, other=other)
        elif draw < self.settings.contrast + self.settings.majority:
            # Two clauses of the label and one of the other, in any order: a count decides.
            polarities = [label, label, 1 - label]
            rng.shuffle(polarities)
            nouns = rng.sample(_NOUNS, 3)
            first, second, third = (
                self.clause(p, n, terse=True) for p, n in zip(polarities, nouns)
            )
            kind, text = "majority", f"{first} , {second} and {third}"
        else:
            noun = rng.choice(_NOUNS)
            kind, text = "single", f"{self.clause(label, noun)} {rng.choice(_FILLERS)}"
        return " ".join(text.split()), kind


def generate_synthetic(seed: int, n_train: int = 2000, n_dev: int = 400, **knobs) -> RawSplits:
    """Generate the synthetic task, deterministically from ``seed``.

    Labels are balanced in both splits (counts differ by at most one), no sentence appears
    twice (so dev shares none with train), and sentences have at most 24 words.

    Args:
        seed: Seed for ``random.Random``; the same seed and settings give the same splits.
        n_train: Number of training examples (>= 2).
        n_dev: Number of dev examples, returned as split ``"validation"`` (>= 2).
        **knobs: ``negation``, ``contrast``, ``majority``, ``lexicon``, ``noise``
            (:class:`SyntheticSettings`).

    Returns:
        Train and ``{"validation": ...}`` dev splits with ``text_b=None``.

    Raises:
        ValueError: A setting out of range or unknown, or sizes too large for the templates to
            fill with distinct sentences.
    """
    return _generate(seed, n_train, n_dev, **knobs)[0]


def kinds_of(seed: int, n_train: int = 2000, n_dev: int = 400, **knobs) -> dict[str, list[str]]:
    """The kind of each generated sentence (``single``, ``contrast``, ``majority``) by split,
    in the order of :func:`generate_synthetic`'s examples: for accuracy by construction."""
    return _generate(seed, n_train, n_dev, **knobs)[1]


def _generate(seed: int, n_train: int, n_dev: int, **knobs):
    unknown = sorted(set(knobs) - set(SETTINGS))
    if unknown:
        raise ValueError(
            f"task.synthetic has unknown keys {unknown}; the allowed keys are {sorted(SETTINGS)}."
        )
    settings = SyntheticSettings(n_train=n_train, n_dev=n_dev, **knobs)
    rng = random.Random(seed)
    pools = _pools(_Writer(rng, settings), n_train, n_dev)
    need_train = {0: n_train // 2, 1: n_train - n_train // 2}
    noise_rng = random.Random(f"{seed}-noise")  # noise changes labels only, not the sentences
    splits, kinds = {}, {}
    for part in ("train", "dev"):
        rows = []
        for label in (0, 1):
            pool = pools[label]
            chosen = pool[: need_train[label]] if part == "train" else pool[need_train[label] :]
            rows.extend((sentence, label, kind) for sentence, kind in chosen)
        rng.shuffle(rows)
        labels = _flip(noise_rng, [label for _, label, _ in rows], settings.noise)
        splits[part] = Examples(text_a=[text for text, _, _ in rows], text_b=None, labels=labels)
        kinds[part] = [kind for _, _, kind in rows]
    raw = RawSplits(train=splits["train"], dev={"validation": splits["dev"]})
    return raw, {"train": kinds["train"], "validation": kinds["dev"]}


def _pools(writer: _Writer, n_train: int, n_dev: int) -> dict[int, list[tuple[str, str]]]:
    """Distinct (sentence, kind) pairs per label: the train ones first, then the dev ones."""
    needed = {0: n_train // 2 + n_dev // 2, 1: n_train - n_train // 2 + n_dev - n_dev // 2}
    seen: set[str] = set()
    pools: dict[int, list[tuple[str, str]]] = {0: [], 1: []}
    for label in (0, 1):
        attempts = 0
        while len(pools[label]) < needed[label]:
            attempts += 1
            if attempts > 50 * needed[label] + 1000:
                raise ValueError(
                    f"task.synthetic n_train={n_train}, n_dev={n_dev}: could not generate that "
                    "many distinct sentences; lower task.synthetic.n_train or n_dev (or raise "
                    "task.synthetic.lexicon)."
                )
            sentence, kind = writer.sentence(label)
            if sentence in seen or len(sentence.split()) > _MAX_WORDS:
                continue
            seen.add(sentence)
            pools[label].append((sentence, kind))
    return pools


def _flip(rng: random.Random, labels: list[int], noise: float) -> list[int]:
    """Flips ``round(noise * n / 2)`` labels of each class, so the classes stay balanced."""
    flipped = list(labels)
    per_class = round(noise * len(labels) / 2)
    for label in (0, 1):
        indices = [i for i, y in enumerate(labels) if y == label]
        for index in rng.sample(indices, min(per_class, len(indices))):
            flipped[index] = 1 - label
    return flipped
