"""Deterministic order, dp-rank/worker split, resume and mixture draws (pipeline/data/stream.py)."""

import math
from collections import Counter

import pytest

from pipeline.batch import Example
from pipeline.data.config import LoaderConfig, SourceSpec
from pipeline.data.shards import SkipCounter
from pipeline.data.stream import MixtureStream, SourceStream, shard_names
from pipeline.data.testing import sample_members, write_tar

pytestmark = pytest.mark.unit


def make_shards(directory, name, sizes):
    """Shards of json-only members; returns the paths and all (shard, key) ids."""
    paths, ids = [], []
    for s, size in enumerate(sizes):
        members = []
        for i in range(size):
            members += sample_members(f"{name}{s}_{i}", "x")
            ids.append((f"{directory}/{name}-{s}.tar", f"{name}{s}_{i}"))
        paths.append(str(write_tar(f"{directory}/{name}-{s}.tar", members)))
    return paths, ids


def stream(paths, consumer=0, consumers=1, *, seed=0, shuffle=True, infinite=False, split="auto"):
    return SourceStream(
        0,
        "src",
        *shard_names(paths),
        seed=seed,
        consumer=consumer,
        num_consumers=consumers,
        shuffle=shuffle,
        infinite=infinite,
        split=split,
        skips=SkipCounter(),
    )


def drain(source, limit=10_000):
    out = []
    while len(out) < limit and (ref := source.next()) is not None:
        out.append((ref.shard, ref.key, ref.epoch))
    return out


@pytest.mark.parametrize(
    ("sizes", "split"), [((7, 5, 9, 4, 6), "shard"), ((7, 5), "sample"), ((3, 8, 1), "auto")]
)
def test_consumers_see_disjoint_samples_covering_the_epoch(tmp_path, sizes, split):
    paths, ids = make_shards(tmp_path, "a", sizes)
    seen = [drain(stream(paths, c, 3, split=split)) for c in range(3)]
    flat = [(shard, key) for part in seen for shard, key, _ in part]
    assert sorted(flat) == sorted(ids)  # each sample exactly once over the consumers
    assert all(len(part) > 0 for part in seen)
    if split == "sample":  # sample split balances within one
        assert max(map(len, seen)) - min(map(len, seen)) <= 1


def test_order_is_seeded_and_unshuffled_is_file_order(tmp_path):
    paths, ids = make_shards(tmp_path, "a", (6, 6, 6))
    first = drain(stream(paths, seed=1))
    assert first == drain(stream(paths, seed=1))
    assert first != drain(stream(paths, seed=2))
    assert [(s, k) for s, k, _ in drain(stream(paths, shuffle=False))] == ids


def test_infinite_stream_reshuffles_each_epoch_and_covers_each(tmp_path):
    paths, ids = make_shards(tmp_path, "a", (5, 4))
    got = drain(stream(paths, infinite=True), limit=3 * len(ids))
    epochs = [[(s, k) for s, k, e in got if e == epoch] for epoch in range(3)]
    assert all(sorted(e) == sorted(ids) for e in epochs)
    assert epochs[0] != epochs[1]


@pytest.mark.parametrize("split", ["shard", "sample"])
def test_resume_continues_with_exactly_the_next_sample(tmp_path, split):
    paths, _ = make_shards(tmp_path, "a", (5, 7, 3, 6))
    reference = stream(paths, 1, 2, infinite=True, split=split)
    head = drain(reference, limit=11)
    state = reference.state_dict()
    tail = drain(reference, limit=30)
    resumed = stream(paths, 1, 2, infinite=True, split=split)
    resumed.load_state_dict(state)
    assert drain(resumed, limit=30) == tail
    assert len(set(head) & set(tail[:5])) == 0


def test_source_without_samples_for_a_consumer_raises(tmp_path):
    paths, _ = make_shards(tmp_path, "a", (1,))
    lonely = stream(paths, 1, 2, infinite=True, split="sample")  # one sample, two consumers
    with pytest.raises(ValueError, match="no readable sample"):
        lonely.next()


def _mixture(tmp_path, weights, decode, *, consumer=0, infinite=True, start_after=None):
    sources = []
    for name, weight in weights.items():
        paths, _ = make_shards(tmp_path, name, (10, 10))
        start = (start_after or {}).get(name, 0)
        sources.append(SourceSpec(name, paths, weight, kind="text", prompt="", start_after=start))
    config = LoaderConfig(sources, seed=3, infinite=infinite)
    return MixtureStream(config, decode, consumer, 2, SkipCounter())


def fake_decode(ref):
    return Example([0], [0], source=str(ref.source), key=ref.key)


def test_mixture_frequencies_match_weights(tmp_path):
    weights = {"ocr": 0.7, "vision": 0.2, "text": 0.1}
    mix = _mixture(tmp_path, weights, fake_decode)
    n = 3000
    counts = Counter(mix.next()[0].source for _ in range(n))
    for i, p in enumerate(weights.values()):
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(counts[str(i)] - n * p) < 4 * sigma, (counts, weights)


def test_mixture_resume_and_retry_of_bad_samples(tmp_path):
    def flaky(ref):  # every sample whose key ends in 3 is "bad"
        return None if ref.key.endswith("3") else fake_decode(ref)

    weights = {"p": 1.0, "q": 3.0}
    mix = _mixture(tmp_path, weights, flaky)
    head = [mix.next()[1].key for _ in range(17)]
    state = mix.state_dict()
    tail = [mix.next()[1].key for _ in range(40)]
    again = _mixture(tmp_path, weights, flaky)
    again.load_state_dict(state)
    assert [again.next()[1].key for _ in range(40)] == tail
    assert not any(k.endswith("3") for k in head + tail)


def test_finite_mixture_drains_every_source_once(tmp_path):
    mix = _mixture(tmp_path, {"p": 5.0, "q": 1.0}, fake_decode, consumer=1, infinite=False)
    keys = []
    while (item := mix.next()) is not None:
        keys.append((item[1].source, item[1].key))
    assert len(keys) == len(set(keys)) == 20  # half of 2 sources x 2 shards x 10 samples


def test_mixture_raises_when_a_source_has_no_valid_sample(tmp_path):
    mix = _mixture(tmp_path, {"p": 1.0}, lambda ref: None)
    with pytest.raises(ValueError, match="no valid sample"):
        mix.next()


def test_curriculum_source_joins_after_its_share_of_samples_and_resumes_exactly(tmp_path):
    # 2 consumers: start_after=41 -> each consumer draws ceil(41 / 2) = 21 samples of "p" first
    weights, start = {"p": 1.0, "q": 3.0}, {"q": 41}
    mix = _mixture(tmp_path, weights, fake_decode, start_after=start)
    sources = [mix.next()[0].source for _ in range(21)]
    assert sources == ["0"] * 21
    state = mix.state_dict()
    tail = [mix.next()[0].source for _ in range(400)]
    assert 0.65 < tail.count("1") / len(tail) < 0.85  # then the weights hold (3:1)
    again = _mixture(tmp_path, weights, fake_decode, start_after=start)
    again.load_state_dict(state)
    assert [again.next()[0].source for _ in range(400)] == tail


def test_finite_curriculum_lets_waiting_sources_join_when_the_others_run_out(tmp_path):
    mix = _mixture(tmp_path, {"p": 1.0, "q": 1.0}, fake_decode, infinite=False, start_after={"q": 10**6})
    sources = []
    while (item := mix.next()) is not None:
        sources.append(item[0].source)
    assert sources == ["0"] * 10 + ["1"] * 10  # this consumer's half of each source, p first


@pytest.mark.parametrize(
    ("start", "match"), [({"p": 5, "q": 1}, "at least one source"), ({"q": -1}, "start_after")]
)
def test_curriculum_config_errors(tmp_path, start, match):
    with pytest.raises(ValueError, match=match):
        _mixture(tmp_path, {"p": 1.0, "q": 1.0}, fake_decode, start_after=start)
