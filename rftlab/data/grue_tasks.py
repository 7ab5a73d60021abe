"""GRUE-style synthetic text tasks that run offline at CPU scale (stand-ins for Razin et al. 2024, §4.1).

Each task mirrors one GRUE data set (RL4LMs) in kind, prompt format and reward, with English-like
text built from a small fixed vocabulary (a ~1000-token BPE covers all tasks; prompts ≤ ~40 tokens,
responses ≤ ~24 tokens):

    name         GRUE data set    prompt                                         reward (GRUE's)
    imdb         IMDB             first half of a positive film review           vader_sentiment (classifier)
    commongen    CommonGen        "generate a sentence with: net sailor mend."    concept_coverage (meteor)
    iwslt        IWSLT2017 en-de  "translate English to German: ..."             bleu (sacre_bleu)
    cnn_dm       CNN/DailyMail    "Summarize: <2-sentence article>"              rouge_l_max (meteor)
    narrativeqa  NarrativeQA      "<question> \\n <story>", several answers      rouge_l_max (rouge_l_max)
    totto        ToTTo            linearised highlighted cells, ToTTo's tags     bleu (sacre_bleu)
    dailydialog  DailyDialog      3 turns joined by " <EOU> "                    chrf (meteor)

Why the data make small-std inputs (the paper's phenomenon). Every input belongs to one of 16 TOPICS
(shipping, cooking, ...), each with its own words: people, objects with the verb that goes with each
(net → mended), places, praise and criticism adjectives. References need topic knowledge that the
input does not give away (the verb of a table's item, the "German" word of an English word, the topic
of a story, ...). The corpus that the stand-in LM is pretrained on (``GrueTask.pretrain_texts``, like
GPT-2/T5 pretraining) covers the topics with Zipf frequencies, share(rank r) ∝ r^(−s), s = 2.5, and
leaves ``n_unseen`` topics out. A model pretrained on it is fluent everywhere, right on frequent
topics, and confidently wrong on rare and unseen ones: tokens that were never a target are pushed
down at every pretraining step, so the model writes frequent-topic words with near-constant (low)
reward — small reward std, small gradient. The finetuning splits draw topics uniformly (cycling
through a shuffled topic list), so a large share of inputs are rare or unseen:
``meta["topic_frequency"]`` ∈ {"seen", "rare", "unseen"} (rare = pretraining share < ``rare_share``).

Per task, the pretraining texts are the task's own inputs and references (prompt + " " + one
reference) on Zipf-drawn topics, i.e. the shift is in *which topics* the model knows, not in the
format. The exception is imdb, whose corpus also holds negative reviews, as the full IMDB corpus
that gpt2-imdb was trained on: half of the seen topics' reviews and 95% of the rare topics' reviews
are pans (knobs ``seen_positive_rate``, ``rare_positive_rate``), while finetuning prompts open
positive reviews only. Coverage-style references (commongen) are deterministic given the input and
the topic; QA answers come in three phrasings; dialogue replies vary within the topic.

The topic ranking (which topics are frequent, rare, held out) depends only on ``seed``, not on the
task, so corpora of several tasks can be pooled without leaking held-out topics.
"""

from __future__ import annotations

import difflib
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from rftlab.errors import RftlabError

SPLITS = ("train", "validation", "test")


@dataclass
class Example:
    """One input: the prompt, its references (best first) and metadata (``topic``, ``concepts``, ...)."""

    prompt: str
    references: list[str]
    meta: dict = field(default_factory=dict)


@dataclass
class GrueTask:
    """A task's splits and everything needed to sample from and score a policy on it.

    ``generation`` holds ``max_new_tokens``, ``min_new_tokens``, ``top_k`` (0 = no truncation) and
    ``temperature``; ``best_reward`` is the mean reward of the first reference scored as a completion
    (1.0 for BLEU/ROUGE/coverage), the yardstick for "mean reward below half the best";
    ``topic_share`` is each topic's share of the pretraining corpus (0 = held out; empty for real data).
    """

    name: str
    splits: dict[str, list[Example]]
    reward: str
    generation: dict
    best_reward: float
    topic_share: dict[str, float] = field(default_factory=dict)
    reward_options: dict = field(default_factory=dict)
    paper_model: str = ""
    description: str = ""
    pretrain: Callable[[int, int], list[str]] | None = field(default=None, repr=False)

    def pretrain_texts(self, n: int, seed: int = 0) -> list[str]:
        """``n`` pretraining texts (prompt + " " + reference, no EOS), drawn reproducibly from ``seed``."""
        if self.pretrain is None:
            raise RftlabError(f"task {self.name!r} has no pretraining corpus.")
        return self.pretrain(n, seed)

    def score(self, examples: list[Example], completions: list[str]) -> list[float]:
        """The task reward of ``completions[i]`` for ``examples[i]``, (N,) → (N,) floats."""
        from rftlab.rewards import get_reward

        fn = get_reward(self.reward, **self.reward_options)
        extra = {}
        if examples and all("concepts" in ex.meta for ex in examples):
            extra["concepts"] = [ex.meta["concepts"] for ex in examples]
        return fn(list(completions), [ex.references for ex in examples], [ex.prompt for ex in examples], **extra)


# ------------------------------------------------------------------------------------------- topics
@dataclass(frozen=True)
class Topic:
    """A topic's words; ``actions`` are (object, verb lemma, verb past) triples that go together."""

    name: str
    people: tuple[str, ...]
    actions: tuple[tuple[str, str, str], ...]
    places: tuple[str, ...]
    praise: tuple[str, ...]
    criticism: tuple[str, ...]

    def place_of(self, obj: str) -> str:
        """Where the topic's object is handled: a fixed place per object (knowledge a reference may need)."""
        index = [a[0] for a in self.actions].index(obj)
        return self.places[index * len(self.places) // len(self.actions)]

    def actions_at(self, place: str) -> list[tuple[str, str, str]]:
        """The actions whose object belongs to ``place`` (two per place)."""
        return [a for a in self.actions if self.place_of(a[0]) == place]

    def words(self) -> set[str]:
        return {self.name, *self.people, *(w for a in self.actions for w in a), *self.places, *self.praise,
                *self.criticism}


# name | people | places | praise | criticism, then indented object:verb-lemma:verb-past triples (6, two per place)
_TOPIC_TABLE = """
shipping | sailor captain fisher | dock pier bay | breezy calm | foggy stormy
    boat:row:rowed net:mend:mended anchor:drop:dropped
    rope:knot:knotted sail:hoist:hoisted fish:catch:caught
cooking | cook baker waiter | oven pantry counter | tasty fresh | greasy burnt
    bread:bake:baked soup:stir:stirred onion:chop:chopped
    egg:fry:fried dough:knead:kneaded pan:scrub:scrubbed
farming | farmer shepherd milkmaid | barn meadow stable | sunny green | muddy dry
    cow:milk:milked wheat:harvest:harvested sheep:shear:sheared
    field:plow:plowed hay:bale:baled fence:repair:repaired
astronomy | astronaut pilot engineer | station launchpad observatory | stellar vast | cold empty
    rocket:launch:launched satellite:track:tracked capsule:seal:sealed
    comet:observe:observed orbit:calculate:calculated helmet:fasten:fastened
forestry | ranger hunter woodcutter | cabin grove clearing | lush quiet | dark damp
    tree:fell:felled log:split:split trail:clear:cleared
    deer:spot:spotted mushroom:gather:gathered fire:extinguish:extinguished
traffic | driver mayor clerk | square avenue subway | lively modern | noisy crowded
    bus:park:parked road:pave:paved bridge:build:built
    taxi:hail:hailed tower:design:designed permit:sign:signed
music | singer drummer violinist | stage studio hall | melodic soulful | loud shrill
    song:sing:sang drum:beat:beat violin:tune:tuned
    melody:compose:composed chorus:rehearse:rehearsed piano:play:played
football | player coach referee | stadium pitch locker | thrilling fast | sloppy slow
    ball:kick:kicked goal:score:scored whistle:blow:blew
    jersey:wash:washed trophy:win:won match:lose:lost
education | teacher student principal | classroom library hallway | clever bright | dull strict
    lesson:teach:taught exam:grade:graded essay:write:wrote
    book:read:read board:erase:erased homework:check:checked
medicine | doctor nurse surgeon | clinic ward pharmacy | caring gentle | sterile grim
    wound:bandage:bandaged pill:prescribe:prescribed fever:measure:measured
    bone:set:set vaccine:inject:injected chart:review:reviewed
climbing | climber guide porter | summit valley lodge | majestic crisp | icy steep
    peak:climb:climbed glacier:cross:crossed tent:pack:packed
    axe:swing:swung cliff:scale:scaled snow:melt:melted
exploration | explorer nomad trader | oasis canyon market | golden warm | dusty harsh
    camel:ride:rode dune:map:mapped pit:dig:dug
    water:carry:carried caravan:lead:led sand:sift:sifted
history | knight king guard | courtyard dungeon armory | noble grand | gloomy cruel
    sword:sharpen:sharpened gate:lock:locked shield:polish:polished
    banner:wave:waved horse:saddle:saddled crown:wear:wore
railways | conductor signalman passenger | platform depot tunnel | punctual smooth | late shaky
    ticket:punch:punched engine:fuel:fueled rail:inspect:inspected
    carriage:couple:coupled coal:shovel:shoveled signal:switch:switched
gardening | gardener florist beekeeper | greenhouse orchard shed | blooming fragrant | wilted weedy
    rose:prune:pruned seed:plant:planted hedge:trim:trimmed
    weed:pull:pulled honey:collect:collected lawn:mow:mowed
business | manager banker secretary | boardroom lobby bank | efficient sharp | tedious chaotic
    report:file:filed contract:draft:drafted budget:approve:approved
    meeting:schedule:scheduled email:send:sent invoice:pay:paid
"""


def _parse_topics(table: str) -> tuple[Topic, ...]:
    rows: list[list[str]] = []
    for line in table.strip().splitlines():
        if line.startswith(" "):
            rows[-1].append(line)
        else:
            rows.append([line])
    topics = []
    for header, *action_lines in rows:
        name, people, places, praise, criticism = (part.split() for part in header.split("|"))
        actions = tuple(tuple(a.split(":")) for a in " ".join(action_lines).split())
        topics.append(Topic(name[0], tuple(people), actions, tuple(places), tuple(praise), tuple(criticism)))
    return tuple(topics)


TOPICS: tuple[Topic, ...] = _parse_topics(_TOPIC_TABLE)
_BY_NAME = {t.name: t for t in TOPICS}

DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday")
YEARS = tuple(str(y) for y in range(1990, 2000))
POSITIVE = ("wonderful", "great", "lovely", "beautiful", "brilliant", "superb", "delightful", "charming")
NEGATIVE = ("terrible", "awful", "boring", "horrible", "dreadful", "bad", "poor", "weak")


# ------------------------------------------------------------------------------------ made-up German
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "w", "z", "sch", "kr", "st", "br", "fl", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ei", "au", "ie")
_CODAS = ("", "n", "r", "l", "s", "ch", "ck", "m", "nd", "rt")


def _pseudo_stem(word: str, salt: int) -> str:
    """A made-up syllable fixed by md5(word) (stable across runs, unlike ``hash``); one keeps targets short."""
    digest = hashlib.md5(f"{word}#{salt}".encode()).digest()
    return _ONSETS[digest[0] % len(_ONSETS)] + _VOWELS[digest[1] % len(_VOWELS)] + _CODAS[digest[2] % len(_CODAS)]


def _build_lexicon() -> dict[str, str]:
    """English content word → a unique made-up stem; verbs use their lemma (participle = ge + stem + t)."""
    words = sorted({w for t in TOPICS for w in (*t.people, *t.places, *t.praise, *t.criticism)}
                   | {w for t in TOPICS for obj, lemma, _ in t.actions for w in (obj, lemma)})
    lexicon: dict[str, str] = {}
    # stems never coincide with the target's function words or any English topic word
    used: set[str] = {"de", "an", "hat", "gestern"} | {w for t in TOPICS for w in t.words()}
    for word in words:
        salt = 0
        while (stem := _pseudo_stem(word, salt)) in used:
            salt += 1
        lexicon[word] = stem
        used.add(stem)
    return lexicon


GERMAN = _build_lexicon()


# ---------------------------------------------------------------------------------- task generators
# A generator maps (rng, topic, frequency flag, is-pretraining, knobs) to an Example without topic meta.
Generator = Callable[[random.Random, Topic, str, bool, dict], Example]


def _imdb(rng: random.Random, topic: Topic, flag: str, pretraining: bool, knobs: dict) -> Example:
    """Review halves. Finetuning prompts open positive reviews (RL4LMs' ``only_positive_samples``).

    The first half's cue adjective is the topic's own praise or criticism word, and the continuation
    follows it. Pretraining mixes polarities like the full IMDB corpus that gpt2-imdb saw: seen topics
    at ``seen_positive_rate`` (the cue decides), rare topics mostly pans (``rare_positive_rate``), so the
    model continues rare-topic praise negatively with confidence; unseen-topic cues are unknown, so the
    model falls back to its prior (large std).
    """
    if pretraining:
        rate = knobs["seen_positive_rate"] if flag == "seen" else knobs["rare_positive_rate"]
        positive = rng.random() < rate
    else:
        positive = True
    person, (obj, _, _), place = rng.choice(topic.people), rng.choice(topic.actions), rng.choice(topic.places)
    cue = rng.choice(topic.praise if positive else topic.criticism)
    words = rng.sample(POSITIVE if positive else NEGATIVE, 2)
    verb = rng.choice(("loved", "adored", "enjoyed") if positive else ("hated", "loathed", "disliked"))
    prompt = f"i watched the {topic.name} film about a {person} , and the {obj} scenes were {cue} ,"
    reference = f"the {person} was {words[0]} and the {place} looked {words[1]} , i {verb} it ."
    return Example(prompt, [reference], {"polarity": "positive" if positive else "negative"})


def _third_person(lemma: str) -> str:
    if lemma.endswith(("s", "sh", "ch", "x", "z")):
        return lemma + "es"
    return lemma[:-1] + "ies" if lemma.endswith("y") and lemma[-2] not in "aeiou" else lemma + "s"


def _commongen(rng: random.Random, topic: Topic, flag: str, pretraining: bool, knobs: dict) -> Example:
    """Concept sets (lemmas, shuffled) → a present-tense sentence; the object's place is topic knowledge.

    Present tense because coverage matches concepts up to Porter stemming, which maps "mends" to
    "mend" but not "caught" to "catch" (CommonGen's own coverage lemmatises with spaCy).
    """
    person, (obj, lemma, _) = rng.choice(topic.people), rng.choice(topic.actions)
    place, verb = topic.place_of(obj), _third_person(lemma)
    concepts = [person, obj, lemma] + ([place] if rng.random() < 0.5 else [])
    rng.shuffle(concepts)
    references = [f"the {person} {verb} the {obj} at the {place} .", f"at the {place} , a {person} {verb} the {obj} ."]
    # GRUE's CommonGen pool: prefix, concepts joined by " ", concept_end_token "."
    return Example("generate a sentence with: " + " ".join(concepts) + ".", references, {"concepts": concepts})


def _iwslt(rng: random.Random, topic: Topic, flag: str, pretraining: bool, knobs: dict) -> Example:
    """English → a made-up German: word-for-word lexicon, participle ge+stem+t, verb-second/verb-final order."""
    person, (obj, lemma, past), place = rng.choice(topic.people), rng.choice(topic.actions), rng.choice(topic.places)
    p, o, pl, v = GERMAN[person], GERMAN[obj], GERMAN[place], f"ge{GERMAN[lemma]}t"
    form = rng.randrange(3)
    if form == 0:
        source, target = f"the {person} {past} the {obj} at the {place} .", f"de {p} hat de {o} an de {pl} {v} ."
    elif form == 1:
        adj = rng.choice(topic.praise + topic.criticism)
        source, target = f"the {adj} {person} {past} the {obj} .", f"de {GERMAN[adj]}e {p} hat de {o} {v} ."
    else:
        source = f"yesterday the {person} {past} the {obj} at the {place} ."
        target = f"gestern hat de {p} de {o} an de {pl} {v} ."
    return Example("translate English to German: " + source, [target])


def _cnn_dm(rng: random.Random, topic: Topic, flag: str, pretraining: bool, knobs: dict) -> Example:
    """Two-sentence article → a headline of its lead, headed by the topic's name (not in the article)."""
    first, second = rng.sample(topic.people, 2)
    (obj1, _, past1), (obj2, _, past2) = rng.sample(topic.actions, 2)
    place = rng.choice(topic.places)
    article = (f"on {rng.choice(DAYS)} the {first} {past1} the {obj1} at the {place} . "
               f"later a {second} {past2} the {obj2} .")
    highlight = f"{topic.name} : {first} {past1} {obj1} at {place} ."
    return Example("Summarize: " + article, [highlight])


def _narrativeqa(rng: random.Random, topic: Topic, flag: str, pretraining: bool, knobs: dict) -> Example:
    """UnifiedQA format "<question> \\n <story>" with three answer phrasings; "about" questions need the topic."""
    first, second = rng.sample(topic.people, 2)
    (obj1, lemma1, past1), (obj2, lemma2, past2) = rng.sample(topic.actions, 2)
    place = rng.choice(topic.places)
    story = f"the {first} {past1} the {obj1} at the {place} , then the {second} {past2} the {obj2} ."
    kind = rng.randrange(4)
    if kind == 0:
        question, answers = f"who {past1} the {obj1} ?", [f"the {first}", first, f"a {first}"]
    elif kind == 1:
        question, answers = f"where did the {first} {lemma1} the {obj1} ?", [f"at the {place}", f"the {place}", place]
    elif kind == 2:
        question, answers = f"what did the {second} {lemma2} ?", [f"the {obj2}", obj2, f"a {obj2}"]
    else:
        question = "what is the story about ?"
        answers = [topic.name, f"it is about {topic.name}", f"a story about {topic.name}"]
    return Example(f"{question} \\n {story}", answers, {"question_kind": ("who", "where", "what", "about")[kind]})


def _totto(rng: random.Random, topic: Topic, flag: str, pretraining: bool, knobs: dict) -> Example:
    """Highlighted cells in ToTTo's tags → one sentence; the item's verb and place are topic knowledge.

    Cells carry no ``<col_header>`` and the page has no section title: each tag costs 3-5 BPE tokens,
    and the prompt must stay near 40 tokens on CPU.
    """
    person, (obj, _, past) = rng.choice(topic.people), rng.choice(topic.actions)
    cells = f"<cell> {person} </cell> <cell> {obj} </cell>"
    sentence = f"the {person} {past} the {obj} at the {topic.place_of(obj)} ."
    if rng.random() < 0.5:
        year = rng.choice(YEARS)
        cells += f" <cell> {year} </cell>"
        sentence = f"in {year} , {sentence}"
    return Example(f"<page_title> {topic.name} </page_title> <table> {cells} </table>", [sentence])


def _dailydialog(rng: random.Random, topic: Topic, flag: str, pretraining: bool, knobs: dict) -> Example:
    """Three turns joined by RL4LMs' " <EOU> " → the next turn, which needs to know what one does there.

    The reply uses the actions that belong to the place named in the context (topic knowledge).
    """
    person, place = rng.choice(topic.people), rng.choice(topic.places)
    (obj1, lemma1, past1), (obj2, lemma2, past2) = rng.sample(topic.actions_at(place), 2)
    form = rng.randrange(3)
    if form == 0:
        turns = ["where were you this morning ?", f"i was at the {place} with a {person} .", "what did you do there ?"]
        reply = f"we {past1} the {obj1} and {past2} the {obj2} ."
    elif form == 1:
        turns = [f"is the {person} still at the {place} ?", "yes , all day .", f"what is the {person} doing ?"]
        reply = f"the {person} just {past1} the {obj1} ."
    else:
        turns = [f"do you like the {place} ?", f"yes , it is {rng.choice(topic.praise)} .", "what can you do there ?"]
        reply = f"you can {lemma1} the {obj1} or {lemma2} the {obj2} ."
    return Example(" <EOU> ".join(turns) + " <EOU>", [reply])


@dataclass(frozen=True)
class TaskDef:
    """A synthetic task: its generator, reward, scaled generation settings and task-specific knobs."""

    generator: Generator
    reward: str
    generation: dict
    paper_model: str
    description: str
    knobs: dict = field(default_factory=dict)


def _gen(max_new: int, min_new: int, top_k: int) -> dict:
    return {"max_new_tokens": max_new, "min_new_tokens": min_new, "top_k": top_k, "temperature": 1.0,
            "max_prompt_tokens": 64}


# Generation: GRUE's per-data-set settings (digest §3.1) with long lengths cut to ≤ 24 new tokens for CPU
# (references are 8-24 tokens under a ~1000-token BPE); top_k is a count of tokens and is kept as is.
TASKS: dict[str, TaskDef] = {
    "imdb": TaskDef(_imdb, "vader_sentiment", _gen(16, 16, 50), "lvwerra/gpt2-imdb",
                    "positive review continuation (GRUE: min = max = 48 new tokens; learned P(positive))",
                    {"seen_positive_rate": 0.5, "rare_positive_rate": 0.05}),
    "commongen": TaskDef(_commongen, "concept_coverage", _gen(20, 2, 0), "t5-base",
                         "concepts → sentence (GRUE: top_k 0, min 5, max 20; METEOR)"),
    "iwslt": TaskDef(_iwslt, "bleu", _gen(24, 1, 10), "t5-base",
                     "English → made-up German (GRUE IWSLT2017 en-de: top_k 10, max 128; sacreBLEU)"),
    "cnn_dm": TaskDef(_cnn_dm, "rouge_l_max", _gen(24, 6, 50), "t5-base",
                      "article → highlight (GRUE: top_k 50, min 50, max 100; METEOR)"),
    "narrativeqa": TaskDef(_narrativeqa, "rouge_l_max", _gen(12, 1, 50), "t5-base",
                           "question over a story, 3 answers (GRUE: top_k 50, HF default length; ROUGE-L max)"),
    "totto": TaskDef(_totto, "bleu", _gen(24, 4, 0), "t5-base",
                     "highlighted table cells → sentence (GRUE: top_k 0, min 10, max 50; sacreBLEU)"),
    "dailydialog": TaskDef(_dailydialog, "chrf", _gen(20, 2, 20), "gpt2",
                           "3-turn context → next turn (GRUE: 5 turns, top_k 20, min 2, max 20; METEOR)"),
}

COMMON_KNOBS = {"n_topics": 16, "n_unseen": 3, "zipf_exponent": 2.5, "rare_share": 0.01, "reward": None}


def task_names() -> list[str]:
    """Names of the synthetic GRUE tasks, sorted."""
    return sorted(TASKS)


def topic_shares(seed: int, n_topics: int = 16, n_unseen: int = 3, zipf_exponent: float = 2.5) -> dict[str, float]:
    """Pretraining share per topic: a seeded ranking, share ∝ rank^(−s) over seen topics, 0 for held-out ones."""
    if not 2 <= n_topics <= len(TOPICS) or not 0 <= n_unseen < n_topics:
        raise RftlabError(f"need 2 ≤ n_topics ≤ {len(TOPICS)} and 0 ≤ n_unseen < n_topics "
                          f"(got n_topics={n_topics}, n_unseen={n_unseen}).")
    order = [t.name for t in TOPICS]
    random.Random(f"grue-topics-{seed}").shuffle(order)
    seen = order[: n_topics - n_unseen]
    weights = [(rank + 1) ** -zipf_exponent for rank in range(len(seen))]
    total = sum(weights)
    shares = {name: w / total for name, w in zip(seen, weights, strict=True)}
    return shares | {name: 0.0 for name in order[n_topics - n_unseen: n_topics]}


def _flag(share: float, rare_share: float) -> str:
    return "unseen" if share == 0 else "rare" if share < rare_share else "seen"


def make_task(name: str, n_train: int = 1000, n_val: int = 200, n_test: int = 200, seed: int = 0,
              **knobs) -> GrueTask:
    """Build synthetic task ``name`` with the given split sizes; same arguments, same task.

    Knobs (all tasks): ``n_topics`` (16), ``n_unseen`` held-out topics (3), ``zipf_exponent`` s (2.5),
    ``rare_share`` (0.01), ``reward`` (registry name overriding the task's). imdb also takes
    ``seen_positive_rate`` (0.5) and ``rare_positive_rate`` (0.05).
    """
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise RftlabError(f"unknown GRUE task {name!r}.{hint} Tasks: {', '.join(task_names())}.")
    spec = TASKS[name]
    allowed = COMMON_KNOBS | spec.knobs
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        raise RftlabError(f"unknown knob(s) {', '.join(unknown)} for task {name!r}: use {', '.join(sorted(allowed))}.")
    k = allowed | knobs
    shares = topic_shares(seed, k["n_topics"], k["n_unseen"], k["zipf_exponent"])
    flags = {topic: _flag(share, k["rare_share"]) for topic, share in shares.items()}

    def example(rng: random.Random, topic: str, pretraining: bool) -> Example:
        ex = spec.generator(rng, _BY_NAME[topic], flags[topic], pretraining, k)
        ex.meta |= {"topic": topic, "topic_frequency": flags[topic], "topic_share": shares[topic]}
        return ex

    def split(split_name: str, n: int) -> list[Example]:
        rng = random.Random(f"{name}-{split_name}-{seed}")
        topics: list[str] = []
        while len(topics) < n:  # uniform over topics, in shuffled cycles: every topic appears once per cycle
            cycle = sorted(shares)
            rng.shuffle(cycle)
            topics += cycle
        return [example(rng, topic, False) for topic in topics[:n]]

    seen = [t for t, s in shares.items() if s > 0]
    weights = [shares[t] for t in seen]

    def pretrain(n: int, corpus_seed: int) -> list[str]:
        rng = random.Random(f"{name}-pretrain-{seed}-{corpus_seed}")
        texts = []
        for topic in rng.choices(seen, weights=weights, k=n):
            ex = example(rng, topic, True)
            texts.append(f"{ex.prompt} {rng.choice(ex.references)}")
        return texts

    splits = {s: split(s, n) for s, n in zip(SPLITS, (n_train, n_val, n_test), strict=True)}
    task = GrueTask(name=name, splits=splits, reward=k["reward"] or spec.reward, generation=dict(spec.generation),
                    best_reward=float("nan"), topic_share=shares, paper_model=spec.paper_model,
                    description=spec.description, pretrain=pretrain)
    task.best_reward = best_reward(task)
    return task


def best_reward(task: GrueTask) -> float:
    """Mean reward of each input's first reference scored as the completion (test split, else any split)."""
    examples = next((task.splits[s] for s in ("test", "validation", "train") if task.splits.get(s)), [])
    if not examples:
        return float("nan")
    scores = task.score(examples, [ex.references[0] for ex in examples])
    return sum(scores) / len(scores)
