"""The synthetic task: a generated sentiment-like binary task, deterministic from a seed."""

from __future__ import annotations

import random

from diffora_lab.tasks.spec import Examples, RawSplits

# --------------------------------------------------------------------------------------------
# Synthetic task

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
_INTENSIFIERS = (
    "", "", "very", "really", "quite", "truly", "rather", "extremely", "remarkably",
    "surprisingly", "genuinely", "pretty", "so", "absolutely",
)  # fmt: skip
_FILLERS = (
    "", "", "in my opinion", "from start to finish", "for the whole family", "this time around",
    "on that rainy evening", "according to my friends", "as far as i could tell",
    "during our last visit", "for what it cost", "overall", "by the end", "at least for me",
    "if you ask me", "last weekend", "from what we saw", "after all the waiting",
)  # fmt: skip
_TEMPLATES = (
    "{det} {noun} was {intensifier} {adj} {filler}",
    "i thought {det} {noun} was {intensifier} {adj} {filler}",
    "we found {det} {noun} {intensifier} {adj} {filler}",
    "everyone said {det} {noun} seemed {intensifier} {adj}",
    "{det} {noun} and the {noun2} were both {intensifier} {adj}",
    "honestly {det} {noun} turned out {intensifier} {adj} {filler}",
    "{det} {noun} was {adj} and {adj2} {filler}",
    "{filler} {det} {noun} felt {intensifier} {adj}",
    "my sister called {det} {noun} {intensifier} {adj} {filler}",
    "the reviews of {det} {noun} were {intensifier} {adj}",
)
_MIN_WORDS, _MAX_WORDS = 6, 14


def _synthetic_sentence(rng: random.Random, label: int) -> str:
    lexicon = _POSITIVE if label == 1 else _NEGATIVE
    adj, adj2 = rng.sample(lexicon, 2)
    noun, noun2 = rng.sample(_NOUNS, 2)
    text = rng.choice(_TEMPLATES).format(
        det=rng.choice(_DETERMINERS),
        noun=noun,
        noun2=noun2,
        intensifier=rng.choice(_INTENSIFIERS),
        adj=adj,
        adj2=adj2,
        filler=rng.choice(_FILLERS),
    )
    return " ".join(text.split())


def generate_synthetic(seed: int, n_train: int = 2000, n_dev: int = 400) -> RawSplits:
    """Generate the synthetic sentiment-like task, deterministically from ``seed``.

    Sentences of 6-14 words come from a few templates over nouns, intensifiers, neutral fillers
    and one of two adjective lexicons (27 positive, 27 negative words); the label is the
    lexicon's polarity (0 negative, 1 positive). Labels are balanced in both splits (counts
    differ by at most one) and no sentence appears twice, so dev shares none with train.

    Args:
        seed: Seed for ``random.Random``; the same seed gives the same splits.
        n_train: Number of training examples (>= 2).
        n_dev: Number of dev examples, returned as split ``"validation"`` (>= 2).

    Returns:
        Train and ``{"validation": ...}`` dev splits with ``text_b=None``.

    Raises:
        ValueError: A size is not an integer >= 2, or too large for the templates to fill with
            distinct sentences.
    """
    for setting, value in (("n_train", n_train), ("n_dev", n_dev)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(
                f"task.synthetic.{setting} must be an integer >= 2, got {value!r}; set it to "
                "a positive even number such as 2000."
            )
    rng = random.Random(seed)
    # Per label: the first `need_train` sentences go to train, the rest to dev.
    need_train = {0: n_train // 2, 1: n_train - n_train // 2}
    need_dev = {0: n_dev // 2, 1: n_dev - n_dev // 2}
    seen: set[str] = set()
    pools: dict[int, list[str]] = {0: [], 1: []}
    for label in (0, 1):
        needed = need_train[label] + need_dev[label]
        attempts = 0
        while len(pools[label]) < needed:
            attempts += 1
            if attempts > 50 * needed + 1000:
                raise ValueError(
                    f"task.synthetic n_train={n_train}, n_dev={n_dev}: could not generate that "
                    "many distinct sentences; lower task.synthetic.n_train or n_dev."
                )
            sentence = _synthetic_sentence(rng, label)
            if sentence in seen or not _MIN_WORDS <= len(sentence.split()) <= _MAX_WORDS:
                continue
            seen.add(sentence)
            pools[label].append(sentence)

    def make_split(part: str) -> Examples:
        pairs = []
        for label in (0, 1):
            pool = pools[label]
            chosen = pool[: need_train[label]] if part == "train" else pool[need_train[label] :]
            pairs.extend((sentence, label) for sentence in chosen)
        rng.shuffle(pairs)
        return Examples(
            text_a=[sentence for sentence, _ in pairs],
            text_b=None,
            labels=[label for _, label in pairs],
        )

    return RawSplits(train=make_split("train"), dev={"validation": make_split("dev")})
