"""Offline tokenizers: byte-level BPE or characters trained on local text, and Hugging Face tokenizers by name.

Every tokenizer is a ``transformers`` fast tokenizer (``PreTrainedTokenizerFast``), so ``save_pretrained`` and
``AutoTokenizer.from_pretrained`` round-trip it and the models, samplers and trainers treat a tokenizer trained
here exactly like GPT-2's or T5's. The trained ones share two special tokens:

    <pad>  id 0   padding (and T5's decoder start token)
    <eos>  id 1   end of sequence; also the beginning-of-sequence token

Nothing is added around the encoded text (no BOS/EOS post-processing): the data code appends ``<eos>`` to
targets where a sequence must end, as GRUE's tasks do.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from rftlab.errors import RftlabError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def _wrap(tokenizer, padding_side: Literal["left", "right"], **special: str) -> PreTrainedTokenizerFast:
    """A ``tokenizers.Tokenizer`` as a transformers fast tokenizer with <pad>/<eos> (eos doubling as bos)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, bos_token=EOS,
                                   padding_side=padding_side, **special)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1000, *,
                        padding_side: Literal["left", "right"] = "right") -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2's scheme) trained on ``texts``: no unknown tokens, any string round-trips.

    The 256 byte symbols are always in the vocabulary, so ``vocab_size`` must exceed 258 (bytes + 2 special
    tokens); merges fill the rest, fewer if the text runs out of pairs. Spaces are kept as part of the
    following word (``Ġword``), exactly as in GPT-2, so decode(encode(s)) == s.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size <= 258:
        raise RftlabError(f"BPE vocab_size must exceed 258 (256 bytes + <pad> + <eos>), got {vocab_size}.")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return _wrap(tokenizer, padding_side)


def char_tokenizer(texts: Iterable[str], *,
                   padding_side: Literal["left", "right"] = "right") -> PreTrainedTokenizerFast:
    """One token per character seen in ``texts`` (sorted, after <pad>, <eos>, <unk>); unseen characters → <unk>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = sorted(set().union(*map(set, texts)))
    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK, *chars])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # split into single characters ([\s\S] also matches newlines); Fuse joins them back without spaces
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return _wrap(tokenizer, padding_side, unk_token=UNK)


def word_tokenizer(texts: Iterable[str], *,
                   padding_side: Literal["left", "right"] = "right") -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word seen in ``texts`` (sorted, after <pad>, <eos>, <unk>).

    For template languages with a closed vocabulary (the sentiment task): every word, label and punctuation
    mark is exactly one token, so "response = label + k shared tokens" holds token for token. Unseen words
    map to <unk>; decoding joins tokens with single spaces.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = sorted(set().union(*(text.split() for text in texts)))
    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK, *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with spaces
    return _wrap(tokenizer, padding_side, unk_token=UNK)


def load_tokenizer(name_or_path: str, *, padding_side: Literal["left", "right"] | None = None,
                   allow_download: bool = False) -> PreTrainedTokenizerBase:
    """A Hugging Face tokenizer from a local folder, or by hub name from the local cache only.

    Tokenizers without a pad token (GPT-2) get their EOS token as pad, as the GPT-2 recipes do; the
    response masks of :mod:`rftlab.rl.sampling` end at the first EOS, so pad = eos is unambiguous.
    ``allow_download=False`` (the default) never touches the network, so a missing model fails at once
    with one line saying what to fetch instead of hanging on a connection.
    """
    from transformers import AutoTokenizer

    local = Path(name_or_path).expanduser()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local) if local.is_dir() else name_or_path,
                                                  local_files_only=not allow_download and not local.is_dir())
    except (OSError, ValueError) as err:
        raise RftlabError(missing_message("tokenizer", name_or_path, err)) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    return tokenizer


def missing_message(what: str, name_or_path: str, err: Exception) -> str:
    """One line saying why ``name_or_path`` could not be loaded offline and how to make it available."""
    path = Path(name_or_path).expanduser()
    detail = " ".join(str(err).split())[:200]
    if path.is_dir():
        return f"cannot load {what} from folder {name_or_path!r}: {detail}"
    # hub names are "name" or "org/name"; anything else is a path the user meant to exist
    if name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1 or path.exists():
        return (f"cannot load {what} from {name_or_path!r}: no such folder; save one there with "
                "save_pretrained() or pass a Hugging Face hub name such as gpt2 or t5-base.")
    from huggingface_hub.constants import HF_HUB_CACHE

    return (f"cannot load {what} {name_or_path!r} offline (not in the Hugging Face cache {HF_HUB_CACHE}); on a "
            f"machine with network run `hf download {name_or_path}` and copy that cache folder here, or pass a "
            "local folder saved with save_pretrained().")
