"""The language-model config, kept free of heavy imports so experiment modules can use it at top level."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class LMConfig:
    arch: Literal["gpt2", "t5"] = "gpt2"  # causal decoder (GPT-2) or encoder-decoder (T5)
    name_or_path: str = ""  # hub name or local folder to load; "" = build a fresh model from the sizes below
    n_layer: int = 2  # transformer blocks (T5: encoder blocks); 2×64 for tests, up to 6×384 on CPU
    n_embd: int = 64  # hidden width d_model
    n_head: int = 4  # attention heads (must divide n_embd)
    n_positions: int = 256  # GPT-2 learned positions = longest prompt + response (T5 is relative: unused)
    d_ff: int = 0  # feed-forward width; 0 = 4·n_embd
    n_decoder_layer: int = 0  # T5 decoder blocks; 0 = n_layer
    dropout: float = 0.0  # dropout on residuals, embeddings and attention (0 keeps log-probs deterministic)
    attention: Literal["sdpa", "eager"] = "sdpa"  # attention kernel; eager where torch.func.vmap meets padding
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # parameter dtype (bfloat16 on GPU at scale)
    lora_r: int = 0  # LoRA rank for finetuning (peft; 0 = finetune every weight)
    lora_alpha: float = 16.0  # LoRA scale α (the update is (α/r)·B·A)
    allow_download: bool = False  # let name_or_path fetch from the hub (off: fail at once with what to fetch)
