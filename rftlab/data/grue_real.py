"""The real GRUE data sets at paper scale, read with Hugging Face ``datasets`` (Razin et al. 2024, §4.1).

Field mappings and prompt formats follow RL4LMs' data pools (``rl4lms/data_pools/
custom_text_generation_pools.py``) and GRUE's configs, and give the same ``GrueTask``/``Example``
structure as the synthetic tasks of ``rftlab.data.grue_tasks``:

    imdb         stanfordnlp/imdb              first 50% of the words → the rest; train = positive only
    commongen    allenai/common_gen            "generate a sentence with: " + concepts joined by " " + "."
    iwslt        IWSLT/iwslt2017 (en-de)       "translate English to German: " + en → de
    cnn_dm       abisee/cnn_dailymail (3.0.0)  "Summarize: " + article → highlights
    narrativeqa  deepmind/narrativeqa          UnifiedQA "question \\n summary" (lower case) → all answers
    totto        google-research-datasets/totto  linearised highlighted subtable (+ with page/section titles)
    dailydialog  li2017dailydialog/daily_dialog  5 previous turns joined by "<EOU>" → next turn + "<EOU>"

Nothing is downloaded unless asked: the data are read with ``datasets.load_from_disk`` from
``<data_dir>/<folder>``. When that folder is missing the error names the exact ``load_dataset`` call
that fetches it; ``download=True`` runs that call (network or the HF cache) and saves the result there.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from rftlab.data.grue_tasks import SPLITS, Example, GrueTask
from rftlab.errors import RftlabError

EOU = "<EOU>"
BEST_REWARD_SAMPLE = 200  # references scored to estimate best_reward (a classifier reward is slow)


def _gen(max_new: int, min_new: int, top_k: int, max_prompt: int) -> dict:
    return {"max_new_tokens": max_new, "min_new_tokens": min_new, "top_k": top_k, "temperature": 1.0,
            "max_prompt_tokens": max_prompt}


# ------------------------------------------------------------------------------------------ converters
# Each converter maps an iterable of rows of one split to Examples.
def _imdb(rows: Iterable[dict], split: str) -> list[Example]:
    """RL4LMs ``IMDBForSeq2Seq``: prompt = first half of the whitespace words, reference = the rest."""
    out = []
    for row in rows:
        if split == "train" and row["label"] != 1:  # only_positive_samples for the RL/SFT train inputs
            continue
        words = row["text"].split(" ")
        cut = int(len(words) * 0.5)
        out.append(Example(" ".join(words[:cut]), [" ".join(words[cut:])], {"label": row["label"]}))
    return out


def _commongen(rows: Iterable[dict], split: str) -> list[Example]:
    """One input per concept set, with every target of that set as a reference (test targets are hidden)."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for row in rows:
        refs = groups.setdefault(tuple(row["concepts"]), [])
        if row["target"]:
            refs.append(row["target"])
    return [Example("generate a sentence with: " + " ".join(concepts) + ".", refs, {"concepts": list(concepts)})
            for concepts, refs in groups.items()]


def _iwslt(rows: Iterable[dict], split: str) -> list[Example]:
    return [Example("translate English to German: " + row["translation"]["en"], [row["translation"]["de"]])
            for row in rows]


def _cnn_dm(rows: Iterable[dict], split: str) -> list[Example]:
    return [Example("Summarize: " + row["article"], [row["highlights"]]) for row in rows]


def _narrativeqa_columns(data):
    # Each row carries its whole book in document.text: read only the three columns used (Arrow, no copy).
    return data.flatten().select_columns(["question.text", "document.summary.text", "answers"])


def _narrativeqa(rows: Iterable[dict], split: str) -> list[Example]:
    """UnifiedQA's encoding (lower-cased "question \\n summary"), as RL4LMs reads it from UnifiedQA's TSVs."""
    return [Example(f"{row['question.text'].strip()} \\n {row['document.summary.text'].strip()}".lower(),
                    [a["text"].strip().lower() for a in row["answers"]]) for row in rows]


def _dailydialog(rows: Iterable[dict], split: str, context_size: int = 5) -> list[Example]:
    """Every turn that has ``context_size`` turns before it; RL4LMs' ``DailyDialog`` pool, verbatim format."""
    out = []
    for row in rows:
        for turn, utterance in enumerate(row["dialog"]):
            if turn >= context_size:
                context = EOU.join(row["dialog"][turn - context_size: turn]) + " " + EOU
                out.append(Example(context, [utterance + EOU],
                                   {"emotion": row["emotion"][turn], "intent": row["act"][turn]}))
    return out


def _column_starts(row: list[dict]) -> list[tuple[int, int]]:
    """[start, end) column offsets of a table row's cells, counting column spans."""
    spans, start = [], 0
    for cell in row:
        spans.append((start, start + cell["column_span"]))
        start += cell["column_span"]
    return spans


def linearize_totto(table: list[list[dict]], cells: list[list[int]], page_title: str | None = None,
                    section_title: str | None = None) -> str:
    """ToTTo's baseline linearisation of the highlighted cells, with the heuristic row/column headers.

    ``<page_title> .. </page_title> <section_title> .. </section_title> <table> <cell> value
    <col_header> h </col_header> <row_header> h </row_header> </cell> ... </table>``: column headers
    are header cells in earlier rows that overlap the cell's columns, row headers are header cells to
    its left (google-research/language totto/baseline_preprocessing, as RL4LMs uses it).
    """
    spans = [_column_starts(row) for row in table]
    text = ""
    if page_title:
        text += f"<page_title> {page_title} </page_title> "
    if section_title:
        text += f"<section_title> {section_title} </section_title> "
    text += "<table> "
    for r, c in cells:
        start, end = spans[r][c]
        text += f"<cell> {table[r][c]['value']} "
        for rr in range(r):
            for cell, (s, e) in zip(table[rr], spans[rr], strict=True):
                if cell["is_header"] and s < end and e > start:
                    text += f"<col_header> {cell['value']} </col_header> "
        for cell in table[r][:c]:
            if cell["is_header"]:
                text += f"<row_header> {cell['value']} </row_header> "
        text += "</cell> "
    return text + "</table>"


def _totto(rows: Iterable[dict], split: str) -> list[Example]:
    """RL4LMs' 'subtable' representation: the subtable without titles, then again with them."""
    out = []
    for row in rows:
        cells = row["highlighted_cells"]
        prompt = (linearize_totto(row["table"], cells)
                  + linearize_totto(row["table"], cells, row["table_page_title"], row["table_section_title"]))
        refs = [s for s in row["sentence_annotations"]["final_sentence"] if s]  # empty on the hidden test split
        out.append(Example(prompt, refs))
    return out


# ------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class RealSpec:
    """Where a GRUE data set lives on the Hub, how to read it and how GRUE samples and scores it."""

    hf_id: str
    config: str | None
    folder: str  # under data_dir
    convert: Callable[[Iterable[dict], str], list[Example]]
    reward: str
    generation: dict
    paper_model: str
    reward_options: dict = field(default_factory=dict)
    row_level: bool = True  # one example per row: subsample rows before converting
    columns: Callable | None = None  # Dataset → Dataset with only the columns the converter reads
    split_names: dict = field(default_factory=lambda: {"train": "train", "validation": "validation", "test": "test"})


# Generation: GRUE's rollout settings (digest §3.1): (max_new, min_new, top_k, prompt tokens).
REAL_TASKS: dict[str, RealSpec] = {
    # IMDB top_k: the digest gives only min = max = 48; 50 is RL4LMs' usual sampling setting (assumed).
    "imdb": RealSpec("stanfordnlp/imdb", None, "imdb", _imdb, "classifier", _gen(48, 48, 50, 64),
                     "lvwerra/gpt2-imdb", {"label_ix": 1, "include_prompt": True}, row_level=False,
                     split_names={"train": "train", "validation": "train", "test": "test"}),
    "commongen": RealSpec("allenai/common_gen", None, "common_gen", _commongen, "meteor", _gen(20, 5, 0, 20),
                          "t5-base", row_level=False),
    "iwslt": RealSpec("IWSLT/iwslt2017", "iwslt2017-en-de", "iwslt2017_en_de", _iwslt, "bleu",
                      _gen(128, 0, 10, 128), "t5-base", {"tokenize": "intl"}),
    "cnn_dm": RealSpec("abisee/cnn_dailymail", "3.0.0", "cnn_dailymail", _cnn_dm, "meteor", _gen(100, 50, 50, 512),
                       "t5-base"),
    "narrativeqa": RealSpec("deepmind/narrativeqa", None, "narrativeqa", _narrativeqa, "rouge_l_max",
                            _gen(50, 0, 50, 512), "t5-base", columns=_narrativeqa_columns),
    "totto": RealSpec("google-research-datasets/totto", None, "totto", _totto, "bleu", _gen(50, 10, 0, 512),
                      "t5-base"),
    "dailydialog": RealSpec("li2017dailydialog/daily_dialog", None, "daily_dialog", _dailydialog, "meteor",
                            _gen(20, 2, 20, 128), "gpt2", row_level=False),
}


def download_hint(name: str, data_dir: str | Path) -> str:
    """The one-line command that fetches data set ``name`` into ``<data_dir>/<folder>``."""
    spec = REAL_TASKS[name]
    target = Path(data_dir).expanduser() / spec.folder
    config = f", {spec.config!r}" if spec.config else ""
    call = f"datasets.load_dataset({spec.hf_id!r}{config}).save_to_disk({str(target)!r})"
    return f'python -c "import datasets; {call}"'


def _open(name: str, data_dir: str | Path, download: bool):
    """The DatasetDict of ``name`` from ``<data_dir>/<folder>``, fetched first if ``download``."""
    import datasets

    spec = REAL_TASKS[name]
    path = Path(data_dir).expanduser() / spec.folder
    if not path.exists():
        if not download:
            raise RftlabError(f"GRUE data set {name!r} not found at {path}: on a machine with network run "
                              f"{download_hint(name, data_dir)} and copy the folder here.")
        try:
            datasets.load_dataset(spec.hf_id, spec.config).save_to_disk(str(path))
        except Exception as err:  # offline, unknown config, no cache: the message says what to do
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RftlabError(f"could not fetch {spec.hf_id!r} ({first_line}); run {download_hint(name, data_dir)} "
                              "on a machine with network.") from None
    try:
        data = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise RftlabError(f"{path} is not a saved `datasets` data set ({err}); recreate it with "
                          f"{download_hint(name, data_dir)}.") from None
    return data if isinstance(data, datasets.DatasetDict) else datasets.DatasetDict({"train": data})


def load_real_task(name: str, data_dir: str | Path, n_train: int = 0, n_val: int = 0, n_test: int = 0, seed: int = 0, *,
              download: bool = False, reward: str | None = None, reward_options: dict | None = None) -> GrueTask:
    """Real GRUE data set ``name`` as a GrueTask with random subsets of n_train/n_val/n_test inputs (0 = all).

    The paper's rewards are the defaults (METEOR needs NLTK WordNet; IMDB's classifier reads
    ``<data_dir>/distilbert-imdb``, a local copy of lvwerra/distilbert-imdb); ``reward`` and
    ``reward_options`` replace them, e.g. ``reward="chrf"`` offline. IMDB's validation inputs are the
    last 20% of a seeded shuffle of its train split (as RL4LMs), the train inputs positive reviews only.
    """
    if name not in REAL_TASKS:
        raise RftlabError(f"unknown GRUE data set {name!r}: use one of {', '.join(sorted(REAL_TASKS))}.")
    spec = REAL_TASKS[name]
    options = dict(spec.reward_options) if reward is None else {}
    options |= reward_options or {}
    reward = reward or spec.reward
    data = _open(name, data_dir, download)
    if reward == "classifier" and "model_path" not in options:
        model_dir = Path(data_dir).expanduser() / "distilbert-imdb"
        if not model_dir.is_dir():
            raise RftlabError(
                f"IMDB's reward model not found at {model_dir}: on a machine with network run python -c 'from "
                f"transformers import AutoModelForSequenceClassification as M, AutoTokenizer as T; "
                f"[c.from_pretrained(\"lvwerra/distilbert-imdb\").save_pretrained(\"{model_dir}\") for c in (M, T)]'"
                f" (or pass reward=\"vader_sentiment\").")
        options["model_path"] = str(model_dir)
    sizes = dict(zip(SPLITS, (n_train, n_val, n_test), strict=True))
    splits = {split: _split(spec, data, split, sizes[split], seed) for split in SPLITS}
    train = splits["train"]

    def pretrain(n: int, corpus_seed: int) -> list[str]:
        # Paper-scale models come pretrained; this is the natural (unshifted) train text, e.g. for a tokenizer.
        rng = random.Random(f"{name}-pretrain-{corpus_seed}")
        return [f"{ex.prompt} {ex.references[0]}" for ex in rng.choices(train, k=n) if ex.references]

    task = GrueTask(name=name, splits=splits, reward=reward, generation=dict(spec.generation),
                    best_reward=float("nan"), reward_options=options, paper_model=spec.paper_model,
                    description=f"{spec.hf_id} ({spec.config or 'default'})", pretrain=pretrain)
    with_refs = [ex for split in SPLITS for ex in splits[split] if ex.references][:BEST_REWARD_SAMPLE]
    if with_refs:
        scores = task.score(with_refs, [ex.references[0] for ex in with_refs])
        task.best_reward = sum(scores) / len(scores)
    return task


def _split(spec: RealSpec, data, split: str, n: int, seed: int) -> list[Example]:
    """Examples of one split, a seeded random subset of n (all if n is 0)."""
    source = spec.split_names[split]
    if source not in data:
        return []
    rows = data[source] if spec.columns is None else spec.columns(data[source])
    if spec.split_names["validation"] == spec.split_names["train"] and split in ("train", "validation"):
        order = list(range(len(rows)))  # carve validation out of train: last 20% of a seeded shuffle
        random.Random(f"grue-holdout-{seed}").shuffle(order)
        cut = int(0.8 * len(order))
        rows = rows.select(order[:cut] if split == "train" else order[cut:])
    rng = random.Random(f"{spec.hf_id}-{split}-{seed}")
    if spec.row_level:
        if 0 < n < len(rows):
            rows = rows.select(sorted(rng.sample(range(len(rows)), n)))
        return spec.convert(rows, split)
    examples = spec.convert(rows, split)
    if 0 < n < len(examples):
        examples = [examples[i] for i in sorted(rng.sample(range(len(examples)), n))]
    return examples
