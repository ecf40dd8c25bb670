"""Settings that follow from one's own data, checked or derived before any evaluation.

A run on converted shards (`dsocr-data convert-csv`, ...) needs a row length that holds its longest sample,
an evaluation budget that holds its longest label and an evaluation mode its samples were trained
in. `profile_data` decodes the first samples of every training source through the loader's own
decoder (`pipeline.data.samples.SampleDecoder`: the same image mode, prompt and tokenization as
training) and tokenizes the held-out references; `derive_settings` then raises `data.seq_len` where
it is too short, fits `eval.max_new_tokens` to the longest label (neither cutting labels nor
generating pages for one-line labels) and sets `eval.mode` to the samples' mode when it is not one
of theirs, printing each change with the override that sets it. Data of which no sample
decodes stops the run here, before the first evaluation, with the skip reasons.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.config import LoaderConfig
from pipeline.data.samples import SampleDecoder
from pipeline.data.shards import SkipCounter, expand_shards, index_shard, read_files
from pipeline.data.stream import SampleRef
from pipeline.tokenizer import OCRTokenizer

PROFILE_SAMPLES = 256  # decoded per source: the longest of these sets the row length
ROW_MULTIPLE = 64  # a derived seq_len is rounded up to this


@dataclass(frozen=True)
class DataProfile:
    samples: int  # training samples decoded
    longest_sequence: int  # tokens of the longest one (image placeholders + prompt + label)
    longest_label: int  # label tokens (EOS included) of the longest held-out reference
    modes: Counter  # image mode -> training samples decoded in it
    skipped: dict[str, int]  # reason -> samples that did not decode


def _refs(config: LoaderConfig, limit: int):
    """SampleRefs of the first `limit` samples of every source, in shard order."""
    skips = SkipCounter()
    for index, source in enumerate(config.sources):
        taken = 0
        for shard in expand_shards(source.shards):
            for entry in index_shard(shard, skips):
                yield SampleRef(index, shard, entry.key, entry.files, 0, Path(shard).name)
                taken += 1
                if taken >= limit:
                    break
            if taken >= limit:
                break


def _mode_hint(ref: SampleRef) -> object:
    """A sample's own `mode` field (the converter's --mode), as the decoder reads it."""
    if "json" not in ref.files:
        return None
    try:
        return json.loads(read_files(ref.shard, {"json": ref.files["json"]})["json"]).get("mode")
    except (ValueError, OSError):
        return None  # the decoder counts the bad sample itself


def profile_data(config: LoaderConfig, tokenizer: OCRTokenizer, references: list[str],
                 limit: int = PROFILE_SAMPLES) -> DataProfile:  # fmt: skip
    """Decode up to `limit` samples per training source (no row limit) and measure the references."""
    skips = SkipCounter()
    decoder = SampleDecoder(dataclasses.replace(config, seq_len=1 << 30), tokenizer, skips)
    samples, longest, modes = 0, 0, Counter()
    for ref in _refs(config, limit):
        example = decoder(ref)
        if example is None:
            continue
        samples += 1
        longest = max(longest, len(example.input_ids))
        if example.images:
            modes[decoder.mode_for(ref, _mode_hint(ref))] += 1
    label = max((len(tokenizer.encode(text)) + 1 for text in references), default=0)  # + EOS
    return DataProfile(samples, longest, label, modes, skips.as_dict())


def eval_budget(longest_label: int) -> int:
    """Generation limit for held-out labels of up to `longest_label` tokens: room for 3x that (an
    output longer than 3x its reference counts as a loop), not the pages-long default."""
    return 3 * longest_label + 8


@dataclass(frozen=True)
class Derived:
    seq_len: int
    max_new_tokens: int
    eval_mode: str
    notes: list[str]


def derive_settings(profile: DataProfile, *, seq_len: int, max_new_tokens: int, eval_mode: str) -> Derived:
    """The settings the data needs; each change is explained in `notes` (naming its override)."""
    if profile.samples == 0:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(profile.skipped.items())) or "no sample found"
        raise ValueError(
            f"no training sample of data.sources decodes ({reasons}); check the shards with "
            "`dsocr-data inspect DIR` before training"
        )
    notes = []
    if profile.longest_sequence > seq_len:
        new = -(-profile.longest_sequence // ROW_MULTIPLE) * ROW_MULTIPLE
        notes.append(f"data.seq_len {seq_len} -> {new}: the longest training sample is "
                     f"{profile.longest_sequence} tokens (set data.seq_len=N to choose; longer samples are skipped)")  # fmt: skip
        seq_len = new
    budget = eval_budget(profile.longest_label)
    if profile.longest_label and not profile.longest_label <= max_new_tokens <= budget:
        notes.append(f"eval.max_new_tokens {max_new_tokens} -> {budget}: the longest held-out label is "
                     f"{profile.longest_label} tokens with EOS (set eval.max_new_tokens=N to choose)")  # fmt: skip
        max_new_tokens = budget
    if profile.modes and eval_mode not in profile.modes:
        main = profile.modes.most_common(1)[0][0]
        seen = ", ".join(f"{m} {n}" for m, n in profile.modes.most_common())
        notes.append(f"eval.mode {eval_mode} -> {main}: the training samples are in {seen} "
                     f"(set the sources' modes, or eval.mode, to choose)")  # fmt: skip
        eval_mode = main
    return Derived(seq_len, max_new_tokens, eval_mode, notes)


def apply_to_run(run: Any, tokenizer: OCRTokenizer, config: LoaderConfig, references: list[str],
                 program: str) -> Derived:  # fmt: skip
    """Profile the data of `run` (a pipeline.config.RunConfig of data.kind=webdataset) and set what
    it needs in place: data.seq_len, eval.max_new_tokens, eval.mode."""
    profile = profile_data(config, tokenizer, references)
    derived = derive_settings(profile, seq_len=run.data.seq_len, max_new_tokens=run.eval.max_new_tokens,
                              eval_mode=run.eval.mode)  # fmt: skip
    run.data.seq_len, run.eval.max_new_tokens = derived.seq_len, derived.max_new_tokens
    run.eval.mode = derived.eval_mode
    modes = ", ".join(f"{m} {n}" for m, n in profile.modes.most_common()) or "text only"
    print(f"[{program}] data: {profile.samples} samples profiled, longest {profile.longest_sequence} tokens, "
          f"longest held-out label {profile.longest_label} tokens, modes {modes}", flush=True)  # fmt: skip
    for note in derived.notes:
        print(f"[{program}] {note}", flush=True)
    return derived
