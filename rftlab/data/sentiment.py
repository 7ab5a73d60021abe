"""Template movie reviews with a sentiment label: the stand-in for Yuan et al.'s sentiment task (Fig. 4).

A review is 1–3 clauses "the <aspect> was <adjective>", each adjective drawn from a positive or a negative
pool; its label is the majority polarity, so mixed reviews (2 vs 1) make the label uncertain at first. The
prompt is ``"review : <clauses> . sentiment :"``; the chosen response is the correct label, the rejected one
the wrong label, both followed by the SAME neutral continuation (a shared suffix) in the suffix variants:

    label         chosen "positive"                        rejected "negative"
    short-suffix  chosen "positive i saw it friday"        rejected "negative i saw it friday"    (3–5 shared)
    long-suffix   chosen "positive i saw it friday with …" rejected "negative i saw it friday with …" (15–30)

The continuation is random neutral clauses (when, where, with whom, how long), so its tokens keep real
entropy under the model: their gradients are large and nearly identical in chosen and rejected, which is
what entangles g_w and g_l. Every word is one token under ``rftlab.tokenization.word_tokenizer``; lengths
below count words = tokens. Pure Python (no torch); everything is a function of the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["LABELS", "VARIANTS", "SentimentExample", "make_examples", "pretrain_texts", "vocabulary_texts"]

LABELS = ("positive", "negative")
VARIANTS: dict[str, tuple[int, int]] = {"label": (0, 0), "short-suffix": (3, 5), "long-suffix": (15, 30)}

ASPECTS = ("plot", "acting", "music", "script", "ending", "cast", "story", "dialogue", "pacing", "camera",
           "humour", "lead", "score", "set", "finale", "editing")
POSITIVE = ("great", "wonderful", "superb", "brilliant", "moving", "charming", "delightful", "excellent",
            "funny", "beautiful", "gripping", "clever")
NEGATIVE = ("awful", "terrible", "boring", "dull", "weak", "clumsy", "painful", "bland", "messy", "tedious",
            "lazy", "forgettable")
# neutral clauses of 3–5 words; the slots {…} are filled from the pools below
CLAUSES = ("i saw it {day}", "i watched it with my {person}", "we went to the {place}",
           "it runs {number} minutes", "the screening was {day}", "my {person} picked it",
           "we sat near the {spot}", "i bought tickets {day}", "it was shown at the {place}",
           "the {place} was {crowd}")
FILL = {
    "day": ("monday", "tuesday", "friday", "saturday", "sunday", "yesterday", "tonight", "today"),
    "person": ("friend", "sister", "brother", "father", "mother", "cousin", "neighbour", "partner"),
    "place": ("cinema", "festival", "theatre", "club", "library", "campus"),
    "number": ("ninety", "hundred", "eighty", "seventy"),
    "spot": ("front", "back", "aisle", "middle", "door"),
    "crowd": ("full", "empty", "quiet", "busy"),
}


@dataclass(frozen=True)
class SentimentExample:
    """One labelled review and its preference pair (strings; one word = one token)."""

    prompt: str  # "review : the plot was great and the music was dull . sentiment :"
    label: str  # the correct label, "positive" or "negative"
    suffix: str  # shared continuation after the label ("" in the label variant)

    @property
    def wrong_label(self) -> str:
        return LABELS[1 - LABELS.index(self.label)]

    @property
    def chosen(self) -> str:
        """Correct label + suffix: the SFT target and the preferred response."""
        return f"{self.label} {self.suffix}".strip()

    @property
    def rejected(self) -> str:
        """Wrong label + the same suffix: differs from ``chosen`` in its first token only."""
        return f"{self.wrong_label} {self.suffix}".strip()


def _clause(rng: random.Random) -> list[str]:
    template = rng.choice(CLAUSES)
    return template.format(**{slot: rng.choice(words) for slot, words in FILL.items()}).split()


def _suffix(rng: random.Random, low: int, high: int) -> str:
    """Neutral clauses joined by "and", cut to a length drawn uniformly from [low, high] words (0 → "")."""
    if high == 0:
        return ""
    target = rng.randint(low, high)
    words: list[str] = _clause(rng)
    while len(words) < target:
        words += ["and", *_clause(rng)]
    return " ".join(words[:target])


def _review(rng: random.Random) -> tuple[str, str]:
    """(review clauses, majority label): 1 or 3 clauses so the majority is defined."""
    n = rng.choice((1, 3, 3))
    polarities = [rng.random() < 0.5 for _ in range(n)]
    clauses = [f"the {rng.choice(ASPECTS)} was {rng.choice(POSITIVE if pos else NEGATIVE)}" for pos in polarities]
    label = LABELS[0] if sum(polarities) * 2 > n else LABELS[1]
    return " and ".join(clauses), label


def make_examples(n: int, variant: str, seed: int) -> list[SentimentExample]:
    """``n`` labelled reviews with a shared suffix of the variant's length range (``VARIANTS``)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown sentiment variant {variant!r}; choose from {', '.join(VARIANTS)}")
    low, high = VARIANTS[variant]
    rng = random.Random(f"sentiment-{variant}-{seed}")
    out = []
    for _ in range(n):
        review, label = _review(rng)
        out.append(SentimentExample(f"review : {review} . sentiment :", label, _suffix(rng, low, high)))
    return out


def pretrain_texts(n: int, seed: int) -> list[str]:
    """Unlabelled text for the stand-in of LM pretraining: reviews and neutral clauses, never a label."""
    rng = random.Random(f"sentiment-pretrain-{seed}")
    texts = []
    for _ in range(n):
        if rng.random() < 0.5:
            texts.append(f"review : {_review(rng)[0]} .")
        else:
            texts.append(_suffix(rng, 8, 30))
    return texts


def vocabulary_texts() -> list[str]:
    """Every word the generator can emit (for building the word tokenizer independently of the seed)."""
    words = [*ASPECTS, *POSITIVE, *NEGATIVE, *LABELS, "review", ":", ".", "sentiment", "the", "was", "and"]
    words += [w for template in CLAUSES for w in template.split() if not w.startswith("{")]
    words += [w for pool in FILL.values() for w in pool]
    return [" ".join(words)]
