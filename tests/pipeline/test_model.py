"""Full model on debug presets: the embedding merge against a per-image reference of the release's
layout code, mixed modes and text-only rows in one batch, the loss, gradients, and errors."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.batch import ImageViews, PackedBatch
from pipeline.model import ImagePlan, build_model, next_token_loss, plan_images
from pipeline.processing import normalize_pixels, process_image
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
    length = max(len(e) for e in examples)
    ids = torch.full((3, length), tok.pad_id)
    labels = torch.full((3, length), -100)
    doc_ids = torch.full((3, length), -1)
    pos = torch.zeros((3, length), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e)
        ids[b, :n] = torch.tensor(e.input_ids)
        labels[b, :n] = torch.tensor(e.labels)
        doc_ids[b, :n] = 0
        pos[b, :n] = torch.arange(n)
    return PackedBatch(ids, labels, pos, doc_ids, rows), examples


def test_plan_groups_by_size_and_counts(tok):
    batch, _ = mixed_batch(tok)
    plan = plan_images(batch.images)
    assert plan.sizes == [64, 128]
    # tiles of 64: 2 (2x1) + 3 (3x1); globals of 128: 4 views
    assert [p.shape for p in plan.pixels] == [(5, 3, 64, 64), (4, 3, 128, 128)]
    assert isinstance(plan, ImagePlan) and plan.num_features == 5 * 1 + 4 * 4
    assert plan.row_counts == [sum(v.num_placeholders for v in row) for row in batch.images]
    assert plan.gather_index.numel() == sum(plan.row_counts)
    assert int(plan.gather_index.max()) == plan.num_features + 1
    back = ImagePlan.from_tensors(plan.to_tensors())
    assert back.sizes == plan.sizes and back.row_counts == plan.row_counts
    assert torch.equal(back.gather_index, plan.gather_index)
    assert all(torch.equal(a, b) for a, b in zip(back.pixels, plan.pixels))
    assert [t.dtype for t in plan.to_tensors()] == [
        torch.long,
        torch.uint8,
        torch.uint8,
        torch.long,
        torch.long,
    ]


def test_plan_rejects_mixed_view_dtypes():
    views = [ImageViews(torch.zeros(3, 64, 64, dtype=torch.uint8)), ImageViews(torch.zeros(3, 64, 64))]
    with pytest.raises(ValueError, match="mix dtypes"):
        plan_images([views])


def float_views(views: ImageViews) -> ImageViews:
    """The same image with its views normalised to float32 on the CPU (the former data path)."""
    tiles = None if views.tiles is None else normalize_pixels(views.tiles)
    return ImageViews(normalize_pixels(views.global_view), tiles, views.grid, views.num_placeholders)


def test_forward_on_uint8_views_equals_cpu_normalised_views(tok, model):
    batch, _ = mixed_batch(tok)
    assert all(v.global_view.dtype == torch.uint8 for row in batch.images for v in row)
    floats = PackedBatch(
        batch.input_ids,
        batch.labels,
        batch.position_ids,
        batch.doc_ids,
        [[float_views(v) for v in row] for row in batch.images],
    )
    assert all(v.global_view.dtype == torch.float32 for row in floats.images for v in row)
    with torch.no_grad():
        a = model(batch, return_logits=True)
        b = model(floats, return_logits=True)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    plan = plan_images(batch.images)
    feats_u8 = model.sam_features(plan.pixels)
    feats_f32 = model.sam_features(plan_images(floats.images).pixels)
    assert all(torch.equal(x, y) for x, y in zip(feats_u8, feats_f32))


def test_merge_matches_per_image_reference(tok, model):
    batch, _ = mixed_batch(tok)
    with torch.no_grad():
        merged = model.embed_inputs(batch.input_ids, batch.images)
        expected = model.decoder.embed_tokens(batch.input_ids).clone()
        for b, row in enumerate(batch.images):
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
    ids = torch.tensor([ex.input_ids])
    embeds = model.embed_inputs(ids, [[]])
    torch.testing.assert_close(embeds, model.decoder.embed_tokens(ids))
    assert next_token_loss(torch.zeros(1, 3, 5, requires_grad=True), torch.full((1, 3), -100))[1] == 0


def test_placeholder_mismatch_is_a_clear_error(tok, model):
    views = process_image(noise_image(50, 50, 0), "debug")
    ex = build_example(tok, PROMPTS["free_ocr"], "a", [views])
    ids = torch.tensor([ex.input_ids[:5] + ex.input_ids[6:]])  # one placeholder lost
    with pytest.raises(ValueError, match="row 0 has 6 placeholders, its images need 7"):
        model.embed_inputs(ids, [[views]])
    with pytest.raises(ValueError, match="rows"):
        model.embed_inputs(ids, [[views], []])


def test_build_model_checks_widths(tok):
    with pytest.raises(ValueError, match="n_embed"):
        build_model("debug", "debug", tok.vocab_size, image_token_id=3, encoder_overrides={"n_embed": 32})
    with pytest.raises(ValueError, match="image_token_id"):
        build_model("debug", "debug", 10, image_token_id=10)
    with torch.device("meta"):
        full = build_model("full", "full", 129280, image_token_id=128815)
    assert sum(p.numel() for p in full.parameters()) == 3_336_106_240
