"""Vocabulary coverage of fine-tuning data, and extension of character-level vocabularies.

The release's tokenizer is a byte-level BPE: every script encodes, nothing to do. The tiny
CPU models use a character vocabulary (`pipeline.tokenizer.build_char_tokenizer`) built from
the base model's training text, so a new script's letters would all become `<unk>`. Training
on such targets teaches the model to emit `<unk>`; this module finds those characters and,
for character vocabularies, appends them: existing ids keep their meaning, the new ids get
fresh embedding and lm_head rows (initialised at the mean of the existing rows) that the
fine-tune trains. Any other tokenizer producing `<unk>` is an error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from pipeline.model import DeepSeekOCR
from pipeline.tokenizer import SPECIAL_TOKENS, UNK_TOKEN, OCRTokenizer, build_char_tokenizer


def is_char_tokenizer(tokenizer: OCRTokenizer) -> bool:
    """A WordLevel vocabulary of single characters after the special tokens (build_char_tokenizer)."""
    model = tokenizer.tokenizer.model
    return type(model).__name__ == "WordLevel" and tokenizer.tokenizer.token_to_id(UNK_TOKEN) is not None


def uncovered_chars(tokenizer: OCRTokenizer, texts: Iterable[str]) -> list[str]:
    """Characters of `texts` that the tokenizer maps to `<unk>` (sorted)."""
    unk = tokenizer.tokenizer.token_to_id(UNK_TOKEN)
    if unk is None:
        return []
    chars = sorted(set("".join(texts)))
    return [c for c in chars if unk in tokenizer.encode(c)]


def extend_char_tokenizer(tokenizer: OCRTokenizer, chars: Iterable[str]) -> OCRTokenizer:
    """The same vocabulary with `chars` appended (every existing token keeps its id)."""
    if not is_char_tokenizer(tokenizer):
        raise ValueError("only character-level (WordLevel) vocabularies can be extended")
    vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
    base = len(SPECIAL_TOKENS) + 1  # specials, then <unk>
    alphabet = [tok for tok, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i >= base]
    extended = build_char_tokenizer([*alphabet, *chars])
    new_vocab = extended.tokenizer.get_vocab(with_added_tokens=True)
    moved = [t for t, i in vocab.items() if new_vocab.get(t) != i]
    if moved:
        raise ValueError(f"tokenizer layout not understood: extending would move ids of {moved[:5]}")
    return extended


@torch.no_grad()
def resize_vocab(model: DeepSeekOCR, vocab_size: int) -> None:
    """Grow embed_tokens and lm_head to `vocab_size` rows; new rows = mean of the old ones."""
    dec = model.decoder
    old = dec.config.vocab_size
    if vocab_size <= old:
        return
    weight = dec.embed_tokens.weight
    embed = nn.Embedding(vocab_size, weight.shape[1], device=weight.device, dtype=weight.dtype)
    embed.weight[:old] = weight
    embed.weight[old:] = weight.mean(dim=0)
    head_w = dec.lm_head.weight
    head = nn.Linear(head_w.shape[1], vocab_size, bias=False, device=head_w.device, dtype=head_w.dtype)
    head.weight[:old] = head_w
    head.weight[old:] = head_w.mean(dim=0)
    dec.embed_tokens, dec.lm_head = embed, head
    dec.config = dataclasses.replace(dec.config, vocab_size=vocab_size)


def cover_texts(
    model: DeepSeekOCR, tokenizer: OCRTokenizer, texts: Iterable[str], *, extend: bool
) -> tuple[OCRTokenizer, list[str]]:
    """Make `tokenizer` (and `model`) cover `texts`; returns (tokenizer, characters added)."""
    texts = list(texts)
    missing = uncovered_chars(tokenizer, texts)
    if not missing:
        return tokenizer, []
    shown = "".join(missing[:40])
    if not is_char_tokenizer(tokenizer):
        raise ValueError(
            f"the tokenizer maps {len(missing)} characters of the fine-tuning data to <unk>: {shown!r}"
        )
    if not extend:
        raise ValueError(
            f"the character vocabulary lacks {len(missing)} characters of the fine-tuning data ({shown!r}); "
            "set finetune.extend_vocab=true to add them"
        )
    extended = extend_char_tokenizer(tokenizer, missing)
    if extended.vocab_size > model.decoder.config.vocab_size:
        resize_vocab(model, extended.vocab_size)
    return extended, missing
