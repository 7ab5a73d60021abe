"""The policy of the preference experiments: a small GPT-2 pretrained on unlabelled review text and SFT'd on
labelled reviews (``rftlab.data.sentiment``), or a loaded model (GPT-2 at paper scale).

Configs are plain dataclasses (no torch at import) so experiment modules can nest them in their Config.
Pretraining is cached under ``<results>/_cache`` by a hash of everything it depends on; SFT is cheap and
runs per variant, as the paper SFTs one GPT-2 per data variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["PretrainConfig", "SFTStageConfig", "pretrained_policy", "sft_chosen"]


@dataclass(frozen=True)
class PretrainConfig:
    texts: int = 4000  # unlabelled texts (reviews, neutral clauses) for the pretraining stand-in
    steps: int = 600  # causal-LM steps (0 with a loaded model = use it as is)
    batch_size: int = 32  # texts per step
    lr: float = 1e-3  # AdamW learning rate
    max_length: int = 48  # tokens per text


@dataclass(frozen=True)
class SFTStageConfig:
    steps: int = 300  # SFT steps on the chosen responses (paper: 128 steps of GPT-2, lr 1.41e-5, batch 16)
    batch_size: int = 16  # pairs per step
    lr: float = 1e-3  # AdamW learning rate
    optimizer: Literal["adamw"] = "adamw"  # (TRL's SFTTrainer default)


def pretrained_policy(run, model_cfg, pretrain: PretrainConfig, seed: int):
    """(tokenizer, model): ``model_cfg.name_or_path`` loaded as is, or a fresh GPT-2 of ``model_cfg``'s sizes
    with a word tokenizer over the sentiment vocabulary, pretrained on ``pretrain.texts`` unlabelled texts."""
    from rftlab import models, tokenization
    from rftlab.data import sentiment
    from rftlab.rl import train

    if model_cfg.name_or_path:
        tokenizer = tokenization.load_tokenizer(model_cfg.name_or_path, allow_download=model_cfg.allow_download)
        return tokenizer, models.build_model(model_cfg, tokenizer).to(run.device)
    return train.cached_pretrained_lm(
        run, "sentiment-pretrained", (model_cfg, pretrain, seed), model_cfg,
        lambda: tokenization.word_tokenizer(sentiment.vocabulary_texts()),
        lambda: sentiment.pretrain_texts(pretrain.texts, seed), steps=pretrain.steps,
        batch_size=pretrain.batch_size, lr=pretrain.lr, max_length=pretrain.max_length, seed=seed)


def sft_chosen(model, data, cfg: SFTStageConfig, seed: int, progress=None) -> list[float]:
    """SFT on the chosen responses of ``data`` (a ``PreferenceData``): ``cfg.steps`` AdamW steps on minibatches
    drawn uniformly with replacement by a generator seeded with ``seed``. Returns the loss per step."""
    import torch

    from rftlab.preference_train import sft_chosen_step

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(cfg.steps):
        idx = torch.randint(len(data), (min(cfg.batch_size, len(data)),), generator=gen)
        history.append(sft_chosen_step(model, optimizer, data.select(idx))["loss/sft"])
        if progress is not None:
            progress.advance()
    return history
