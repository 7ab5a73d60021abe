"""The GRUE-style pipeline shared by ``grue``, ``remedies``, ``sft-fraction`` and ``rft-mitigations``
(Razin et al. 2024, §4.1 and §5): task loading, the cached pretrained model, and per task the stages (SFT,
RFT, per-input reward statistics) run on copies of it.

Configs here are plain dataclasses (no torch at import): experiment modules nest them in their Config.
``TaskStages`` and the functions take any config object with the attributes ``tasks`` (TasksConfig), ``model``
(LMConfig), ``pretrain`` (PretrainConfig), ``stats`` (SamplingConfig), ``rft`` (RFTConfig), ``sft``
(SFTConfig) and ``seed``; experiments that share these values share the pretrained-model cache.

On several processes (``rftlab.distributed``) the stages are data-parallel: each RFT and SFT step's batch is
drawn as in one process and split into equal contiguous shards, one per process, with the gradients averaged by
DDP; the per-input statistics are sampled in chunks of ``stats.batch_size`` inputs, chunk c seeded from
(seed, c) whichever process samples it, so the statistics of a given model are the same on any number of
processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SMALL_STD = 0.05  # "small reward std" threshold used in the summaries


@dataclass(frozen=True)
class TasksConfig:
    names: tuple[str, ...] = ("imdb", "commongen", "iwslt", "cnn_dm", "narrativeqa", "totto")  # GRUE tasks
    source: Literal["synthetic", "real"] = "synthetic"  # generated stand-ins, or the real data sets (paper)
    data_dir: str = "data"  # folder of the real data sets (source = real)
    n_train: int = 400  # train inputs per task used for finetuning (0 = the whole split; real data only)
    n_stats: int = 200  # train inputs per task whose per-input statistics are measured (paper: 5000)
    n_grad: int = 40  # inputs per task for the sampled gradient-norm estimate
    reward: str = ""  # override every task's reward by registry name (e.g. chrf for METEOR); "" = the task's
    seed: int = 0  # seeds task generation and the topic ranking

    def __post_init__(self) -> None:
        from rftlab.data.grue_tasks import TASKS  # light: plain Python

        unknown = [n for n in self.names if n not in TASKS]
        if unknown or not self.names:
            raise ValueError(f"unknown GRUE task(s) {unknown} in tasks.names; choose from {', '.join(TASKS)}")
        if self.source == "synthetic" and self.n_train <= 0:
            raise ValueError("tasks.n_train must be > 0 for synthetic tasks (0 = the whole split, real data only)")
        if 0 < self.n_train < self.n_stats:
            raise ValueError("tasks.n_stats must be ≤ tasks.n_train (statistics are measured on train inputs)")


@dataclass(frozen=True)
class PretrainConfig:
    texts_per_task: int = 3000  # pretraining texts drawn per task (pooled across tasks)
    steps: int = 1200  # causal-LM steps (0 with a loaded model = use it as is)
    batch_size: int = 32  # texts per step
    lr: float = 1e-3  # AdamW learning rate
    vocab_size: int = 1000  # BPE vocabulary trained on the pooled text
    max_length: int = 96  # tokens per pretraining text


class TaskStages:
    """The training stages and measurements of one task, from copies of the pretrained model."""

    def __init__(self, cfg, run, tokenizer, base, name: str, task, bar) -> None:
        self.cfg, self.run, self.tokenizer, self.base, self.name, self.task, self.bar = (
            cfg, run, tokenizer, base, name, task, bar)
        self.train_examples = task.splits["train"][: cfg.tasks.n_train or None]
        self.stats_examples = self.train_examples[: cfg.tasks.n_stats]
        self.generation = generation_settings(cfg, task)

    def scorer(self, batch: list):
        """``score(index, texts)`` for a batch of examples, as the finetuning steps expect."""
        return lambda index, texts: self.task.score([batch[i] for i in index], texts)

    def fresh(self, state: dict | None = None):
        """A copy of the pretrained model (with LoRA adapters when ``model.lora_r`` > 0), optionally loaded
        with the state of an earlier stage."""
        import copy

        from rftlab import models

        model = copy.deepcopy(self.base)
        if self.cfg.model.lora_r > 0:
            model = models.add_lora(model, r=self.cfg.model.lora_r, alpha=self.cfg.model.lora_alpha, dropout=0.0)
        if state is not None:
            model.load_state_dict(state)
        return model.to(self.run.device)

    def measure(self, model, stage: str):
        """Per-input statistics on ``n_stats`` train inputs (+ the sampled gradient norm when pretrained).

        Inputs are sampled in chunks of ``stats.batch_size`` (one ``generate`` call each), chunk c with seed
        ``distributed.chunk_seed(seed, c)`` (chunk 0: ``seed``), so that processes can split the chunks and
        still draw what one process draws."""
        import numpy as np
        import pandas as pd

        from rftlab.rl import train

        cfg, examples = self.cfg, self.stats_examples
        prompts = [ex.prompt for ex in examples]
        size = cfg.stats.batch_size
        rewards, texts = train.per_input_rewards(model, self.tokenizer, prompts, self.scorer(examples),
                                                 cfg.stats.k, self.generation, temperature=cfg.stats.temperature,
                                                 seed=cfg.seed, batch_size=size)  # chunks split between processes
        table = pd.DataFrame({
            "task": self.name, "stage": stage, "input_id": np.arange(len(prompts)),
            "topic_frequency": [ex.meta.get("topic_frequency", "") for ex in examples],
            "reward_mean": rewards.mean(1), "reward_std": rewards.std(1),  # population std over the K samples
            "rewards": list(rewards), "best_reward": self.task.best_reward,
            "sample": texts[:: cfg.stats.k], "prompt": prompts,
        })
        table["grad_norm"] = table["grad_reward_std"] = np.nan
        if stage == "pretrained" and cfg.tasks.n_grad > 0:
            n = min(cfg.tasks.n_grad, len(prompts))
            norms, used = train.expected_gradient_norms(
                model, self.tokenizer, prompts[:n], self.scorer(examples), cfg.stats.k, self.generation,
                temperature=cfg.stats.temperature, seed=cfg.seed + 1, batch_size=size)
            table.loc[: n - 1, "grad_norm"] = norms
            table.loc[: n - 1, "grad_reward_std"] = used.std(1)  # std of the very samples behind the estimate
        self.bar.advance()
        return table

    def rft(self, model, stage: str, rft=None, log: dict | None = None):
        """``rft.steps`` PPO (with a value head and a frozen reference) or REINFORCE steps on train inputs.

        ``rft`` (an RFTConfig) replaces ``cfg.rft`` for this call (remedy sweeps); ``log`` adds columns to
        every logged row (e.g. the setting's name)."""
        import dataclasses

        import torch

        from rftlab import distributed as dist
        from rftlab import models, runtime
        from rftlab.rl import losses, train

        cfg = rft or self.cfg.rft
        gen = torch.Generator().manual_seed(self.cfg.seed)
        ppo = cfg.algorithm == "ppo"
        policy = models.PolicyWithValue(model, cfg.critic).to(self.run.device) if ppo else model
        reference = models.frozen_copy(model) if ppo else None
        optimizer = train.optimizer_for(policy, cfg.lr)
        kl = (losses.AdaptiveKLController(cfg.kl_init, cfg.kl_target) if cfg.kl_target > 0
              else losses.FixedKLController(cfg.kl_init))
        policy = dist.prepare(policy, self.run.compile)
        if dist.active():  # per process: 1/N of each PPO minibatch (the same number of updates), one KL for all
            cfg, kl = dataclasses.replace(cfg, minibatch_size=cfg.minibatch_size // dist.world_size()), _MeanKL(kl)
            dist.seed_per_process(self.cfg.seed)
        for step in range(cfg.steps):
            idx = torch.randint(len(self.train_examples), (cfg.batch_prompts,), generator=gen).tolist()
            batch = [self.train_examples[i] for i in dist.shard(idx)]
            prompts = [ex.prompt for ex in batch]
            with runtime.autocast(self.run.device, self.run.precision):
                if ppo:
                    stats = train.ppo_step(policy, reference, optimizer, self.tokenizer, prompts, self.scorer(batch),
                                           cfg, self.generation, kl)
                else:
                    stats = train.reinforce_step(policy, optimizer, self.tokenizer, prompts, self.scorer(batch), cfg,
                                                 self.generation)
            self.run.log(task=self.name, stage=stage, step=step, **(log or {}), **dist.mean(stats))
            self.bar.advance()
        dist.check_in_sync(self.run, model, f"{self.name}/{stage}")
        return model

    def sft(self, model, steps: int | None = None, examples: list | None = None, log: dict | None = None):
        """``sft.steps`` (or ``steps``) steps of cross-entropy on (prompt, first reference) pairs of the train
        inputs (or of ``examples``, e.g. a labelled subset); ``log`` adds columns to every logged row."""
        import torch

        from rftlab import distributed as dist
        from rftlab import runtime
        from rftlab.rl import train

        cfg = self.cfg.sft
        gen = torch.Generator().manual_seed(self.cfg.seed + 7)
        optimizer = train.optimizer_for(model, cfg.lr)
        trained = dist.prepare(model, self.run.compile)
        pool = self.train_examples if examples is None else examples
        for step in range(cfg.steps if steps is None else steps):
            idx = torch.randint(len(pool), (cfg.batch_size,), generator=gen).tolist()
            batch = [pool[i] for i in dist.shard(idx)]
            with runtime.autocast(self.run.device, self.run.precision):
                stats = train.sft_step(trained, optimizer, self.tokenizer, [ex.prompt for ex in batch],
                                       [ex.references[0] for ex in batch],
                                       max_response_length=self.generation["max_new_tokens"])
            self.run.log(task=self.name, stage="sft", step=step, **(log or {}), **dist.mean(stats))
            self.bar.advance()
        dist.check_in_sync(self.run, model, f"{self.name}/sft")
        return model


class _MeanKL:
    """A KL controller that adapts β to the mean KL over processes, so that every process keeps the same β."""

    def __init__(self, inner) -> None:
        self.inner = inner

    @property
    def beta(self) -> float:
        return self.inner.beta

    def update(self, kl: float, n_steps: int = 1) -> float:
        from rftlab import distributed as dist

        return self.inner.update(dist.mean({"kl": kl})["kl"], n_steps)


def check_inputs(cfg) -> None:
    """An experiment's ``check``: before a run folder exists, the real data sets' folders (``tasks.source =
    real``) and a local model folder (``model.name_or_path`` a path) exist; a one-line RftlabError if not."""
    from pathlib import Path

    from rftlab.data import grue_real
    from rftlab.errors import RftlabError

    for name in cfg.tasks.names if cfg.tasks.source == "real" else ():
        folder = Path(cfg.tasks.data_dir).expanduser() / grue_real.REAL_TASKS[name].folder
        if not folder.exists():
            raise RftlabError(f"GRUE data set {name!r} not found at {folder}: on a machine with network run "
                              f"{grue_real.download_hint(name, cfg.tasks.data_dir)} and copy the folder here.")
    if cfg.model.name_or_path.startswith(("/", ".", "~")) and not Path(cfg.model.name_or_path).expanduser().is_dir():
        raise RftlabError(f"model.name_or_path {cfg.model.name_or_path!r} is not a folder: save a model there with "
                          "save_pretrained() or pass a Hugging Face hub name such as t5-base.")


def load_task(cfg, name: str):
    n = cfg.tasks.n_train
    if cfg.tasks.source == "synthetic":
        from rftlab.data import grue_tasks

        knobs = {"reward": cfg.tasks.reward} if cfg.tasks.reward else {}
        return grue_tasks.make_task(name, n_train=n, n_val=50, n_test=50, seed=cfg.tasks.seed, **knobs)
    from rftlab.data import grue_real

    # only train inputs are used: load one validation and test input, not the whole splits
    return grue_real.load_real_task(name, data_dir=cfg.tasks.data_dir, n_train=n, n_val=1, n_test=1,
                                    seed=cfg.tasks.seed, reward=cfg.tasks.reward or None)


def generation_settings(cfg, task) -> dict:
    """The task's GRUE-style decoding settings, with the config's overrides, as ``sample`` keyword arguments."""
    g, s = task.generation, cfg.stats
    return {"max_new_tokens": s.max_new_tokens or g["max_new_tokens"],
            "min_new_tokens": g["min_new_tokens"] if s.min_new_tokens < 0 else s.min_new_tokens,
            "top_k": g["top_k"] if s.top_k < 0 else s.top_k,
            "max_prompt_length": g.get("max_prompt_tokens")}


def pretrained_model(cfg, tasks: dict, run):
    """Tokenizer and pretrained policy: a loaded model (paper scale), or a small GPT-2 pretrained on the pooled
    topic-shifted corpora of the tasks, cached under ``<results>/_cache`` by a hash of everything it depends on."""
    from rftlab import models, tokenization
    from rftlab.rl import train

    if cfg.model.name_or_path:
        tokenizer = tokenization.load_tokenizer(cfg.model.name_or_path)
        return tokenizer, models.build_model(cfg.model, tokenizer).to(run.device)
    texts = [t for i, task in enumerate(tasks.values()) for t in task.pretrain_texts(cfg.pretrain.texts_per_task,
                                                                                     seed=cfg.seed + i)]
    corpus = texts + [ex.prompt + " " + ex.references[0] for task in tasks.values() for ex in task.splits["train"]]
    p = cfg.pretrain
    return train.cached_pretrained_lm(
        run, "grue-pretrained", (cfg.tasks, cfg.model, cfg.pretrain, cfg.seed), cfg.model,
        lambda: tokenization.train_bpe_tokenizer(corpus, p.vocab_size), lambda: texts, steps=p.steps,
        batch_size=p.batch_size, lr=p.lr, max_length=p.max_length, seed=cfg.seed)


