"""Validation and presets of the data-path configuration (pipeline/data/config.py)."""

import pytest

from pipeline.config import DataConfig, SourceConfig
from pipeline.data.config import LoaderConfig, SourceSpec, from_run_config, paper_mixture
from pipeline.prompts import PROMPTS

pytestmark = pytest.mark.unit


def test_paper_mixture_is_70_20_10_over_all_modes():
    config = paper_mixture("ocr-{0..3}.tar", "vis.tar", ["text-a.tar", "text-b.tar"])
    assert config.mixture == pytest.approx({"ocr": 0.7, "vision": 0.2, "text": 0.1})
    assert config.seq_len == 8192
    assert set(config.sources[0].modes) == {"tiny", "small", "base", "large", "gundam"}
    assert config.sources[0].prompt == PROMPTS["free_ocr"]  # names resolve to prompts
    assert config.sources[2].kind == "text" and config.sources[2].prompt == ""
    assert config.sources[2].shards == ["text-a.tar", "text-b.tar"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight": 0.0}, "weight"),
        ({"weight": float("nan")}, "weight"),
        ({"kind": "audio"}, "kind"),
        ({"modes": "huge"}, "unknown mode"),
        ({"modes": {"base": -1.0}}, "finite and >= 0"),
        ({"modes": {"base": 0.0}}, "sum to 0"),
        ({"modes": {}}, "empty"),
        ({"prompt": "Free OCR."}, "exactly one <image>"),
        ({"kind": "text", "prompt": "<image>\nFree OCR."}, "cannot contain"),
        ({"shards": []}, "shards"),
        ({"name": ""}, "name"),
    ],
)
def test_source_spec_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SourceSpec(**{"name": "s", "shards": "a.tar", **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq_len": 0}, "seq_len"),
        ({"batch_size": 0}, "batch_size"),
        ({"split": "rows"}, "split"),
        ({"pad_side": "left"}, "packing=False"),
        ({"num_workers": -1}, "num_workers"),
        ({"min_tiles": 3, "max_tiles": 2}, "min_tiles"),
        ({"sources": []}, "at least one source"),
    ],
)
def test_loader_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoaderConfig(**{"sources": [SourceSpec("s", "a.tar")], **kwargs})


def test_duplicate_source_names_are_rejected():
    with pytest.raises(ValueError, match="unique"):
        LoaderConfig([SourceSpec("s", "a.tar"), SourceSpec("s", "b.tar")])


def test_from_run_config_maps_the_hydra_schema():
    data = DataConfig(
        kind="webdataset",
        sources=[
            SourceConfig(name="ocr", shards="x-{0..1}.tar", weight=2.0, modes={"gundam": 1.0}),
            SourceConfig(name="late", shards="y.tar", start_after=500),
        ],
        seq_len=4096,
        pack=True,
        num_workers=3,
        max_pixels=1000,
        max_tiles=6,
    )
    config = from_run_config(data, batch_size=4, seed=9)
    assert (config.seq_len, config.batch_size, config.seed, config.num_workers) == (4096, 4, 9, 3)
    assert (config.max_pixels, config.max_tiles, config.packing) == (1000, 6, True)
    assert config.sources[0].modes == {"gundam": 1.0} and config.sources[0].shards == ["x-{0..1}.tar"]
    assert [s.start_after for s in config.sources] == [0, 500]


@pytest.mark.config
def test_source_modes_replace_the_default_instead_of_merging_into_it():
    """OmegaConf merges a dict default with the user's dict: a {base: 1} default made
    `modes: {debug: 1}` draw Base pages half the time."""
    from omegaconf import OmegaConf

    from pipeline.config import to_run_config
    from pipeline.data.config import from_run_config

    run = to_run_config(OmegaConf.create({"data": {"kind": "webdataset", "sources": [
        {"name": "a", "shards": "a.tar", "modes": {"debug": 1.0}}, {"name": "b", "shards": "b.tar"}]},
        "finetune": {"replay": {"modes": {"tiny": 1.0}}}}))  # fmt: skip
    sources = from_run_config(run.data, batch_size=1, seed=0).sources
    assert [s.modes for s in sources] == [{"debug": 1.0}, {"base": 1.0}]
    assert dict(run.finetune.replay.modes) == {"tiny": 1.0}
