"""CUDA paths of the decoder (skipped without a GPU): the expert backends agree in bf16 fwd+bwd,
packed rows through FlexAttention / flash-attn varlen equal the SDPA-mask path, and a
compiled model computes what the eager one does."""

import pytest
import torch

from decoder import DecoderModel, decoder_config
from decoder.attention import build_attention_info
from decoder.moe import GroupedExperts, Router

pytestmark = pytest.mark.gpu


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_expert_backends_agree_bf16_fwd_bwd():
    torch.manual_seed(0)
    cfg = decoder_config("full", moe={"n_routed_experts": 16, "num_experts_per_tok": 4}).moe
    experts = GroupedExperts(256, cfg, 0.02).cuda().to(torch.bfloat16)
    router = Router(256, cfg, 0.02).cuda()
    x = torch.randn(2048, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        _, w, idx = router(x)
    results = {}
    for backend in ("grouped_mm", "loop", "padded_bmm"):
        experts.backend = backend
        xi = x.clone().requires_grad_(True)
        out = experts(xi, idx, w)
        out.float().square().sum().backward()
        results[backend] = (out, xi.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone())
        experts.zero_grad()
    for backend in ("loop", "padded_bmm"):
        for got, ref in zip(results[backend], results["grouped_mm"]):
            assert rel_err(got, ref) < 1e-2, backend


@pytest.mark.parametrize("backend", ["flex", "flash"])
def test_packed_kernels_match_sdpa_mask(backend):
    if backend == "flash":
        pytest.importorskip("flash_attn")
    torch.manual_seed(0)
    cfg = decoder_config("debug", attn_backend=backend, hidden_size=256, num_heads=2)
    model = DecoderModel(cfg).cuda().to(torch.bfloat16).eval()
    t = 256
    doc_ids = torch.full((2, t), -1, dtype=torch.long, device="cuda")
    doc_ids[0, :100], doc_ids[0, 100:256] = 0, 1
    doc_ids[1, :40], doc_ids[1, 40:200] = 0, 1
    ids = torch.randint(0, cfg.vocab_size, (2, t), device="cuda")
    info = build_attention_info(2, t, torch.device("cuda"), doc_ids=doc_ids, backend=backend)
    assert info.kind == {"flex": "flex", "flash": "varlen"}[backend]
    with torch.no_grad():
        fast = model(ids, doc_ids=doc_ids).logits
        model.config.attn_backend = "sdpa"
        masked = model(ids, doc_ids=doc_ids).logits
    valid = doc_ids >= 0
    assert rel_err(fast[valid], masked[valid]) < 2e-2


def test_compiled_layers_match_eager():
    torch.manual_seed(0)
    model = DecoderModel(decoder_config("debug")).cuda().to(torch.bfloat16).train()
    ids = torch.randint(0, 512, (2, 128), device="cuda")
    out = model(ids)
    (out.logits.float().logsumexp(-1).mean() + out.aux_loss).backward()
    eager_grad = model.layers[1].mlp.experts.gate_up_proj.grad.clone()
    model.zero_grad()
    model.compile_layers()
    out_c = model(ids)
    (out_c.logits.float().logsumexp(-1).mean() + out_c.aux_loss).backward()
    assert rel_err(out_c.logits, out.logits) < 2e-2
    assert rel_err(model.layers[1].mlp.experts.gate_up_proj.grad, eager_grad) < 5e-2
    assert torch.equal(model.expert_counts().sum(1), torch.full((2,), 2 * 128 * 2, device="cuda"))
