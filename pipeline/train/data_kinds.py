"""The data kinds a job trains on (`data.kind`), each one data source behind the same interface,
so the job (pipeline/train/job.py) never branches on which one it has:

- `synth_lines`: the embedded default, reading lines (and optional paragraph / Persian sets)
  rendered into the run directory (pipeline/train/synth_lines.py);
- `real_lines`: synthetic scans, then PAGE-XML / ALTO line ground truth mixed in
  (pipeline/train/real_lines.py);
- `webdataset`: the user's shards (`data.sources`, `data.val_shards`); row length, evaluation
  budget and mode follow from the shards' manifests (pipeline/data/profile.py).

A fine-tune (pipeline/finetune/job.py) takes its base and data from the kind too
(`finetune_data`, pipeline/finetune/data.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import DATA_KINDS, DataConfig, EvalConfig, RunConfig
from pipeline.data.config import LoaderConfig, SourceSpec, from_run_config
from pipeline.data.shards import expand_shards
from pipeline.eval.runner import EvalRunConfig

if TYPE_CHECKING:
    from pipeline.finetune.data import FinetuneData


@dataclass(frozen=True)
class KindData:
    """What a kind's `prepare` leaves: train shards per set (None: `data.sources` as configured),
    held-out shards per set (the first one drives evaluation during training), and the
    characters its texts can contain beyond the demo alphabet (for `data.tokenizer=char`)."""

    train: dict[str, str] | None
    val: dict[str, str]
    alphabet: str = ""


class DataKind:
    """The defaults of a kind; each kind overrides what it does differently. Its methods read the
    `data` section (and `eval` where the kind's mode follows it); only `finetune_data`, which
    may train a base model first, sees the whole run."""

    renders = False  # writes its shards into the run directory (one rank renders, the others wait)
    derives_from_data = False  # row length, evaluation budget and mode follow from the shards' manifests
    finetunes_data_parallel = False  # a fine-tune of it runs on several ranks (pipeline.finetune.distributed)

    def prepare(self, data: DataConfig, data_dir: Path, render: bool) -> KindData:
        raise NotImplementedError

    def sources(
        self, data: DataConfig, ev: EvalConfig, train: dict[str, str] | None
    ) -> list[SourceSpec] | None:
        """The loader's sources; None: `data.sources` through `from_run_config`."""
        raise NotImplementedError

    def eval_mode(self, data: DataConfig, ev: EvalConfig) -> str:
        return ev.mode

    def set_eval(self, data: DataConfig, name: str, cfg: EvalRunConfig) -> EvalRunConfig:
        """The evaluation settings of held-out set `name` (beyond the first)."""
        return cfg

    def check_paths(self, data: DataConfig) -> None:
        """ValueError naming the field of a configured path that is missing (before any build)."""

    def finetune_data(self, run: RunConfig, out: Path) -> tuple[Path, FinetuneData]:
        """The base checkpoint a fine-tune starts from and its target / replay / held-out data."""
        raise ValueError(
            f"data.kind must be 'synth_lines' or 'webdataset' for a fine-tune, got {run.data.kind!r}"
        )


class SynthLines(DataKind):
    renders = True

    def prepare(self, data: DataConfig, data_dir: Path, render: bool) -> KindData:
        from pipeline.train.synth_lines import lang_alphabet, prepare_synth_sets, synth_sets

        patterns = prepare_synth_sets(data, data_dir, render)
        extra = "".join(lang_alphabet(s.train.lang) for s in synth_sets(data) if s.train.lang != "en")
        return KindData({n: train for n, (train, _) in patterns.items()},
                        {n: val for n, (_, val) in patterns.items()}, extra)  # fmt: skip

    def sources(self, data: DataConfig, ev: EvalConfig, train: dict[str, str] | None) -> list[SourceSpec]:
        from pipeline.train.synth_lines import synth_sources

        return synth_sources(data, train or {})

    def eval_mode(self, data: DataConfig, ev: EvalConfig) -> str:
        return data.synth.mode

    def set_eval(self, data: DataConfig, name: str, cfg: EvalRunConfig) -> EvalRunConfig:
        """The set's own mode and a generation budget that fits its longest reference."""
        from pipeline.train.synth_lines import synth_sets

        synth = next(s for s in synth_sets(data) if s.name == name)
        return replace(cfg, mode=synth.mode, max_new_tokens=max(cfg.max_new_tokens, synth.max_new_tokens))

    def finetune_data(self, run: RunConfig, out: Path) -> tuple[Path, FinetuneData]:
        """Reading lines of a new script over a Latin base (trained first without model.init_from)."""
        from pipeline.finetune.data import demo_finetune_data

        return demo_finetune_data(run, out)


class RealLines(DataKind):
    """Its synthetic held-out lines share the real ones' evaluation settings (the default)."""

    renders = True

    def prepare(self, data: DataConfig, data_dir: Path, render: bool) -> KindData:
        from pipeline.train.real_lines import prepare_real_lines

        real = prepare_real_lines(data, data_dir, render)
        return KindData(real.train, real.val, real.alphabet)

    def sources(self, data: DataConfig, ev: EvalConfig, train: dict[str, str] | None) -> list[SourceSpec]:
        from pipeline.train.real_lines import real_sources

        return real_sources(data, train or {}, ev.mode)

    def check_paths(self, data: DataConfig) -> None:
        from pipeline.train.real_lines import check_real_config

        check_real_config(data)


class Webdataset(DataKind):
    derives_from_data = True
    finetunes_data_parallel = True

    def prepare(self, data: DataConfig, data_dir: Path, render: bool) -> KindData:
        return KindData(None, {"val": data.val_shards} if data.val_shards else {})

    def sources(self, data: DataConfig, ev: EvalConfig, train: dict[str, str] | None) -> None:
        return None

    def check_paths(self, data: DataConfig) -> None:
        patterns = [(f"data.sources[{i}].shards", s.shards) for i, s in enumerate(data.sources)]
        if data.val_shards:
            patterns.append(("data.val_shards", data.val_shards))
        for field_name, pattern in patterns:
            try:
                expand_shards(pattern)
            except ValueError as err:
                raise ValueError(f"{field_name}={pattern!r}: {err}; fix the path or the pattern") from err
        from_run_config(data, batch_size=1, seed=0)  # the sources' prompts and modes

    def finetune_data(self, run: RunConfig, out: Path) -> tuple[Path, FinetuneData]:
        from pipeline.finetune.data import webdataset_finetune_data

        return webdataset_finetune_data(run)


KINDS: dict[str, DataKind] = {
    "synth_lines": SynthLines(),
    "real_lines": RealLines(),
    "webdataset": Webdataset(),
}
assert set(KINDS) == set(DATA_KINDS), "pipeline.config.DATA_KINDS and the kinds here must agree"


def data_kind(data: DataConfig) -> DataKind:
    kind = KINDS.get(data.kind)
    if kind is None:
        raise ValueError(f"data.kind must be one of {', '.join(KINDS)}, got {data.kind!r}")
    return kind


def loader_config(
    data: DataConfig, ev: EvalConfig, train: dict[str, str] | None, *, batch_size: int, seed: int
) -> LoaderConfig:
    """The job's StreamingLoader settings over the kind's sources (`batch_size` is
    parallel.micro_batch, `seed` train.seed)."""
    sources = data_kind(data).sources(data, ev, train)
    if sources is None:
        return from_run_config(data, batch_size=batch_size, seed=seed)
    return LoaderConfig(sources=sources, seq_len=data.seq_len, batch_size=batch_size, packing=data.pack,
                        seed=seed, num_workers=data.num_workers)  # fmt: skip


__all__ = ["KINDS", "DataKind", "KindData", "data_kind", "loader_config"]
