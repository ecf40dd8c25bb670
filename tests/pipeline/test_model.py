"""Full model on debug presets: the embedding merge against a per-image reference of the release's
layout code, mixed modes and text-only rows in one batch, the loss, gradients, and errors."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.batch import ImageViews
from pipeline.data.packing import collate_unpacked
from pipeline.layout import layout_images
from pipeline.model import build_model, next_token_loss
from pipeline.processing import normalize_pixels, process_image, view_sizes
from pipeline.prompts import PROMPTS, build_example
from pipeline.tokenizer import build_char_tokenizer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer("abcdefghijklmnopqrstuvwxyz0123456789 .,\n")


@pytest.fixture()
def model(tok):
    torch.manual_seed(0)
    return build_model("debug", "debug", tok.vocab_size, image_token_id=tok.image_id).eval()


def noise_image(width, height, seed):
    g = torch.Generator().manual_seed(seed)
    array = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(array)


def reference_image_embeddings(model, views):
    """The release's per-image layout (`DeepseekOCRModel.forward`), one encoder call per view set."""
    enc = model.encoder
    nl, sep = enc.image_newline, enc.view_seperator
    g = enc(normalize_pixels(views.global_view[None]))[0]  # (q*q, H)
    q = int(g.shape[0] ** 0.5)
    g = torch.cat([g.view(q, q, -1), nl[None, None].expand(q, 1, -1)], dim=1).view(-1, g.shape[-1])
    if views.tiles is None:
        return torch.cat([g, sep[None]])
    local = enc(normalize_pixels(views.tiles))  # (n, q2*q2, H)
    q2 = int(local.shape[1] ** 0.5)
    w, h = views.grid
    local = local.view(h, w, q2, q2, -1).permute(0, 2, 1, 3, 4).reshape(h * q2, w * q2, -1)
    local = torch.cat([local, nl[None, None].expand(h * q2, 1, -1)], dim=1).view(-1, local.shape[-1])
    return torch.cat([local, g, sep[None]])


def mixed_batch(tok):
    """Rows: gundam 2x1 + pad; text only; resize + gundam 3x1 (various sizes in one batch)."""
    rows = [
        [
            process_image(noise_image(120, 60, 1), "debug-gundam"),
            process_image(noise_image(90, 50, 2), "debug-pad"),
        ],
        [],
        [
            process_image(noise_image(70, 90, 3), "debug"),
            process_image(noise_image(190, 60, 4), "debug-gundam"),
        ],
    ]
    prompts = ["<image>x<image>\nFree OCR.", "", "<image> and <image>"]
    answers = ["ab", "plain text row", "c d"]
    examples = [build_example(tok, p, a, imgs) for p, a, imgs in zip(prompts, answers, rows)]
    return collate_unpacked(examples, tok.pad_id, tok.image_id), rows


def test_layout_groups_by_size_and_counts(tok):
    batch, rows = mixed_batch(tok)
    sizes = view_sizes()
    shapes = {s: p.shape for s, p in zip(sizes, batch.pixels)}
    # tiles of 64: 2 (2x1) + 3 (3x1); globals of 128: 4 views; every other slot empty
    assert shapes[64] == (5, 3, 64, 64) and shapes[128] == (4, 3, 128, 128)
    assert all(shapes[s][0] == 0 for s in sizes if s not in (64, 128))
    num_features = 5 * 1 + 4 * 4
    assert batch.row_counts.tolist() == [sum(v.num_placeholders for v in row) for row in rows]
    assert batch.gather_index.numel() == batch.image_positions.numel() == int(batch.row_counts.sum())
    assert int(batch.gather_index.max()) == num_features + 1
    flat = batch.input_ids.flatten()
    assert torch.equal(batch.image_positions, (flat == tok.image_id).nonzero().flatten())
    assert all(p.dtype == torch.uint8 for p in batch.pixels)
    assert batch.num_images == 4 and batch.num_documents == 3


def test_layout_rejects_float_views():
    with pytest.raises(TypeError, match="uint8"):
        layout_images([[ImageViews(torch.zeros(3, 64, 64))]])


def test_sam_features_of_uint8_views_equal_cpu_normalised_views(tok, model):
    batch, _ = mixed_batch(tok)
    present = [p for p in batch.pixels if p.shape[0]]
    feats_u8 = model.sam_features(present)
    feats_f32 = model.sam_features([normalize_pixels(p) for p in present])
    assert all(torch.equal(x, y) for x, y in zip(feats_u8, feats_f32))


def test_merge_matches_per_image_reference(tok, model):
    batch, rows = mixed_batch(tok)
    with torch.no_grad():
        merged = model.embed(batch)
        expected = model.decoder.embed_tokens(batch.input_ids).clone()
        for b, row in enumerate(rows):
            if row:
                feats = torch.cat([reference_image_embeddings(model, v) for v in row])
                mask = batch.input_ids[b] == tok.image_id
                expected[b, mask] = feats
    assert merged.shape == (3, batch.input_ids.shape[1], 64)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
    # the text-only row is plain token embeddings
    torch.testing.assert_close(merged[1], model.decoder.embed_tokens(batch.input_ids[1]))


def test_forward_loss_is_masked_next_token_ce(tok, model):
    batch, _ = mixed_batch(tok)
    model.train()
    out = model(batch, return_logits=True)
    logits = out.logits
    manual, count = [], 0
    for b in range(3):
        for t in range(batch.input_ids.shape[1] - 1):
            target = int(batch.labels[b, t + 1])
            if target != -100:
                manual.append(F.cross_entropy(logits[b, t][None], torch.tensor([target])))
                count += 1
    assert out.num_label_tokens == count == len("ab") + len("plain text row") + len("c d") + 3
    torch.testing.assert_close(out.lm_loss, torch.stack(manual).mean())
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    assert out.aux_loss > 0  # debug decoder has MoE layers; aux loss in training
    assert out.expert_counts is not None and out.expert_counts.shape == (2, 8)
    out.loss.backward()
    enc = model.encoder
    for param in (
        enc.image_newline,
        enc.view_seperator,
        enc.projector.layers.weight,
        model.decoder.lm_head.weight,
    ):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_text_only_batch_skips_encoder(tok, model):
    ex = build_example(tok, PROMPTS["text_only"], "hello", [])
    batch = collate_unpacked([ex], tok.pad_id, tok.image_id)
    calls = []
    model.encoder.sam_model.register_forward_hook(lambda *a: calls.append(1))
    embeds = model.embed(batch)
    torch.testing.assert_close(embeds, model.decoder.embed_tokens(batch.input_ids))
    assert calls == []
    assert next_token_loss(torch.zeros(1, 3, 5, requires_grad=True), torch.full((1, 3), -100))[1] == 0


def test_chunked_loss_head_equals_full_logits_loss(tok, model):
    """The forward's chunked head (precomputed label positions) equals the loss on full logits."""
    batch, _ = mixed_batch(tok)
    model.train()
    chunked = model(batch)
    model.loss_chunk_tokens = 0
    full = model(batch)
    torch.testing.assert_close(chunked.lm_loss, full.lm_loss, atol=1e-6, rtol=1e-6)


def test_placeholder_mismatch_is_a_clear_error(tok):
    views = process_image(noise_image(50, 50, 0), "debug")
    ex = build_example(tok, PROMPTS["free_ocr"], "a", [views])
    ex.input_ids = ex.input_ids[:5] + ex.input_ids[6:]  # one placeholder lost
    ex.labels = ex.labels[:5] + ex.labels[6:]
    with pytest.raises(ValueError, match="row 0 has 6 placeholders, its images need 7"):
        collate_unpacked([ex], tok.pad_id, tok.image_id)


def test_build_model_checks_widths(tok):
    with pytest.raises(ValueError, match="n_embed"):
        build_model("debug", "debug", tok.vocab_size, image_token_id=3, encoder_overrides={"n_embed": 32})
    with pytest.raises(ValueError, match="image_token_id"):
        build_model("debug", "debug", 10, image_token_id=10)
    with torch.device("meta"):
        full = build_model("full", "full", 129280, image_token_id=128815)
    assert sum(p.numel() for p in full.parameters()) == 3_336_106_240


class HostSyncOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ATen ops that read a device value back to the host (a sync on CUDA): scalar
    reads, nonzero / masked_select / unique, boolean-mask indexing, repeat_interleave without an
    output size. The CPU has no syncs to count, but the same ops on CUDA block the host."""

    def __init__(self) -> None:
        super().__init__()
        aten = torch.ops.aten
        self.always = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
                       aten._unique2.default, aten.unique_consecutive.default}  # fmt: skip
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        syncs = func in self.always
        if func is aten.index.Tensor:
            syncs = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        if func is aten.repeat_interleave.Tensor:
            syncs = kwargs.get("output_size") is None
        if syncs:
            self.found.append(str(func))
        return func(*args, **kwargs)


def test_training_step_reads_nothing_back_from_the_device(tok):
    """Forward + backward of the full model on a collated batch (mixed modes, tiles, text-only
    row) runs no op that syncs the host: the layout, positions and counts come from the collate."""
    torch.manual_seed(0)
    model = build_model("debug", "debug", tok.vocab_size, image_token_id=tok.image_id).to(torch.bfloat16)
    model.encoder.freeze_sam()
    model.train()
    batch, _ = mixed_batch(tok)
    with HostSyncOps() as probe:
        out = model(batch)
        out.loss.backward()
    assert probe.found == []
    assert out.num_label_tokens == batch.num_label_tokens > 0


def test_one_config_translation_for_every_path(tok):
    """`model_configs` is the one translation of a ModelConfig: a vocab_size override may enlarge
    the embedding beyond the tokenizer's (on every PP; it once raised a TypeError at PP=1), never
    shrink it; the encoder's width follows the decoder's."""
    from pipeline.config import ModelConfig
    from pipeline.model import model_configs

    m = ModelConfig(encoder="debug", decoder="debug", decoder_overrides={"vocab_size": tok.vocab_size + 64})
    enc, dec = model_configs(m, tok.vocab_size)
    assert dec.vocab_size == tok.vocab_size + 64 and enc.n_embed == dec.hidden_size
    m.decoder_overrides = {"vocab_size": tok.vocab_size - 1}
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        model_configs(m, tok.vocab_size)
