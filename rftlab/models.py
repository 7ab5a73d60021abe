"""Language models: tiny GPT-2 / T5 built from config, Hugging Face models by name or path, value heads, LoRA.

One forward convention serves every algorithm. A batch is a prompt x (padded, mask m_x) and a response
y = (y_1..y_T) (right-padded after EOS, mask m_y). :func:`response_forward_hidden` returns, for each
response position t, the logits of p_θ(·|x, y_<t) and the final hidden state that produced them:

- causal LM: the model reads [x ; y] (x left-padded), positions count non-pad tokens only, and the
  logits for y_t sit at sequence position |x| − 1 + t;
- seq2seq LM: the encoder reads x, the decoder reads [decoder_start ; y_<T] (teacher forcing).

The value head of :class:`PolicyWithValue` reads the same hidden states, so V(x, y_<t) is the value of the
state in which y_t is chosen (RL4LMs / TRL convention).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from rftlab.errors import RftlabError
from rftlab.lm_config import LMConfig  # noqa: F401 - re-exported: the config lives in a light module
from rftlab.tokenization import missing_message

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def is_seq2seq(model: nn.Module) -> bool:
    """True for encoder-decoder models (T5), False for causal ones; sees through PolicyWithValue and peft."""
    return bool(unwrap(model).config.is_encoder_decoder)


def unwrap(model: nn.Module) -> PreTrainedModel:
    """The language model inside a :class:`PolicyWithValue` (peft wrappers are kept: they forward to it)."""
    return model.model if isinstance(model, PolicyWithValue) else model


def build_model(cfg: LMConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A GPT2LMHeadModel / T5ForConditionalGeneration sized by ``cfg`` with the tokenizer's vocabulary and
    special ids, randomly initialised; or, when ``cfg.name_or_path`` is set, the pretrained model it names
    (AutoModelForCausalLM for gpt2, AutoModelForSeq2SeqLM for t5), from local files unless
    ``cfg.allow_download``. The model is returned in train mode on the CPU."""
    dtype = getattr(torch, cfg.dtype)
    if cfg.name_or_path:
        return _load_pretrained(cfg, tokenizer, dtype)
    from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

    if cfg.n_embd % cfg.n_head:
        raise RftlabError(f"model.n_embd={cfg.n_embd} must be a multiple of model.n_head={cfg.n_head}.")
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
               bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id)
    d_ff = cfg.d_ff or 4 * cfg.n_embd
    if cfg.arch == "gpt2":
        config = GPT2Config(n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head, n_positions=cfg.n_positions,
                            n_inner=d_ff, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                            # GPT-2's tanh-approximated GELU as one fused kernel (gelu_new is 5 Python-level ops)
                            activation_function="gelu_pytorch_tanh", **ids)
        config._attn_implementation = cfg.attention
        config.loss_type = "ForCausalLM"  # named explicitly: transformers warns on every model built without it
        model = GPT2LMHeadModel(config)
        model.loss_type = "ForCausalLM"  # the attribute transformers 5 reads (it leaves it None for GPT-2)
    elif cfg.arch == "t5":
        # T5 starts decoding from the pad token, as the original checkpoints do
        config = T5Config(d_model=cfg.n_embd, d_kv=cfg.n_embd // cfg.n_head, d_ff=d_ff, num_layers=cfg.n_layer,
                          num_decoder_layers=cfg.n_decoder_layer or cfg.n_layer, num_heads=cfg.n_head,
                          dropout_rate=cfg.dropout, feed_forward_proj="relu",
                          decoder_start_token_id=tokenizer.pad_token_id, **ids)
        config._attn_implementation = cfg.attention
        model = T5ForConditionalGeneration(config)
    else:
        raise RftlabError(f"model.arch must be gpt2 or t5, got {cfg.arch!r}.")
    _sync_generation_ids(model, tokenizer)
    return model.to(dtype)


def _load_pretrained(cfg: LMConfig, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype) -> PreTrainedModel:
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if cfg.arch == "t5" else AutoModelForCausalLM
    local = Path(cfg.name_or_path).expanduser()
    offline = not cfg.allow_download and not local.is_dir()
    try:
        # adapter_kwargs: transformers' check for a peft adapter ignores local_files_only and would retry
        # the network for ~20 s before failing
        model = auto.from_pretrained(str(local) if local.is_dir() else cfg.name_or_path, dtype=dtype,
                                     attn_implementation=cfg.attention, local_files_only=offline,
                                     adapter_kwargs={"local_files_only": offline})
    except (OSError, ValueError) as err:
        raise RftlabError(missing_message(f"{cfg.arch} model", cfg.name_or_path, err)) from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise RftlabError(f"tokenizer has {len(tokenizer)} tokens but model {cfg.name_or_path!r} only "
                          f"{model.get_input_embeddings().num_embeddings} embeddings: load the model's own tokenizer.")
    _sync_generation_ids(model, tokenizer)
    model.train()
    return model


def _sync_generation_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make generate() pad and stop with the tokenizer's ids (GPT-2 ships without a pad id)."""
    for obj in (model.config, model.generation_config):
        obj.pad_token_id = tokenizer.pad_token_id
        obj.eos_token_id = tokenizer.eos_token_id
    if model.config.is_encoder_decoder and model.generation_config.decoder_start_token_id is None:
        model.generation_config.decoder_start_token_id = model.config.decoder_start_token_id


def response_forward_hidden(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                            response_ids: torch.Tensor, response_mask: torch.Tensor,
                            hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward over prompts and responses; logits of every response token, and optionally hidden states.

    prompt_ids, prompt_mask: (B, P) (causal models: left-padded); response_ids, response_mask: (B, T)
    (right-padded). Returns logits (B, T, V) with logits[:, t] those of p(·|x, y_<t), and the final-layer
    hidden states (B, T, H) at the same positions when ``hidden`` (else None).
    """
    lm = unwrap(model)
    n_response = response_ids.shape[1]
    if is_seq2seq(lm):
        start = lm.config.decoder_start_token_id
        decoder_ids = torch.cat([torch.full_like(response_ids[:, :1], start), response_ids[:, :-1]], dim=1)
        decoder_mask = torch.cat([torch.ones_like(response_mask[:, :1]), response_mask[:, :-1]], dim=1)
        out = lm(input_ids=prompt_ids, attention_mask=prompt_mask, decoder_input_ids=decoder_ids,
                 decoder_attention_mask=decoder_mask, output_hidden_states=hidden, use_cache=False)
        return out.logits, out.decoder_hidden_states[-1] if hidden else None
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    mask = torch.cat([prompt_mask, response_mask], dim=1)
    # left padding: positions count real tokens only, as generate() numbers them
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    # logits_to_keep = T + 1 skips the LM head on the prompt: positions |x|−1 .. |x|+T−1, the last one unused
    out = lm(input_ids=input_ids, attention_mask=mask, position_ids=positions, logits_to_keep=n_response + 1,
             output_hidden_states=hidden, use_cache=False)
    logits = out.logits[:, :-1]
    states = out.hidden_states[-1][:, -n_response - 1:-1] if hidden else None
    return logits, states


class PolicyWithValue(nn.Module):
    """A language model with a scalar value head V(x, y_<t) = w·h_t + b on final hidden states.

    ``critic="separate"`` (RL4LMs' actor-critic policies) reads the hidden states of a separate copy of the
    language model, so value-loss gradients never reach the policy; ``critic="shared"`` (TRL's
    AutoModelForCausalLMWithValueHead) puts the head on the policy's own hidden states, which is cheaper but
    lets the value loss move the policy.

    ``forward`` returns per-response-position logits (B, T, V) and values (B, T); ``generate`` and
    ``config`` pass through to the wrapped model, so samplers take either.
    """

    def __init__(self, model: nn.Module, critic: Literal["separate", "shared"] = "separate") -> None:
        super().__init__()
        self.model = model
        self.critic = copy.deepcopy(model) if critic == "separate" else None
        self.value_head = nn.Linear(model.config.hidden_size, 1)  # default init, as TRL's and RL4LMs' heads
        first = next(model.parameters())
        self.value_head.to(device=first.device, dtype=first.dtype)

    @property
    def config(self):
        return self.model.config

    def generate(self, *args, **kwargs) -> torch.Tensor:
        return self.model.generate(*args, **kwargs)

    def forward(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P), (B, P), (B, T), (B, T) → logits (B, T, V), values (B, T)."""
        batch = (prompt_ids, prompt_mask, response_ids, response_mask)
        logits, states = response_forward_hidden(self.model, *batch, hidden=self.critic is None)
        if self.critic is not None:
            _, states = response_forward_hidden(self.critic, *batch, hidden=True)
        return logits, self.value_head(states).squeeze(-1)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with every parameter frozen: the reference policy π_ref of KL penalties."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.05,
             target_modules: list[str] | None = None) -> nn.Module:
    """Freeze ``model`` and add LoRA adapters W + (α/r)·B·A (peft); only the adapters (and a value head) train.

    ``target_modules=None`` uses peft's defaults per architecture (GPT-2: ``c_attn``; T5: ``q``, ``v``).
    A :class:`PolicyWithValue` gets adapters on its language model (and separate critic) and keeps its value
    head trainable.
    """
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError as err:
        raise RftlabError(f"LoRA needs peft ({err}); install it with `pip install peft`.") from None
    if isinstance(model, PolicyWithValue):
        model.model = add_lora(model.model, r, alpha, dropout, target_modules)
        if model.critic is not None:
            model.critic = add_lora(model.critic, r, alpha, dropout, target_modules)
        return model
    lm = unwrap(model)
    task = TaskType.SEQ_2_SEQ_LM if lm.config.is_encoder_decoder else TaskType.CAUSAL_LM
    # GPT-2 stores its projections as Conv1D (weights transposed), which peft must be told about
    fan_in_fan_out = lm.config.model_type == "gpt2"
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type=task,
                        fan_in_fan_out=fan_in_fan_out)
    return get_peft_model(model, config)
