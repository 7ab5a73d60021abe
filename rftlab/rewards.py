"""Reward registry: the GRUE rewards of RL4LMs, computed with the field's libraries.

Every reward has one signature and returns one float per completion, all in [0, 1]:

    fn(completions: list[str], references: list[list[str]], prompts: list[str] | None = None, **meta) -> list[float]

``references[i]`` are the references of completion i (one or more); ``meta`` holds per-completion
lists (e.g. ``concepts: list[list[str]]``) and reward options (e.g. ``tokenize="intl"``); rewards
ignore keys they do not use, so a caller may pass every example's meta to any reward.

Rewards run on thousands of samples (N inputs × K samples), and a confident policy repeats itself,
so each reference-based reward scores every distinct (completion, references) pair once.

Look-up: ``get_reward("rouge_l_max")``; options bind with ``get_reward("bleu", tokenize="intl")``;
a user's reward is ``get_reward("my_pkg.rewards:brevity")`` (any callable with the signature).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rftlab.errors import RftlabError

RewardFn = Callable[..., list[float]]


@dataclass(frozen=True)
class RewardSpec:
    """A registered reward: the function, its value range and a one-line description."""

    fn: RewardFn
    range: tuple[float, float]
    description: str


def _per_unique(score: Callable[[str, tuple[str, ...]], float], completions: Sequence[str],
                references: Sequence[Sequence[str]]) -> list[float]:
    """Apply ``score(completion, refs)`` once per distinct pair and broadcast back, (N,) → (N,)."""
    if len(completions) != len(references):
        raise RftlabError(f"reward got {len(completions)} completions but {len(references)} reference lists.")
    cache: dict[tuple[str, tuple[str, ...]], float] = {}
    out = []
    for completion, refs in zip(completions, references, strict=True):
        key = (completion, tuple(refs))
        if key not in cache:
            cache[key] = float(score(*key)) if key[1] else 0.0  # no reference → nothing to match
        out.append(cache[key])
    return out


# ------------------------------------------------------------------------------------- lexical overlap
@functools.lru_cache(maxsize=1)
def _rouge_tokenizer():
    from rouge_score import tokenizers

    return tokenizers.DefaultTokenizer(use_stemmer=True)


@functools.lru_cache(maxsize=200_000)
def _rouge_tokens(text: str, max_words: int) -> tuple[str, ...]:
    # Cached: the same references recur K times per input, and Porter stemming is the slow part.
    return tuple(_rouge_tokenizer().tokenize(text)[:max_words])


def rouge_l_max(completions: list[str], references: list[list[str]], prompts: list[str] | None = None, *,
                max_words: int = 100, **meta) -> list[float]:
    """ROUGE-L F-measure, max over references, in [0, 1] (RL4LMs ``rouge_l_max``: NarrativeQA).

    F = (1 + β²)·P·R / (R + β²·P) with β = 1, P = LCS/|completion|, R = LCS/|reference|, on
    rouge-score's lower-cased, Porter-stemmed word tokens. Like RL4LMs' arguments (``limit_length``,
    ``length_limit: 100 words``, ``stemming``, ``apply_best``) both texts are cut to ``max_words`` and the
    best reference counts. RL4LMs computes it with py-rouge; this uses Google's rouge-score.
    """
    from rouge_score.rouge_scorer import _score_lcs  # the LCS scorer behind RougeScorer("rougeL")

    def score(completion: str, refs: tuple[str, ...]) -> float:
        hyp = _rouge_tokens(completion, max_words)
        return max(_score_lcs(_rouge_tokens(r, max_words), hyp).fmeasure for r in refs)

    return _per_unique(score, completions, references)


@functools.lru_cache(maxsize=8)
def _bleu_metric(tokenize: str):
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize=tokenize, effective_order=True)


def bleu(completions: list[str], references: list[list[str]], prompts: list[str] | None = None, *,
         tokenize: str = "13a", **meta) -> list[float]:
    """sacreBLEU sentence BLEU / 100 against all references, in [0, 1] (ToTTo; IWSLT with ``tokenize="intl"``).

    BLEU = BP · exp(mean_n log p_n), n = 1..4, with exponential smoothing and *effective order*
    (n-gram orders longer than the completion are left out, so an exact copy of a 3-word reference
    scores 1). RL4LMs' ``sacre_bleu`` reward calls corpus BLEU on a one-sentence corpus without
    effective order, which gives short exact copies less than 1; sentence BLEU is the per-sample
    statistic sacreBLEU recommends.
    """
    metric = _bleu_metric(tokenize)
    # min(): sacreBLEU's float arithmetic gives 1.0000000000000004 for an exact copy
    return _per_unique(lambda c, refs: min(1.0, metric.sentence_score(c, list(refs)).score / 100.0),
                       completions, references)


@functools.lru_cache(maxsize=1)
def _chrf_metric():
    from sacrebleu.metrics import CHRF

    return CHRF()


def chrf(completions: list[str], references: list[list[str]], prompts: list[str] | None = None,
         **meta) -> list[float]:
    """sacreBLEU chrF / 100 (character 6-grams, β = 2), best reference, in [0, 1].

    The offline stand-in for METEOR (CommonGen, CNN/DM, DailyDialog in GRUE): both are recall-weighted
    and give partial credit to inflected forms, and chrF needs no WordNet data.
    """
    metric = _chrf_metric()
    return _per_unique(lambda c, refs: min(1.0, metric.sentence_score(c, list(refs)).score / 100.0),
                       completions, references)


# ----------------------------------------------------------------------------------- QA-style matching
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


@functools.lru_cache(maxsize=200_000)
def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and articles (a/an/the), collapse whitespace."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def token_f1(completions: list[str], references: list[list[str]], prompts: list[str] | None = None,
             **meta) -> list[float]:
    """SQuAD token F1 (bag of normalised words), max over references, in [0, 1].

    F1 = 2·P·R/(P + R) with P = |c ∩ r|/|c|, R = |c ∩ r|/|r| on word multisets.
    """

    def f1(completion: str, refs: tuple[str, ...]) -> float:
        hyp = Counter(normalize_answer(completion).split())
        best = 0.0
        for ref in refs:
            gold = Counter(normalize_answer(ref).split())
            common = sum((hyp & gold).values())
            if common:
                p, r = common / sum(hyp.values()), common / sum(gold.values())
                best = max(best, 2 * p * r / (p + r))
            elif not hyp and not gold:
                best = 1.0  # both empty after normalisation: SQuAD counts this as a match
        return best

    return _per_unique(f1, completions, references)


def exact_match(completions: list[str], references: list[list[str]], prompts: list[str] | None = None,
                **meta) -> list[float]:
    """1 if the SQuAD-normalised completion equals some normalised reference, else 0."""
    return _per_unique(lambda c, refs: float(normalize_answer(c) in {normalize_answer(r) for r in refs}),
                       completions, references)


# ------------------------------------------------------------------------------------ concept coverage
@functools.lru_cache(maxsize=1)
def _stemmer():
    from nltk.stem.porter import PorterStemmer

    return PorterStemmer()


@functools.lru_cache(maxsize=200_000)
def _stem(word: str) -> str:
    return _stemmer().stem(word)


_WORDS = re.compile(r"[a-z0-9]+")


def concepts_from_prompt(prompt: str) -> list[str]:
    """The concepts of a CommonGen prompt: the words after its last ':' (space- or comma-separated, final '.' off)."""
    return [c for c in re.split(r"[,\s]+", prompt.rsplit(":", 1)[-1].strip().rstrip(".").lower()) if c]


def concept_coverage(completions: list[str], references: list[list[str]], prompts: list[str] | None = None, *,
                     concepts: list[list[str]] | None = None, **meta) -> list[float]:
    """Fraction of the input's concepts that the completion uses, in [0, 1] (CommonGen's coverage).

    A concept counts when every one of its words appears in the completion up to Porter stemming
    ("pick" is covered by "picked"). Concepts come from ``concepts`` (per completion) or are parsed
    from the prompt ("generate a sentence with: apple tree pick"). References are not used.
    """
    if concepts is None:
        if prompts is None:
            raise RftlabError("concept_coverage needs the prompts or concepts=[[...], ...] per completion.")
        concepts = [concepts_from_prompt(p) for p in prompts]
    if len(concepts) != len(completions):
        raise RftlabError(f"concept_coverage got {len(completions)} completions but {len(concepts)} concept lists.")
    cache: dict[tuple[str, tuple[str, ...]], float] = {}
    out = []
    for completion, concept_list in zip(completions, concepts, strict=True):
        key = (completion, tuple(concept_list))
        if key not in cache:
            stems = {_stem(w) for w in _WORDS.findall(completion.lower())}
            hits = [all(_stem(w) in stems for w in _WORDS.findall(c.lower())) for c in concept_list]
            cache[key] = sum(hits) / len(hits) if hits else 0.0
        out.append(cache[key])
    return out


# ------------------------------------------------------------------------------------------ sentiment
@functools.lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def _with_prompts(completions: list[str], prompts: list[str] | None, include_prompt: bool) -> list[str]:
    if not include_prompt:
        return list(completions)
    if prompts is None or len(prompts) != len(completions):
        raise RftlabError("include_prompt=True needs one prompt per completion.")
    return [f"{p} {c}".strip() for p, c in zip(prompts, completions, strict=True)]


def vader_sentiment(completions: list[str], references: list[list[str]], prompts: list[str] | None = None, *,
                    include_prompt: bool = False, **meta) -> list[float]:
    """VADER compound sentiment c ∈ [−1, 1] mapped to (c + 1)/2 ∈ [0, 1]; 1 = most positive.

    The offline stand-in for IMDB's learned P(positive). It scores the completion alone by default:
    a lexicon sums word valences, so the prompt's words would otherwise dominate a short continuation
    (RL4LMs' classifier reward sees prompt + continuation; ``include_prompt=True`` does the same).
    """
    analyzer = _vader()
    texts = _with_prompts(completions, prompts, include_prompt)
    scores = {t: (analyzer.polarity_scores(t)["compound"] + 1.0) / 2.0 for t in set(texts)}
    return [scores[t] for t in texts]


@functools.lru_cache(maxsize=4)
def _load_classifier(model_path: str, device: str):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path).to(device).eval()
    return tokenizer, model


def classifier(completions: list[str], references: list[list[str]], prompts: list[str] | None = None, *,
               model_path: str | None = None, label_ix: int = 1, include_prompt: bool = True,
               batch_size: int = 64, max_length: int = 512, device: str | None = None, **meta) -> list[float]:
    """P(label ``label_ix`` | text) under a local sequence classifier, in [0, 1] (RL4LMs ``learned_reward``).

    Paper scale (IMDB): ``model_path`` = a local copy of lvwerra/distilbert-imdb, ``label_ix=1``
    (positive), scoring prompt + continuation as RL4LMs' ``include_prompt_for_eval: True``. Texts are
    scored in batches of ``batch_size`` under ``torch.no_grad``; the model is loaded once per path.
    """
    import torch

    if model_path is None:
        raise RftlabError("the classifier reward needs model_path=<local folder saved by save_pretrained>.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, model = _load_classifier(str(model_path), device)
    texts = _with_prompts(completions, prompts, include_prompt)
    unique = sorted(set(texts))
    probs: dict[str, float] = {}
    with torch.no_grad():
        for start in range(0, len(unique), batch_size):
            chunk = unique[start: start + batch_size]
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            logits = model(**enc.to(device)).logits.float()  # (B, n_labels)
            probs.update(zip(chunk, torch.softmax(logits, -1)[:, label_ix].tolist(), strict=True))
    return [probs[t] for t in texts]


# --------------------------------------------------------------------------------------------- meteor
def _meteor_tokens(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def meteor(completions: list[str], references: list[list[str]], prompts: list[str] | None = None,
           **meta) -> list[float]:
    """NLTK METEOR (α 0.9, β 3, γ 0.5; WordNet synonyms), best reference, in [0, 1].

    GRUE's reward for CommonGen, CNN/DM and DailyDialog. Needs the WordNet data
    (``python -m nltk.downloader wordnet``); ``get_reward("meteor")`` checks for it.
    """
    from nltk.translate.meteor_score import meteor_score

    return _per_unique(lambda c, refs: meteor_score([_meteor_tokens(r) for r in refs], _meteor_tokens(c)),
                       completions, references)


def _check_wordnet() -> None:
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
    except LookupError:
        raise RftlabError("the meteor reward needs NLTK's WordNet data: run `python -m nltk.downloader wordnet`, "
                          "or use the offline reward 'chrf'.") from None


# ------------------------------------------------------------------------------------------- registry
REWARDS: dict[str, RewardSpec] = {
    "rouge_l_max": RewardSpec(rouge_l_max, (0.0, 1.0), "ROUGE-L F (stemmed), best reference — NarrativeQA"),
    "bleu": RewardSpec(bleu, (0.0, 1.0), "sacreBLEU sentence BLEU/100 — ToTTo, IWSLT2017 (tokenize='intl')"),
    "chrf": RewardSpec(chrf, (0.0, 1.0), "sacreBLEU chrF/100, best reference — offline METEOR stand-in"),
    "token_f1": RewardSpec(token_f1, (0.0, 1.0), "SQuAD token F1, best reference"),
    "exact_match": RewardSpec(exact_match, (0.0, 1.0), "SQuAD-normalised exact match, any reference"),
    "concept_coverage": RewardSpec(concept_coverage, (0.0, 1.0), "fraction of the input's concepts used — CommonGen"),
    "vader_sentiment": RewardSpec(vader_sentiment, (0.0, 1.0), "VADER compound (c+1)/2 — offline IMDB stand-in"),
    "meteor": RewardSpec(meteor, (0.0, 1.0), "NLTK METEOR (needs WordNet data) — CommonGen, CNN/DM, DailyDialog"),
    "classifier": RewardSpec(classifier, (0.0, 1.0), "P(label) of a local HF classifier — IMDB (distilbert-imdb)"),
}

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def reward_names() -> list[str]:
    """Registered reward names, sorted."""
    return sorted(REWARDS)


def get_reward(name: str, **options) -> RewardFn:
    """The reward called ``name`` (or ``"module:function"``), with ``options`` bound as keyword arguments.

    Raises RftlabError for an unknown name (with close matches), a user reward that cannot be
    imported, METEOR without WordNet data, or a classifier without a local ``model_path``.
    """
    if name in REWARDS:
        if name == "meteor":
            _check_wordnet()
        if name == "classifier":
            path = options.get("model_path")
            if path is None or not Path(path).expanduser().is_dir():
                raise RftlabError(f"the classifier reward needs model_path=<local folder saved by save_pretrained>"
                                  f" (got {path!r}); e.g. lvwerra/distilbert-imdb with label_ix=1.")
            options["model_path"] = str(Path(path).expanduser())
        fn = REWARDS[name].fn
    elif _IMPORT_PATH.match(name):
        module_name, attr = name.split(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise RftlabError(f"cannot import reward {name!r}: {err}.") from None
        if not callable(fn):
            raise RftlabError(f"reward {name!r} is not callable.")
    else:
        close = difflib.get_close_matches(name, REWARDS, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise RftlabError(f"unknown reward {name!r}.{hint} Known: {', '.join(reward_names())}; "
                          "or give a user reward as 'module:function'.")
    return functools.partial(fn, **options) if options else fn
