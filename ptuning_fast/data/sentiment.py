"""The embedded sentiment dataset: short templated reviews with clear polarity words.

Generated, not downloaded: the same seed gives the same sentences on every machine. Each
sentence names a thing (a film, a meal, a hotel...) and judges it with positive or negative
words; about one in six contrasts two judgements ("X was dull, but the Y was superb"), where
the clause after "but" decides the label. The test split holds only sentences absent from the
train split, so its accuracy measures generalisation to new combinations, not recall.
"""
from __future__ import annotations

import random

LABELS = ("negative", "positive")
SPLIT_SIZES = {"train": 3000, "test": 600}
_SPLIT_SEEDS = {"train": 1234, "test": 5678}

POSITIVE = (
    "great", "wonderful", "excellent", "delightful", "superb", "charming", "brilliant", "enjoyable",
    "fantastic", "lovely", "moving", "pleasant", "impressive", "outstanding", "heartwarming",
    "clever", "beautiful", "perfect", "fun", "amazing",
)
NEGATIVE = (
    "terrible", "awful", "boring", "dreadful", "dull", "disappointing", "horrible", "painful",
    "bland", "poor", "tedious", "mediocre", "clumsy", "annoying", "weak", "messy", "lifeless",
    "sloppy", "forgettable", "ugly",
)
SUBJECTS = (
    "movie", "film", "book", "meal", "hotel", "service", "concert", "show", "game", "album",
    "restaurant", "play", "phone", "course", "trip", "story", "plot", "soundtrack", "cast", "ending",
)
ADVERBS = ("really", "truly", "quite", "very", "absolutely", "rather", "surprisingly", "simply")
NEUTRAL = ("long", "short", "new", "expensive", "cheap", "simple", "unusual", "busy", "quiet", "familiar")

# {adj}/{adj2} carry the label's polarity; {other} the opposite one (only before "but").
TEMPLATES = (
    "the {subject} was {adj}.",
    "what a {adj} {subject}!",
    "i found the {subject} {adj}.",
    "honestly, the {subject} felt {adj} from start to finish.",
    "my friends said the {subject} was {adj}, and they were right.",
    "{adverb} {adj}, this {subject}.",
    "the {subject} is {adverb} {adj}.",
    "{adj} and {adj2}: that sums up the {subject}.",
    "the {subject} looked {neutral} but turned out {adj}.",
    "i would call this {subject} {adj}.",
    "{adj}. there is no other word for this {subject}.",
    "after a {neutral} week, the {subject} was {adverb} {adj}.",
)
CONTRAST_TEMPLATES = (
    "the {subject} was {other}, but the {subject2} was {adj}.",
    "the {subject2} seemed {other} at first, but the {subject} was {adverb} {adj}.",
)
CONTRAST_SHARE = 1 / 6


def _sentence(rng: random.Random, label: str) -> str:
    good, bad = (POSITIVE, NEGATIVE) if label == "positive" else (NEGATIVE, POSITIVE)
    adj, adj2 = rng.sample(good, 2)
    subject, subject2 = rng.sample(SUBJECTS, 2)
    template = rng.choice(CONTRAST_TEMPLATES if rng.random() < CONTRAST_SHARE else TEMPLATES)
    return template.format(adj=adj, adj2=adj2, other=rng.choice(bad), subject=subject, subject2=subject2,
                           adverb=rng.choice(ADVERBS), neutral=rng.choice(NEUTRAL))


def _generate(split: str, exclude: frozenset = frozenset()) -> list[dict]:
    rng = random.Random(_SPLIT_SEEDS[split])
    examples, seen = [], set(exclude)
    size = SPLIT_SIZES[split]
    while len(examples) < size:
        label = LABELS[len(examples) % 2]  # alternate: exactly balanced
        text = _sentence(rng, label)
        if text not in seen:
            seen.add(text)
            examples.append({"text": text, "label": label})
    rng.shuffle(examples)
    return examples


def sentiment_examples(split: str = "train") -> list[dict]:
    """The embedded dataset: a list of ``{"text": str, "label": "positive" | "negative"}``.

    ``split`` is ``"train"`` (3000 sentences) or ``"test"`` (600, none of them in train). Both are
    exactly balanced and the same on every call and machine.
    """
    if not isinstance(split, str):
        raise TypeError(f"`split` must be a str, one of {tuple(SPLIT_SIZES)}; got {type(split).__name__}")
    if split not in SPLIT_SIZES:
        raise ValueError(f"`split` must be one of {tuple(SPLIT_SIZES)}; got {split!r}")
    train = _generate("train")
    if split == "train":
        return train
    return _generate("test", exclude=frozenset(e["text"] for e in train))
