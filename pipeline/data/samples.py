"""Decoding one shard sample into a tokenized `Example`, with every failure counted.

The JSON member follows data_tools/README.md: {prompt?, answer, source, lang, mode?}
plus one image member `<key>.png|jpg|jpeg|webp` for image samples; text-only samples
are JSON only, with `text` (a plain document: no prompt, loss on all of it) or
`prompt` + `answer` without `<image>`. A sample needs an image exactly when its prompt
(its own, else the source's default) has the `<image>` tag. Steps: JSON bytes
(random access) -> UTF-8 + JSON -> label/prompt -> image bytes -> decode
(`data_tools.images.load_rgb`, pixel limit) -> mode (the sample's hint, the
source's fixed mode, or `select_mode` with a per-sample seeded RNG) -> views
(`process_image`) -> tokens (`pipeline.prompts.build_example`).

The per-sample RNG is seeded by (seed, source, epoch, shard name, key), so a sample's
mode does not depend on which rank or worker reads it, and re-decoding a saved
reference after a resume gives the identical Example.

Skip reasons (keys of `skip_counts`): truncated_sample, missing_json, bad_utf8,
bad_json, empty_label, bad_prompt, missing_image, too_many_pixels, bad_image,
too_long, bad_sample (any other ValueError from prompt building).
"""

from __future__ import annotations

import json
import os
import random

from data_tools.images import load_rgb
from pipeline.batch import Example
from pipeline.data.config import LoaderConfig
from pipeline.data.shards import ShardReadError, SkipCounter, read_files
from pipeline.data.stream import SampleRef, stable_seed
from pipeline.processing import MODES, process_image, select_mode
from pipeline.prompts import build_example
from pipeline.tokenizer import IMAGE_TOKEN, OCRTokenizer

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


class BadSample(Exception):
    """A sample to skip, with the reason it is counted under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class SampleDecoder:
    """`decoder(ref) -> Example | None`: None means skipped (counted and logged)."""

    def __init__(self, config: LoaderConfig, tokenizer: OCRTokenizer, skips: SkipCounter) -> None:
        self.config, self.tokenizer, self.skips = config, tokenizer, skips

    def __call__(self, ref: SampleRef) -> Example | None:
        try:
            return self.decode(ref)
        except BadSample as bad:
            self.skips.skip(bad.reason, ref.shard, ref.key, bad.detail)
            return None

    def mode_for(self, ref: SampleRef, hint: object = None) -> str:
        """The image mode of one sample: its valid JSON hint, the fixed mode, or a seeded draw."""
        spec = self.config.sources[ref.source]
        if isinstance(hint, str) and hint.lower() in MODES:
            return hint.lower()
        if isinstance(spec.modes, str):
            return spec.modes
        seed = stable_seed(self.config.seed, spec.name, ref.epoch, os.path.basename(ref.shard), ref.key)
        return select_mode(random.Random(seed), spec.modes)

    def decode(self, ref: SampleRef) -> Example:
        """Decode or raise BadSample."""
        spec = self.config.sources[ref.source]
        end = max(offset + size for offset, size in ref.files.values())
        if end > (available := os.path.getsize(ref.shard)):
            raise BadSample("truncated_sample", f"members end at byte {end}, the shard has {available}")
        if "json" not in ref.files:
            raise BadSample("missing_json", f"members {sorted(ref.files)}")
        meta = _parse_json(self._read(ref, "json"))
        if "text" in meta:  # plain-text document: all of it is the target
            label, field, prompt = meta["text"], "text", spec.prompt if spec.kind == "text" else ""
        else:
            label, field, prompt = meta.get("answer"), "answer", meta.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                prompt = spec.prompt
        if not isinstance(label, str) or not label.strip():
            raise BadSample("empty_label", f"{field} = {label!r}")
        for text in (label, prompt):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:  # lone surrogates from JSON escapes such as "\\ud800"
                raise BadSample("bad_utf8", str(err)) from None
        tags = prompt.count(IMAGE_TOKEN)
        if tags > 1:
            raise BadSample("bad_prompt", f"{tags} {IMAGE_TOKEN} tags; a sample has at most one image")

        images = []
        if tags:
            image_ext = next((ext for ext in IMAGE_EXTS if ext in ref.files), None)
            if image_ext is None:
                raise BadSample("missing_image", f"prompt {prompt!r} but members {sorted(ref.files)}")
            name = f"{ref.shard}:{ref.key}.{image_ext}"
            try:
                image = load_rgb(self._read(ref, image_ext), max_pixels=self.config.max_pixels, source=name)
            except ValueError as err:
                reason = "too_many_pixels" if "max_pixels" in str(err) else "bad_image"
                raise BadSample(reason, str(err)) from None
            mode = self.mode_for(ref, meta.get("mode"))
            cfg = self.config
            images.append(
                process_image(image, mode, min_tiles=cfg.min_tiles, max_tiles=cfg.max_tiles, source=name)
            )
        try:
            example = build_example(
                self.tokenizer, prompt, label, images, max_length=None, source=spec.name, key=sample_id(ref)
            )
        except ValueError as err:
            raise BadSample("bad_sample", str(err)) from None
        if len(example) > self.config.seq_len:
            raise BadSample("too_long", f"{len(example)} tokens > seq_len={self.config.seq_len}")
        return example

    @staticmethod
    def _read(ref: SampleRef, ext: str) -> bytes:
        try:
            return read_files(ref.shard, {ext: ref.files[ext]})[ext]
        except ShardReadError as err:
            raise BadSample("truncated_sample", str(err)) from None


def sample_id(ref: SampleRef) -> str:
    """`<shard file name>/<key>`: unique within a source (keys repeat across shards)."""
    return f"{os.path.basename(ref.shard)}/{ref.key}"


def _parse_json(data: bytes) -> dict:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadSample("bad_utf8", str(err)) from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadSample("bad_json", str(err)) from None
    if not isinstance(meta, dict):
        raise BadSample("bad_json", f"expected an object, got {type(meta).__name__}")
    return meta
