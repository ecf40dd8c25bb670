"""Image modes: placeholder counts (spec table), Gundam grid choice, pixel layout, bad inputs."""

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.processing import (
    MODES,
    ModeSpec,
    candidate_grids,
    choose_grid,
    get_mode,
    normalize_pixels,
    num_placeholders,
    process_image,
    select_mode,
    valid_image_tokens,
)

pytestmark = pytest.mark.unit

PAD_VALUE = (127 / 255 - 0.5) / 0.5


def solid(width, height, color=(200, 10, 60)):
    return Image.new("RGB", (width, height), color)


def png_bytes(image, **save_kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=save_kwargs.pop("format", "PNG"), **save_kwargs)
    return buffer.getvalue()


def test_mode_table_matches_spec():
    expected = {
        "tiny": (512, 512, False, False, 73),
        "small": (640, 640, False, False, 111),
        "base": (1024, 1024, False, True, 273),
        "large": (1280, 1280, False, True, 421),
        "gundam": (1024, 640, True, True, 273),
    }
    for name, (base, image, crop, pad, count) in expected.items():
        spec = MODES[name]
        assert (spec.base_size, spec.image_size, spec.crop, spec.pad) == (base, image, crop, pad)
        assert num_placeholders(name) == count
    for spec in MODES.values():
        assert spec.base_size % 64 == 0 and spec.image_size % 64 == 0


def test_gundam_placeholder_examples_from_spec():
    for grid, count in {(1, 2): 493, (2, 1): 483, (2, 2): 693, (3, 2): 893, (3, 3): 1203}.items():
        assert num_placeholders("gundam", grid) == count


@pytest.mark.parametrize("grid", candidate_grids(2, 9))
def test_every_gundam_grid_up_to_nine_tiles(grid):
    w, h = grid
    assert num_placeholders("gundam", grid) == 273 + (10 * h) * (10 * w + 1)
    # An image of exactly this aspect just above the no-tile threshold picks this grid unless a
    # grid of the same aspect with more tiles wins the area tie-break (it cannot at this size).
    width, height = 641 * w, 641 * h
    assert choose_grid(width, height, 640, max_tiles=9) == grid
    # debug-gundam (tiles of 64, global 128) follows the same rule at 1/10 scale
    views = process_image(solid(65 * w, 65 * h), "debug-gundam")
    assert views.grid == grid
    assert views.tiles.shape == (w * h, 3, 64, 64)
    assert views.global_view.shape == (3, 128, 128)
    assert views.num_placeholders == 2 * 3 + 1 + (1 * w + 1) * (1 * h)


def test_candidate_grid_order_is_the_releases_set_order():
    built = set(
        (i, j) for n in range(2, 10) for i in range(1, n + 1) for j in range(1, n + 1) if 2 <= i * j <= 9
    )
    assert candidate_grids(2, 9) == sorted(built, key=lambda g: g[0] * g[1])
    assert len(candidate_grids(2, 9)) == 22
    assert all(2 <= w * h <= 6 for w, h in candidate_grids(2, 6))


def _oracle_grid(width, height, tile, min_tiles, max_tiles):
    # Independent restatement: keep the minimal-difference candidates (in tile-count order);
    # the first is taken, each later one replaces it when the image area exceeds half its tiles' area.
    cands = [
        (w, h)
        for n in range(min_tiles, max_tiles + 1)
        for w in range(1, n + 1)
        for h in range(1, n + 1)
        if w * h == n
    ]
    diffs = {g: abs(width / height - g[0] / g[1]) for g in cands}
    best = min(diffs.values())
    tied = [g for g in candidate_grids(min_tiles, max_tiles) if diffs[g] == best]
    pick = tied[0]
    for g in tied[1:]:
        if width * height > 0.5 * tile * tile * g[0] * g[1]:
            pick = g
    return pick


@pytest.mark.parametrize("max_tiles", [6, 9])
def test_grid_choice_over_many_aspect_ratios(max_tiles):
    rng = random.Random(1)
    sizes = [(1240, 1754), (1754, 1240), (3000, 700), (700, 3000), (1400, 1400), (900, 900), (2000, 1000)]
    sizes += [(rng.randint(100, 6000), rng.randint(100, 6000)) for _ in range(300)]
    for width, height in sizes:
        grid = choose_grid(width, height, 640, max_tiles=max_tiles)
        assert grid == _oracle_grid(width, height, 640, 2, max_tiles), (width, height)
        assert 2 <= grid[0] * grid[1] <= max_tiles


def test_grid_choice_hand_computed():
    assert choose_grid(1240, 1754, 640) == (2, 3)  # A4 portrait, ratio 0.707 -> 2/3
    assert choose_grid(900, 900, 640) == (2, 2)  # square, area too small for 3x3
    assert choose_grid(1400, 1400, 640) == (3, 3)  # 1.96M px > 0.5 * 640^2 * 9: tie goes to 3x3
    assert choose_grid(3000, 700, 640) == (4, 1)  # ratio 4.29: 4/1
    # (1,2) and (2,4) tie at ratio 1/2; (2,4) wins only if area > 0.5 * 640^2 * 8 = 1,638,400
    assert choose_grid(800, 1600, 640) == (1, 2)  # 1.28M px
    assert choose_grid(1000, 2000, 640) == (2, 4)  # 2M px
    assert choose_grid(1000, 2000, 640, max_tiles=6) == (1, 2)  # (2,4) not a candidate


def test_gundam_full_size_views():
    views = process_image(solid(1240, 1754), "gundam")
    assert views.grid == (2, 3)
    assert views.tiles.shape == (6, 3, 640, 640)
    assert views.global_view.shape == (3, 1024, 1024)
    assert views.num_placeholders == 273 + 30 * 21 == 903
    # both sides <= 640: no tiles, Base layout
    small = process_image(solid(640, 300), "gundam")
    assert small.tiles is None and small.grid == (1, 1) and small.num_placeholders == 273
    assert small.global_view.shape == (3, 1024, 1024)


@pytest.mark.parametrize("mode,side,count", [("tiny", 512, 73), ("small", 640, 111), ("base", 1024, 273)])
def test_single_view_modes_shapes(mode, side, count):
    views = process_image(solid(300, 200), mode)
    assert views.global_view.shape == (3, side, side)
    assert views.tiles is None and views.grid == (1, 1) and views.num_placeholders == count


def test_resize_mode_stretches_and_normalises():
    color = (200, 10, 60)
    views = process_image(solid(300, 100, color), "debug")
    assert views.global_view.dtype == torch.uint8
    assert torch.equal(
        views.global_view, torch.tensor(color, dtype=torch.uint8).view(3, 1, 1).expand(3, 128, 128)
    )
    expected = torch.tensor([(c / 255 - 0.5) / 0.5 for c in color])
    normalised = normalize_pixels(views.global_view)
    assert normalised.dtype == torch.float32
    assert torch.allclose(normalised, expected.view(3, 1, 1).expand(3, 128, 128), atol=1e-6)


def test_pad_mode_keeps_aspect_and_pads_with_127():
    color = (200, 10, 60)
    views = process_image(solid(256, 128, color), "debug-pad")  # fits as 128 x 64, centred
    g = normalize_pixels(views.global_view)
    assert torch.allclose(g[:, :32], torch.full((3, 32, 128), PAD_VALUE), atol=1e-6)
    assert torch.allclose(g[:, 96:], torch.full((3, 32, 128), PAD_VALUE), atol=1e-6)
    expected = torch.tensor([(c / 255 - 0.5) / 0.5 for c in color]).view(3, 1, 1)
    assert torch.allclose(g[:, 32:96], expected.expand(3, 64, 128), atol=1e-6)


def test_tiles_are_row_major():
    # 4 quadrants of distinct colours; 2x2 grid -> tile i = (row i // 2, col i % 2)
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    image = Image.new("RGB", (120, 120))  # area below the 3x3 tie-break
    for i, color in enumerate(colors):
        row, col = divmod(i, 2)
        image.paste(color, (col * 60, row * 60, (col + 1) * 60, (row + 1) * 60))
    views = process_image(image, "debug-gundam")
    assert views.grid == (2, 2)
    for i, color in enumerate(colors):
        center = normalize_pixels(views.tiles[i, :, 16:48, 16:48])
        expected = torch.tensor([(c / 255 - 0.5) / 0.5 for c in color]).view(3, 1, 1)
        assert torch.allclose(center, expected.expand_as(center), atol=1e-6), i


def test_views_are_uint8_and_normalize_matches_torchvision_order():
    array = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    views = process_image(Image.fromarray(array), "debug")  # 128 -> 128: the pixels unchanged
    assert views.global_view.dtype == torch.uint8 and views.global_view.is_contiguous()
    assert torch.equal(views.global_view, torch.from_numpy(array).permute(2, 0, 1))
    every = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(2, 3, 1, 256)  # (N, 3, H, W)
    ref = ((torch.arange(256, dtype=torch.float64) / 255 - 0.5) / 0.5).view(1, 1, 1, 256).expand(2, 3, 1, 256)
    out = normalize_pixels(every)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 1, 256)
    assert (out.double() - ref).abs().max() < 1e-7
    assert torch.equal(
        normalize_pixels(every, torch.bfloat16), out.to(torch.bfloat16)
    )  # fp32 math, then cast
    floats = torch.randn(3, 4, 4, dtype=torch.float64)
    assert torch.equal(normalize_pixels(floats), floats.float())  # floating = already normalised, cast only
    with pytest.raises(TypeError, match="uint8"):
        normalize_pixels(every.to(torch.int32))
    with pytest.raises(ValueError, match="3, H, W"):
        normalize_pixels(torch.zeros(4, 8, 8, dtype=torch.uint8))


def test_num_placeholders_rejects_tiles_for_non_crop_modes():
    with pytest.raises(ValueError, match="no tiles"):
        num_placeholders("base", (2, 1))
    with pytest.raises(ValueError, match="unknown image mode"):
        get_mode("huge")
    with pytest.raises(ValueError, match="multiple of 64"):
        ModeSpec("odd", 100, 100)


def test_valid_tokens_for_padded_modes():
    assert valid_image_tokens("base", 1000, 1000) == 256
    assert valid_image_tokens("base", 1000, 500) == 128
    assert valid_image_tokens("tiny", 1000, 500) == 64


def test_process_image_rejects_zero_pixels():
    with pytest.raises(ValueError, match="zero pixels"):
        process_image(Image.new("RGB", (0, 10)), "base")


def test_select_mode_frequencies():
    rng = random.Random(0)
    weights = {"tiny": 1.0, "base": 3.0, "gundam": 0.0}
    draws = [select_mode(rng, weights) for _ in range(4000)]
    assert "gundam" not in draws
    assert abs(draws.count("base") / 4000 - 0.75) < 0.03
    assert select_mode(np.random.default_rng(0), {"small": 1.0}) == "small"
    with pytest.raises(ValueError):
        select_mode(rng, {"tiny": 0.0})
    with pytest.raises(ValueError, match="unknown image mode"):
        select_mode(rng, {"nope": 1.0})


def test_data_tools_mode_table_follows_processing_modes():
    """data_tools stands alone (no pipeline import), so it keeps its own table of the paper modes'
    longest view side: it must agree with MODES (the place a mode is defined)."""
    from data_tools.validate import VIEW_LONG_SIDE
    from pipeline.processing import PAPER_MODES

    assert tuple(VIEW_LONG_SIDE) == PAPER_MODES
    for name, side in VIEW_LONG_SIDE.items():
        spec = MODES[name]
        assert side == (spec.image_size * 9 if spec.crop else spec.base_size), name  # Gundam: 9 tiles wide
