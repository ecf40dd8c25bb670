"""Greedy decoding for DeepSeek-OCR with the decoder's KV cache and the windowed no-repeat n-gram rule.

Implements ../shared/spec/architecture.md section 5: temperature 0, stop at EOS or after
max_new_tokens, and the release's `NoRepeatNGramLogitsProcessor` over the *generated* ids:
with the last n-1 generated tokens as prefix, every n-gram starting in
[max(0, L - window), L - n] whose first n-1 tokens equal the prefix bans its last token,
except whitelisted ids (`<td>`, `</td>`). Release settings: n=30, window=90 (README),
40/90 (benchmark script), 20/50 (PDF script). Batches are left-padded: prompts of different
lengths (and different image modes) decode together.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from decoder import KVCache
from pipeline.batch import Example, ImageViews
from pipeline.data.packing import IGNORE_INDEX, collate_unpacked
from pipeline.model import DeepSeekOCR
from pipeline.prompts import encode_prompt
from pipeline.tokenizer import TD_END, TD_START, OCRTokenizer


@dataclass
class GenerationResult:
    """text: decoded answer (specials dropped); token_ids: generated ids without the final EOS;
    hit_eos: False when the row stopped at max_new_tokens or the context limit (a possible loop)."""

    text: str
    token_ids: list[int]
    hit_eos: bool


def banned_ngram_tokens(
    generated: Sequence[int], ngram_size: int, window: int, whitelist: Iterable[int] = ()
) -> set[int]:
    """Next tokens the windowed no-repeat rule forbids after `generated` (see module docstring)."""
    if ngram_size < 1 or window < 1:
        raise ValueError(f"ngram_size and window must be >= 1, got {ngram_size}, {window}")
    length = len(generated)
    if length < ngram_size:
        return set()
    prefix = list(generated[length - ngram_size + 1 :]) if ngram_size > 1 else []
    banned = set()
    for start in range(max(0, length - window), length - ngram_size + 1):
        if list(generated[start : start + ngram_size - 1]) == prefix:
            banned.add(int(generated[start + ngram_size - 1]))
    return banned - set(whitelist)


def default_whitelist(tokenizer: OCRTokenizer) -> tuple[int, ...]:
    """The release's whitelist: the ids of `<td>` and `</td>` (those the vocabulary has)."""
    return tuple(tokenizer.special_tokens[t] for t in (TD_START, TD_END) if t in tokenizer.special_tokens)


@torch.no_grad()
def generate(
    model: DeepSeekOCR,
    tokenizer: OCRTokenizer,
    images: list[list[ImageViews]],
    prompts: list[str],
    *,
    max_new_tokens: int = 8192,
    no_repeat_ngram_size: int | None = 30,
    no_repeat_window: int = 90,
    whitelist_ids: Iterable[int] | None = None,
) -> list[GenerationResult]:
    """Greedy answers for a batch of (images, prompt) pairs; no_repeat_ngram_size None/0 disables the rule.

    Each row stops at EOS, after max_new_tokens, or when prompt + answer reach the decoder's
    max_position_embeddings.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    whitelist = set(default_whitelist(tokenizer) if whitelist_ids is None else whitelist_ids)
    limit = model.decoder.config.max_position_embeddings
    prompt_ids = [
        encode_prompt(tokenizer, p, imgs, source="generate", key=str(i))
        for i, (p, imgs) in enumerate(zip(prompts, images))
    ]
    for i, ids in enumerate(prompt_ids):
        if len(ids) >= limit:
            raise ValueError(f"prompt {i}: {len(ids)} tokens leave no room in the context of {limit}")
    examples = [Example(ids, [IGNORE_INDEX] * len(ids), list(imgs)) for ids, imgs in zip(prompt_ids, images)]
    inputs = collate_unpacked(examples, tokenizer.pad_id, model.image_token_id, pad_side="left")
    batch, longest = inputs.input_ids.shape
    device = next(model.parameters()).device
    attention_mask = (inputs.doc_ids >= 0).long().to(device)

    was_training = model.training
    model.eval()
    embeds = model.embed(inputs.to(device))
    steps = min(max_new_tokens, limit - min(len(ids) for ids in prompt_ids))
    cache = KVCache(model.decoder.config, batch, longest + steps, device=device, dtype=embeds.dtype)
    logits = model.decoder(
        inputs_embeds=embeds, attention_mask=attention_mask, cache=cache, logits_to_keep=1
    ).logits

    generated: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    hit_eos = [False] * batch
    for step_idx in range(steps):
        scores = logits[:, -1].float()  # (B, V)
        if no_repeat_ngram_size:
            for b in range(batch):
                banned = banned_ngram_tokens(generated[b], no_repeat_ngram_size, no_repeat_window, whitelist)
                if banned and not done[b]:
                    scores[b, sorted(banned)] = float("-inf")
        next_ids = scores.argmax(dim=-1).tolist()
        step_mask = torch.zeros((batch, 1), dtype=torch.long)
        for b in range(batch):
            if done[b]:
                next_ids[b] = tokenizer.pad_id
                continue
            step_mask[b, 0] = 1
            if next_ids[b] == tokenizer.eos_id:
                done[b] = hit_eos[b] = True
                continue
            generated[b].append(next_ids[b])
            if len(prompt_ids[b]) + len(generated[b]) >= limit:
                done[b] = True
        if all(done) or step_idx == steps - 1:
            break
        step = torch.tensor(next_ids, dtype=torch.long, device=device).unsqueeze(1)  # (B, 1)
        logits = model.decoder(
            input_ids=step, attention_mask=step_mask.to(device), cache=cache, logits_to_keep=1
        ).logits
    model.train(was_training)
    return [GenerationResult(tokenizer.decode(g), g, e) for g, e in zip(generated, hit_eos)]
