"""MoE layer: grouped expert paths vs a loop-over-experts oracle (forward and backward), the
sequence-level balance loss vs a direct transcription of DeepSeek-V2's formula, and the
per-expert load statistics."""

import pytest
import torch
import torch.nn.functional as F

from decoder import MoE, decoder_config
from decoder.moe import GroupedExperts, Router, balance_loss, grouped_mm_on_cpu

BACKENDS = ["grouped_mm", "loop", "padded_bmm"]


def oracle_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per token, per selected expert, in plain loops: sum_i w_i * SwiGLU_e(x) + shared(x)."""
    b, t, h = x.shape
    flat = x.reshape(-1, h)
    scores = F.linear(flat.float(), moe.gate.weight.float()).softmax(-1)
    k = moe.moe.num_experts_per_tok
    inter = moe.moe.moe_intermediate_size
    top_w, top_i = scores.topk(k, dim=-1)
    rows = []
    for n in range(flat.shape[0]):
        acc = torch.zeros(h, dtype=torch.float32)
        for j in range(k):
            e = int(top_i[n, j])
            gate_w = moe.experts.gate_up_proj[e, :inter]
            up_w = moe.experts.gate_up_proj[e, inter:]
            y = (F.silu(gate_w @ flat[n]) * (up_w @ flat[n])) @ moe.experts.down_proj[e].t()
            acc = acc + top_w[n, j] * moe.moe.routed_scaling_factor * y.float()
        rows.append(acc.to(x.dtype))
    routed = torch.stack(rows).view(b, t, h)
    return routed + moe.shared_experts(x)


def make_moe(backend, seed=0):
    torch.manual_seed(seed)
    cfg = decoder_config("debug", moe={"experts_backend": backend})
    return MoE(cfg), cfg


@pytest.mark.unit
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_experts_match_loop_oracle_fwd_bwd(backend):
    if backend == "grouped_mm" and not grouped_mm_on_cpu(torch.float32):
        pytest.skip("this torch build has no fp32 grouped_mm on CPU")
    moe, cfg = make_moe(backend)
    moe.eval()  # no aux loss: compare the function itself
    x = torch.randn(2, 16, cfg.hidden_size, requires_grad=True)
    out, aux = moe(x)
    assert aux.item() == 0.0
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *moe.parameters()], grad_out)

    x_ref = x.detach().clone().requires_grad_(True)
    ref = oracle_moe(moe, x_ref)
    ref_grads = torch.autograd.grad(ref, [x_ref, *moe.parameters()], grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    names = ["x", *(n for n, _ in moe.named_parameters())]
    for name, g, r in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.unit
def test_backends_agree_in_bf16():
    torch.manual_seed(1)
    cfg = decoder_config("debug")
    experts = GroupedExperts(cfg.hidden_size, cfg.moe, 0.02).to(torch.bfloat16)
    x = torch.randn(64, cfg.hidden_size, dtype=torch.bfloat16)
    router = Router(cfg.hidden_size, cfg.moe, 0.02)
    router.init_weights()
    _, w, idx = router(x)
    outs = {}
    for backend in BACKENDS if grouped_mm_on_cpu(torch.bfloat16) else BACKENDS[1:]:
        experts.backend = backend
        outs[backend] = experts(x, idx, w).float()
    first = next(iter(outs))
    for backend in outs:
        torch.testing.assert_close(outs[backend], outs[first], rtol=2e-2, atol=1e-3)


@pytest.mark.unit
def test_experts_compute_in_autocast_dtype(monkeypatch):
    """fp32 weights under bf16 autocast (the local engine): the experts pick their backend for bf16
    (grouped_mm on Hopper, not the host-syncing fp32 fallbacks) and equal the bf16 computation."""
    import decoder.moe as moe_mod

    torch.manual_seed(2)
    cfg = decoder_config("debug", moe={"experts_backend": "loop"})
    experts = GroupedExperts(cfg.hidden_size, cfg.moe, 0.02)
    x = torch.randn(32, cfg.hidden_size)
    router = Router(cfg.hidden_size, cfg.moe, 0.02)
    router.init_weights()
    _, w, idx = router(x)
    seen = []
    select = moe_mod.select_experts_backend
    monkeypatch.setattr(
        moe_mod, "select_experts_backend", lambda r, d, dt: seen.append(dt) or select(r, d, dt)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = experts(x, idx, w)
    plain = experts(x, idx, w)
    assert seen == [torch.bfloat16, torch.float32]
    assert out.dtype == torch.bfloat16 and plain.dtype == torch.float32
    reference = GroupedExperts(cfg.hidden_size, cfg.moe, 0.02)
    reference.load_state_dict(experts.state_dict())
    reference.backend = "loop"
    expected = reference.to(torch.bfloat16)(x.bfloat16(), idx, w)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def oracle_seq_aux(scores, indices, batch, seq, num_experts, k, alpha):
    """DeepSeek-V2 seq_aux, transcribed: per row count selections, normalise by seq*k/E,
    dot with the mean score of the row; mean over rows; times alpha."""
    total = 0.0
    scores = scores.view(batch, seq, num_experts)
    indices = indices.view(batch, seq * k)
    for b in range(batch):
        counts = [0.0] * num_experts
        for e in indices[b].tolist():
            counts[e] += 1.0
        mean_score = scores[b].mean(0)
        total = total + sum(counts[e] / (seq * k / num_experts) * mean_score[e] for e in range(num_experts))
    return total / batch * alpha


@pytest.mark.unit
def test_seq_aux_loss_matches_formula_and_reaches_router():
    moe, cfg = make_moe("auto")
    moe.train()
    x = torch.randn(3, 10, cfg.hidden_size)
    out, aux = moe(x)
    scores, _, idx = moe.gate(x.reshape(-1, cfg.hidden_size))
    ref = oracle_seq_aux(
        scores, idx, 3, 10, cfg.moe.n_routed_experts, cfg.moe.num_experts_per_tok, cfg.moe.aux_loss_alpha
    )
    torch.testing.assert_close(aux, ref, rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(aux, moe.gate.weight)
    (ref_grad,) = torch.autograd.grad(ref, moe.gate.weight)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.unit
def test_aux_loss_ignores_padding_tokens():
    moe, cfg = make_moe("auto")
    moe.train()
    x = torch.randn(2, 12, cfg.hidden_size)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    _, aux = moe(x, mask)
    scores, _, idx = moe.gate(x.reshape(-1, cfg.hidden_size))
    s, i = scores.view(2, 12, -1), idx.view(2, 12, -1)
    e, k, a = cfg.moe.n_routed_experts, cfg.moe.num_experts_per_tok, cfg.moe.aux_loss_alpha
    row0 = oracle_seq_aux(s[0], i[0], 1, 12, e, k, a)
    row1 = oracle_seq_aux(s[1, :7].reshape(-1, e), i[1, :7].reshape(-1, k), 1, 7, e, k, a)
    torch.testing.assert_close(aux, (row0 + row1) / 2, rtol=1e-6, atol=0)
    # the recorded load counts only real tokens
    counts = moe.last_expert_counts
    assert counts.dtype == torch.int64 and counts.shape == (e,)
    assert int(counts.sum()) == (12 + 7) * k
    assert torch.equal(counts, torch.bincount(i[mask].reshape(-1), minlength=e))


@pytest.mark.unit
def test_token_level_aux_when_seq_aux_off():
    cfg = decoder_config("debug", moe={"seq_aux": False})
    torch.manual_seed(0)
    scores = torch.rand(2 * 5, 8).softmax(-1)
    idx = scores.topk(2, dim=-1).indices
    aux = balance_loss(scores, idx, 2, 5, cfg.moe, None)
    fi = F.one_hot(idx.reshape(-1), 8).float().mean(0) * 8  # DeepSeek-V2 non-seq form
    ref = (scores.mean(0) * fi).sum() * cfg.moe.aux_loss_alpha
    torch.testing.assert_close(aux, ref)


@pytest.mark.unit
def test_router_is_greedy_softmax_without_renorm():
    cfg = decoder_config("debug", moe={"routed_scaling_factor": 2.5})
    router = Router(cfg.hidden_size, cfg.moe, 0.02)
    router.init_weights()
    x = torch.randn(7, cfg.hidden_size, dtype=torch.float64)
    scores, w, idx = router(x)
    assert scores.dtype == torch.float32
    probs = torch.softmax(x.float() @ router.weight.float().t(), -1)
    torch.testing.assert_close(w, probs.gather(1, idx) * 2.5)
    assert torch.equal(idx.sort(-1).values, probs.topk(2, -1).indices.sort(-1).values)
    renorm = Router(cfg.hidden_size, decoder_config("debug", moe={"norm_topk_prob": True}).moe, 0.02)
    renorm.weight.data.copy_(router.weight)
    torch.testing.assert_close(renorm(x)[1].sum(-1), torch.ones(7))
