"""Prompt set and the "plain" conversation template of DeepSeek-OCR.

Implements ../shared/spec/architecture.md section 4 (after the release's
`tokenize_with_images`): [BOS] + text before `<image>` + N placeholders (N from the
image's mode and tile grid) + text after, encoded without special tokens and without role
strings. For training the answer and EOS follow; the loss is taken on the answer and EOS
only (labels -100 on BOS, placeholders and prompt). The training template is unpublished
(*unverified*), so the prompt per dataset is configurable (`PROMPTS` or any string).

The prompt is stripped of surrounding whitespace first, as the release's `format_messages` does
(`message["content"].strip()`, then the whole formatted prompt `.strip()`): its example prompt
`"<image>\n<|grounding|>Convert the document to markdown. "` ends in a space that the release
never encodes. The answer is not stripped here (the converters strip labels).

Labels are aligned with input_ids (labels[i] == input_ids[i] or -100); the model shifts
them by one when it computes the next-token loss.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.batch import Example, ImageViews
from pipeline.tokenizer import IMAGE_TOKEN, OCRTokenizer

IGNORE_INDEX = -100

PROMPTS: dict[str, str] = {
    "free_ocr": "<image>\nFree OCR.",
    "grounding_markdown": "<image>\n<|grounding|>Convert the document to markdown.",
    "grounding_ocr": "<image>\n<|grounding|>OCR this image.",
    "parse_figure": "<image>\nParse the figure.",
    "describe": "<image>\nDescribe this image in detail.",
    "locate": "<image>\nLocate <|ref|>{ref}<|/ref|> in the image.",
    "text_only": "",  # pure language-model data (no image): BOS + text + EOS, loss on the text
}


def get_prompt(name_or_text: str, **fields: str) -> str:
    """A prompt by name from PROMPTS (formatted with `fields`, e.g. ref=...) or a literal prompt."""
    template = PROMPTS.get(name_or_text, name_or_text)
    if fields:
        return template.format(**fields)
    if "{ref}" in template:
        raise ValueError(f"prompt {name_or_text!r} needs a ref= field (the object to locate)")
    return template


def _sample_name(source: str, key: str) -> str:
    return f"sample {source or '?'}/{key or '?'}"


def encode_prompt(
    tokenizer: OCRTokenizer,
    prompt: str,
    images: Sequence[ImageViews],
    *,
    source: str = "",
    key: str = "",
) -> list[int]:
    """BOS + the stripped prompt with each `<image>` replaced by that image's placeholder run."""
    pieces = prompt.strip().split(IMAGE_TOKEN)
    if len(pieces) - 1 != len(images):
        raise ValueError(
            f"{_sample_name(source, key)}: prompt has {len(pieces) - 1} {IMAGE_TOKEN} tag(s) "
            f"but {len(images)} image(s) were given"
        )
    ids = [tokenizer.bos_id]
    for i, piece in enumerate(pieces):
        if piece:
            ids += tokenizer.encode(piece)
        if i < len(images):
            count = images[i].num_placeholders
            if count <= 0:
                raise ValueError(f"{_sample_name(source, key)}: image {i} has num_placeholders={count}")
            ids += [tokenizer.image_id] * count
    return ids


def build_example(
    tokenizer: OCRTokenizer,
    prompt: str,
    answer: str | None,
    images: list[ImageViews],
    *,
    max_length: int | None = None,
    source: str = "",
    key: str = "",
) -> Example:
    """Tokenize one sample with the plain template; answer=None builds an inference prompt."""
    prompt_ids = encode_prompt(tokenizer, prompt, images, source=source, key=key)
    answer_ids: list[int] = []
    if answer is not None:
        answer_ids = tokenizer.encode(answer) + [tokenizer.eos_id]
        if tokenizer.image_id in answer_ids:
            raise ValueError(f"{_sample_name(source, key)}: the answer contains {IMAGE_TOKEN}")
    input_ids = prompt_ids + answer_ids
    if max_length is not None and len(input_ids) > max_length:
        raise ValueError(
            f"{_sample_name(source, key)}: {len(input_ids)} tokens ({len(prompt_ids)} prompt incl. "
            f"{sum(v.num_placeholders for v in images)} image placeholders, {len(answer_ids)} answer) "
            f"exceed max_length={max_length}"
        )
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    return Example(input_ids=input_ids, labels=labels, images=list(images), source=source, key=key)
