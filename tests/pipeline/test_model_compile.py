"""DeepSeekOCR.compile_regions: the compiled model computes the eager model's loss and gradients."""

import pytest
import torch
from PIL import Image

from pipeline.data.packing import collate_unpacked
from pipeline.model import build_model
from pipeline.processing import process_image
from pipeline.prompts import build_example
from pipeline.tokenizer import build_char_tokenizer

pytestmark = pytest.mark.unit


def test_compiled_regions_match_eager_loss_and_gradients():
    tok = build_char_tokenizer("abcdefghijklmnopqrstuvwxyz0123456789 .,\n")
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 256, (64, 96, 3), generator=g, dtype=torch.uint8).numpy())
              for _ in range(2)]  # fmt: skip
    views = [process_image(image, "debug") for image in images]
    example = build_example(tok, "<image>x<image>\nFree OCR.", "ab cd", views)
    batch = collate_unpacked([example], tok.pad_id, tok.image_id)

    def loss_and_grads(compiled: bool):
        torch.manual_seed(0)
        model = build_model("debug", "debug", tok.vocab_size, image_token_id=tok.image_id)
        if compiled:
            model.compile_regions(backend="aot_eager")  # traces forward + backward, no kernels: fast on CPU
        loss = model(batch).loss
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    eager_loss, eager_grads = loss_and_grads(False)
    loss, grads = loss_and_grads(True)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == eager_grads.keys()
    for key, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[key], rtol=1e-4, atol=1e-6, msg=key)


def test_compiled_sam_blocks_stay_compiled_across_view_sizes_and_batches():
    """Windowed and global SAM blocks share one code object; with several view sizes and batch
    size 1 among them they need more graphs than dynamo's default limit of 8 (past it the
    blocks silently run eagerly): compile_regions raises the limit."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = build_model("debug", "debug", 100, image_token_id=5)
    model.compile_regions(backend="eager")  # dynamo capture only: the cache limit is the point
    for n in (1, 2, 3):
        for size in (64, 128, 192):
            model.encoder.sam_features(torch.randn(n, 3, size, size))
    assert counters["stats"]["unique_graphs"] > 8
    assert not [k for k in counters["unimplemented"] if "recompile limit" in k], dict(
        counters["unimplemented"]
    )
    torch._dynamo.reset()
