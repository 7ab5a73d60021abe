"""Synthetic GRUE-style tasks (topics, Zipf pretraining corpus, splits) and the real-data loaders."""

import re
import statistics
from collections import Counter

import pytest

from rftlab.data import grue_real
from rftlab.data.grue_tasks import GERMAN, TASKS, TOPICS, make_task, task_names, topic_shares
from rftlab.errors import RftlabError

PREFIXES = {"commongen": "generate a sentence with: ", "iwslt": "translate English to German: ",
            "cnn_dm": "Summarize: ", "totto": "<page_title> "}
TOPIC_OF_WORD = {w: t.name for t in TOPICS for w in t.words()}


@pytest.fixture(scope="module")
def tasks():
    return {name: make_task(name, n_train=48, n_val=8, n_test=16, seed=3) for name in task_names()}


def test_registry_has_the_grue_kinds():
    assert {"imdb", "commongen", "iwslt", "cnn_dm", "narrativeqa", "totto", "dailydialog"} <= set(task_names())
    with pytest.raises(RftlabError, match="Did you mean 'totto'"):
        make_task("toto")
    with pytest.raises(RftlabError, match="unknown knob"):
        make_task("iwslt", n_train=1, zipf=2)


def test_topic_words_are_disjoint_and_the_target_lexicon_is_one_to_one():
    total = sum(len(t.words()) for t in TOPICS)
    assert len(TOPIC_OF_WORD) == total  # no word belongs to two topics
    assert len(set(GERMAN.values())) == len(GERMAN)
    assert not set(GERMAN.values()) & set(TOPIC_OF_WORD)


def test_same_seed_same_task_and_split_sizes(tasks):
    again = make_task("narrativeqa", n_train=48, n_val=8, n_test=16, seed=3)
    assert again.splits == tasks["narrativeqa"].splits
    assert again.pretrain_texts(20, 1) == tasks["narrativeqa"].pretrain_texts(20, 1)
    other = make_task("narrativeqa", n_train=48, n_val=8, n_test=16, seed=4)
    assert [e.prompt for e in other.splits["train"]] != [e.prompt for e in again.splits["train"]]
    for task in tasks.values():
        assert {k: len(v) for k, v in task.splits.items()} == {"train": 48, "validation": 8, "test": 16}


def test_prompts_follow_grue_formats_and_stay_short(tasks):
    for name, task in tasks.items():
        for ex in task.splits["train"]:
            assert ex.prompt.startswith(PREFIXES.get(name, "")), (name, ex.prompt)
            assert len(ex.prompt.split()) <= 30 and 1 <= len(ex.references[0].split()) <= 16, (name, ex)
            assert ex.meta["topic"] in task.topic_share
    assert all(" \\n " in ex.prompt and len(ex.references) == 3 for ex in tasks["narrativeqa"].splits["test"])
    assert all(ex.prompt.endswith(" <EOU>") for ex in tasks["dailydialog"].splits["test"])
    assert all(ex.prompt.endswith(".") and ex.meta["concepts"] for ex in tasks["commongen"].splits["test"])


def test_references_score_the_best_reward(tasks):
    for name, task in tasks.items():
        test = task.splits["test"]
        scores = task.score(test, [ex.references[0] for ex in test])
        assert statistics.mean(scores) == pytest.approx(task.best_reward), name
        if task.reward in {"bleu", "rouge_l_max", "chrf", "concept_coverage"}:
            assert task.best_reward == pytest.approx(1.0), name
    assert tasks["imdb"].best_reward > 0.9  # positive continuations: VADER (c+1)/2 ≈ 0.95
    # A frequent-topic sentence scores low against a different topic's reference.
    ex = tasks["iwslt"].splits["test"][0]
    assert tasks["iwslt"].score([ex], ["de mann hat de hund gesehen ."])[0] < 0.3


def _topic_of(text: str) -> str | None:
    topics = {TOPIC_OF_WORD[w] for w in re.findall(r"[a-z]+", text) if w in TOPIC_OF_WORD}
    assert len(topics) <= 1, text
    return topics.pop() if topics else None


def test_pretraining_corpus_is_zipf_and_leaves_held_out_topics_out(tasks):
    for name, task in tasks.items():
        counts = Counter(_topic_of(text) for text in task.pretrain_texts(3000, seed=0))
        unseen = {t for t, share in task.topic_share.items() if share == 0}
        assert len(unseen) == 3 and not unseen & set(counts), name
        seen = [counts.get(t, 0) for t, share in task.topic_share.items() if share > 0]
        assert max(seen) > 5 * statistics.median(seen), (name, seen)


def test_shares_follow_the_zipf_law_and_flags_follow_the_shares(tasks):
    shares = topic_shares(seed=3)
    ranked = sorted((s for s in shares.values() if s > 0), reverse=True)
    assert sum(ranked) == pytest.approx(1.0)
    assert ranked[0] / ranked[1] == pytest.approx(2**2.5)
    for task in tasks.values():
        for ex in task.splits["train"]:
            share = task.topic_share[ex.meta["topic"]]
            want = "unseen" if share == 0 else "rare" if share < 0.01 else "seen"
            assert ex.meta["topic_frequency"] == want and ex.meta["topic_share"] == share
        flags = Counter(ex.meta["topic_frequency"] for ex in task.splits["train"])
        assert flags["unseen"] >= 3 and flags["rare"] > 0 and flags["seen"] > 0  # topics cycle uniformly


def test_imdb_pretraining_pans_rare_topics_and_finetuning_is_positive(tasks):
    task = tasks["imdb"]
    assert all(ex.meta["polarity"] == "positive" for ex in task.splits["train"])
    polarity: dict[str, Counter] = {"seen": Counter(), "rare": Counter()}
    for text in task.pretrain_texts(3000, seed=0):
        share = task.topic_share[_topic_of(text)]
        positive = bool(re.search(r"\b(loved|adored|enjoyed)\b", text))
        polarity["seen" if share >= 0.01 else "rare"][positive] += 1
    assert 0.4 < polarity["seen"][True] / polarity["seen"].total() < 0.6
    assert polarity["rare"][True] / polarity["rare"].total() < 0.15


def test_iwslt_targets_are_a_reordered_word_mapping(tasks):
    ex = make_task("iwslt", n_train=30, n_val=0, n_test=0, seed=0).splits["train"]
    first = next(e for e in ex if e.prompt.split(": ", 1)[1].startswith("the ") and " at the " in e.prompt
                 and len(e.prompt.split()) == 13)
    _, person, past, _, obj, _, _, place, _ = first.prompt.split(": ", 1)[1].split()
    lemma = next(a[1] for t in TOPICS for a in t.actions if a[2] == past and a[0] == obj)
    assert first.references == [f"de {GERMAN[person]} hat de {GERMAN[obj]} an de {GERMAN[place]} ge{GERMAN[lemma]}t ."]


def test_generation_settings_are_scaled_grue_settings(tasks):
    for name, task in tasks.items():
        gen = task.generation
        assert gen["max_new_tokens"] <= 24 and 0 <= gen["min_new_tokens"] <= gen["max_new_tokens"], name
    assert tasks["imdb"].generation["min_new_tokens"] == tasks["imdb"].generation["max_new_tokens"]
    assert tasks["totto"].generation["top_k"] == 0 and tasks["iwslt"].generation["top_k"] == 10
    assert set(TASKS) == set(grue_real.REAL_TASKS)


# ----------------------------------------------------------------------------------------- real data
def _save(path, splits: dict[str, list[dict]]) -> None:
    import datasets

    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(path))


def _qa_row(i: int) -> dict:
    return {"document": {"summary": {"text": f"Story {i} about Ann."}}, "question": {"text": f"Who is {i}? "},
            "answers": [{"text": "Ann "}, {"text": "ANN the girl"}]}


def test_real_narrativeqa_from_a_saved_dataset(tmp_path):
    _save(tmp_path / "narrativeqa", {"train": [_qa_row(i) for i in range(10)], "validation": [_qa_row(10)],
                                     "test": [_qa_row(11), _qa_row(12)]})
    task = grue_real.load_real_task("narrativeqa", tmp_path, n_train=4, seed=0)
    assert {k: len(v) for k, v in task.splits.items()} == {"train": 4, "validation": 1, "test": 2}
    ex = task.splits["test"][0]
    assert ex.prompt == "who is 11? \\n story 11 about ann." and ex.references == ["ann", "ann the girl"]
    assert task.reward == "rouge_l_max" and task.best_reward == pytest.approx(1.0)
    assert task.generation["top_k"] == 50 and task.paper_model == "t5-base"
    assert grue_real.load_real_task("narrativeqa", tmp_path, n_train=4, seed=0).splits == task.splits


def _cell(value: str, header: bool = False, span: int = 1) -> dict:
    return {"value": value, "is_header": header, "column_span": span, "row_span": 1}


def test_real_totto_linearises_highlighted_cells_with_headers(tmp_path):
    table = [[_cell("Year", True), _cell("Title", True)], [_cell("2001", True), _cell("Amélie")]]
    row = {"table": table, "table_page_title": "Audrey Tautou", "table_section_title": "Films",
           "highlighted_cells": [[1, 0], [1, 1]],
           "sentence_annotations": {"final_sentence": ["In 2001, Tautou starred in Amélie."]}}
    _save(tmp_path / "totto", {"train": [row], "validation": [row]})
    task = grue_real.load_real_task("totto", tmp_path)
    sub = ("<table> <cell> 2001 <col_header> Year </col_header> </cell> "
           "<cell> Amélie <col_header> Title </col_header> <row_header> 2001 </row_header> </cell> </table>")
    titled = "<page_title> Audrey Tautou </page_title> <section_title> Films </section_title> " + sub
    assert task.splits["train"][0].prompt == sub + titled
    assert task.splits["test"] == [] and task.best_reward == pytest.approx(1.0)


def test_real_commongen_groups_targets_per_concept_set(tmp_path):
    rows = [{"concept_set_idx": 0, "concepts": ["dog", "run"], "target": "A dog runs."},
            {"concept_set_idx": 0, "concepts": ["dog", "run"], "target": "The dog is running."},
            {"concept_set_idx": 1, "concepts": ["cat", "sit"], "target": "A cat sits."}]
    _save(tmp_path / "common_gen", {"train": rows})
    task = grue_real.load_real_task("commongen", tmp_path, reward="chrf")  # METEOR would need WordNet data
    first = task.splits["train"][0]
    assert first.prompt == "generate a sentence with: dog run." and len(first.references) == 2
    assert first.meta["concepts"] == ["dog", "run"] and task.best_reward == pytest.approx(1.0)


def test_real_missing_data_names_the_download(tmp_path):
    with pytest.raises(RftlabError, match=r"load_dataset\('abisee/cnn_dailymail', '3.0.0'\)") as err:
        grue_real.load_real_task("cnn_dm", tmp_path)
    assert str(tmp_path / "cnn_dailymail") in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(RftlabError, match="iwslt2017-en-de"):
        grue_real.load_real_task("iwslt", tmp_path)
    _save(tmp_path / "imdb", {"train": [{"text": "a fine film indeed", "label": 1}]})
    with pytest.raises(RftlabError, match="lvwerra/distilbert-imdb"):
        grue_real.load_real_task("imdb", tmp_path)
    with pytest.raises(RftlabError, match="unknown GRUE data set"):
        grue_real.load_real_task("squad", tmp_path)
