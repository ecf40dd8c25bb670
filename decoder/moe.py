"""DeepSeekMoE feed-forward of the decoder: greedy top-k router, grouped routed experts, shared experts.

Follows DeepseekV2MoE as configured by the released DeepSeek-OCR (architecture.md section 2):
router logits x.float() @ W^T, softmax in fp32, top-k unsorted, weights = raw probabilities
(optionally renormalised) * routed_scaling_factor; output = sum_i w_i * expert_i(x) + shared(x),
the sum over the k experts accumulated in fp32. The routing weight multiplies the expert's
hidden activation before down_proj (equal by linearity to the reference's weighting of the
expert output; it saves passes over (S, H)). The sequence-level balance loss is DeepSeek-V2's
`seq_aux`.

Routed experts keep stacked weights (torchtitan style): `gate_up_proj` [E, 2I, H] (gate rows
first, then up) and `down_proj` [E, H, I]. Tokens are sorted by expert (stable argsort) and
computed by one of:
- "grouped_mm": torch's grouped GEMM (F.grouped_mm); fused kernels on Hopper/Blackwell.
- "loop":       one matmul per contiguous expert slice (one host sync for the group sizes).
- "padded_bmm": groups zero-padded to the largest group, two batched matmuls. Meant for
                Ampere (A100), where grouped_mm runs a per-expert loop with a host sync;
                it spends (E * max_group - S) extra rows of compute, bounded by the balance loss.
Training step of the full model at 8192 tokens on an H200 (bench/bench_decoder.py): grouped_mm
124 ms, padded_bmm 237 ms, loop 546 ms. Not measured on an A100.
"auto" picks grouped_mm on CUDA sm90+ with bf16, padded_bmm on other CUDA devices, and on
CPU grouped_mm when this torch build supports the dtype there (bf16 always; fp32 from
torch 2.15), else loop. DeepSpeed's Triton grouped GEMM is not used: the model packages
stay free of the training stack.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import DecoderConfig, MoEConfig


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """grouped_mm needs 16-byte aligned operands; parameters that are views into a flat
    buffer (DeepSpeed ZeRO-1 with DP > 1) can start at any element offset: copy those.
    Under torch.compile the pointer cannot be traced (a graph break per call); compiled graphs
    check their inputs' alignment themselves and copy misaligned ones."""
    if torch.compiler.is_compiling():
        return t
    return t if t.data_ptr() % 16 == 0 else t.clone()


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); no biases. The dense layer-0 MLP and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, init_std: float) -> None:
        super().__init__()
        self.init_std = init_std
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for lin in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(lin.weight, mean=0.0, std=self.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Greedy top-k gate: returns fp32 scores (N, E), weights (N, k) fp32 and indices (N, k)."""

    def __init__(self, hidden_size: int, moe: MoEConfig, init_std: float) -> None:
        super().__init__()
        self.top_k = moe.num_experts_per_tok
        self.norm_topk_prob = moe.norm_topk_prob
        self.scaling = moe.routed_scaling_factor
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(moe.n_routed_experts, hidden_size))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())  # (N, E) fp32
        scores = logits.softmax(dim=-1)
        weights, indices = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)  # (N, k)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return scores, weights * self.scaling, indices


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def grouped_mm_on_cpu(dtype: torch.dtype) -> bool:
    """Whether F.grouped_mm runs on CPU for `dtype`: bf16 always; fp32 was rejected up to
    torch 2.13 (engine_notes.md) and works in 2.15."""
    if not hasattr(F, "grouped_mm"):
        return False
    return dtype == torch.bfloat16 or (dtype == torch.float32 and _torch_version() >= (2, 15))


def select_experts_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Resolve "auto" (see the module docstring); validate explicit requests."""
    if requested == "grouped_mm" and not hasattr(F, "grouped_mm"):
        raise ValueError("experts_backend='grouped_mm' needs torch.nn.functional.grouped_mm (torch >= 2.10)")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        if major >= 9 and dtype == torch.bfloat16 and hasattr(F, "grouped_mm"):
            return "grouped_mm"
        return "padded_bmm"
    if device.type == "cpu" and grouped_mm_on_cpu(dtype):
        return "grouped_mm"
    return "loop"


class GroupedExperts(nn.Module):
    """E SwiGLU experts with stacked weights, computed on expert-sorted tokens."""

    def __init__(self, hidden_size: int, moe: MoEConfig, init_std: float) -> None:
        super().__init__()
        e, i = moe.n_routed_experts, moe.moe_intermediate_size
        self.num_experts = e
        self.intermediate_size = i
        self.backend = moe.experts_backend
        self.init_std = init_std
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(e, hidden_size, i))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.normal_(self.gate_up_proj, mean=0.0, std=self.init_std)
        nn.init.normal_(self.down_proj, mean=0.0, std=self.init_std)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, H); indices, weights (N, k) -> (N, H), the routing-weighted sum, in x's dtype
        (autocast's dtype while autocast is on)."""
        if torch.is_autocast_enabled(x.device.type):
            # fp32 master weights under bf16 autocast (the one-process trainer): compute in bf16,
            # which is what autocast does for the matmuls anyway; an fp32 x would pick the
            # padded/loop backends, whose group sizes cost a host sync (and a graph break) per layer
            x = x.to(torch.get_autocast_dtype(x.device.type))
        n, h = x.shape
        k = indices.shape[1]
        flat = indices.reshape(-1)  # (S,) with S = N*k, row-major over (token, slot)
        order = torch.argsort(flat, stable=True)  # (S,) slots sorted by expert
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=x.device)
        sizes = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device)
        sizes.scatter_add_(0, flat, torch.ones_like(flat))  # (E,) group sizes, no host sync
        x_sorted = _GatherTokens.apply(x, order, inverse, k)  # (S, H)
        w_sorted = weights.reshape(-1)[order].to(x.dtype)  # (S,)
        backend = select_experts_backend(self.backend, x.device, x.dtype)
        y_sorted = getattr(self, f"_run_{backend}")(x_sorted, sizes, w_sorted)  # (S, H), weighted
        y = _Unsort.apply(y_sorted, order, inverse).view(n, k, h)  # (N, k, H) back in slot order
        return y.sum(dim=1)  # (N, H), accumulated in fp32 by the reduction

    def _swiglu(self, gate_up: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up * routing weight; (rows, 2I) -> (rows, I). The weight is applied
        before down_proj, equal by linearity to weighting the expert output."""
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return F.silu(gate) * up * w.unsqueeze(-1)

    def _run_grouped_mm(
        self, x_sorted: torch.Tensor, sizes: torch.Tensor, w_sorted: torch.Tensor
    ) -> torch.Tensor:
        offs = sizes.cumsum(0).to(torch.int32)  # (E,) group ends
        w1 = _aligned(self.gate_up_proj.to(x_sorted.dtype)).transpose(-2, -1)  # (E, H, 2I)
        w2 = _aligned(self.down_proj.to(x_sorted.dtype)).transpose(-2, -1)  # (E, I, H)
        hidden = self._swiglu(F.grouped_mm(_aligned(x_sorted), w1, offs=offs), w_sorted)  # (S, I)
        return F.grouped_mm(_aligned(hidden), w2, offs=offs)  # (S, H)

    def _run_loop(self, x_sorted: torch.Tensor, sizes: torch.Tensor, w_sorted: torch.Tensor) -> torch.Tensor:
        outs = []
        split = sizes.tolist()  # one host sync
        for e, (chunk, w) in enumerate(zip(x_sorted.split(split), w_sorted.split(split))):
            if chunk.shape[0] == 0:
                continue
            hidden = self._swiglu(chunk @ self.gate_up_proj[e].to(chunk.dtype).t(), w)  # (n_e, I)
            outs.append(hidden @ self.down_proj[e].to(chunk.dtype).t())  # (n_e, H)
        return torch.cat(outs, dim=0)

    def _run_padded_bmm(
        self, x_sorted: torch.Tensor, sizes: torch.Tensor, w_sorted: torch.Tensor
    ) -> torch.Tensor:
        s, h = x_sorted.shape
        e = self.num_experts
        cap = int(sizes.max())  # one host sync
        starts = sizes.cumsum(0) - sizes  # (E,)
        expert_of = torch.repeat_interleave(torch.arange(e, device=x_sorted.device), sizes, output_size=s)
        slot = expert_of * cap + torch.arange(s, device=x_sorted.device) - starts[expert_of]  # (S,)
        padded = x_sorted.new_zeros(e * cap, h).index_copy(0, slot, x_sorted).view(e, cap, h)
        w_padded = w_sorted.new_zeros(e * cap).index_copy(0, slot, w_sorted).view(e, cap)
        gate_up = torch.bmm(padded, self.gate_up_proj.to(x_sorted.dtype).transpose(1, 2))  # (E, cap, 2I)
        hidden = self._swiglu(gate_up, w_padded)  # (E, cap, I)
        out = torch.bmm(hidden, self.down_proj.to(x_sorted.dtype).transpose(1, 2))  # (E, cap, H)
        return out.reshape(e * cap, h)[slot]  # (S, H)


class _GatherTokens(torch.autograd.Function):
    """x (N, H) -> x[order // k] (S, H). Backward sums the k copies of each token through a
    gather and a reduction: deterministic, and cheaper than the atomic index_put of autograd."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x[order // k]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        n = inverse.numel() // ctx.k
        return grad[inverse].view(n, ctx.k, -1).sum(dim=1), None, None, None  # (N, H)


class _Unsort(torch.autograd.Function):
    """y_sorted (S, H) -> y_sorted[inverse]; backward is the gather grad[order]."""

    @staticmethod
    def forward(ctx, y_sorted: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(order)
        return y_sorted[inverse]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (order,) = ctx.saved_tensors
        return grad[order], None, None


def balance_loss(
    scores: torch.Tensor,
    indices: torch.Tensor,
    batch: int,
    seq: int,
    moe: MoEConfig,
    token_mask: torch.Tensor | None,
) -> torch.Tensor:
    """DeepSeek-V2 expert balance loss * aux_loss_alpha (scores (N, E) fp32, indices (N, k)).

    seq_aux: per row, f_e = count_e / (n_tokens * k / E), P_e = mean score; sum_e f_e P_e,
    averaged over rows. Otherwise the same over all tokens of the batch. Tokens outside
    token_mask (padding) are left out; rows without real tokens do not count.
    """
    e, k = moe.n_routed_experts, moe.num_experts_per_tok
    mask = (
        torch.ones(batch, seq, device=scores.device)
        if token_mask is None
        else token_mask.to(device=scores.device, dtype=torch.float32)
    )  # (B, T)
    if not moe.seq_aux:
        mask, scores = mask.reshape(1, -1), scores.reshape(1, batch * seq, e)
        batch, seq = 1, batch * seq
    scores = scores.reshape(batch, seq, e)  # (B, T, E)
    n = mask.sum(dim=1)  # (B,)
    counts = torch.zeros(batch, e, device=scores.device)
    slot_mask = mask.repeat_interleave(k, dim=1)  # (B, T*k)
    counts.scatter_add_(1, indices.reshape(batch, seq * k), slot_mask)  # (B, E)
    freq = counts / (n * k / e).clamp(min=1e-12)[:, None]
    mean_score = (scores * mask[..., None]).sum(dim=1) / n.clamp(min=1.0)[:, None]  # (B, E)
    per_row = (freq * mean_score).sum(dim=1)  # (B,)
    has_tokens = (n > 0).float()
    return (per_row * has_tokens).sum() / has_tokens.sum().clamp(min=1.0) * moe.aux_loss_alpha


class MoE(nn.Module):
    """Router + routed experts + shared experts; returns (output, aux loss) and records load."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        assert config.moe is not None
        self.moe = config.moe
        std = config.initializer_range
        self.gate = Router(config.hidden_size, self.moe, std)
        self.experts = GroupedExperts(config.hidden_size, self.moe, std)
        shared = self.moe.n_shared_experts * self.moe.moe_intermediate_size
        self.shared_experts = SwiGLU(config.hidden_size, shared, std) if shared > 0 else None
        self.last_expert_counts: torch.Tensor | None = None  # (E,) int64, tokens per expert

    def init_weights(self) -> None:
        self.gate.init_weights()
        self.experts.init_weights()
        if self.shared_experts is not None:
            self.shared_experts.init_weights()

    def forward(
        self, x: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, h = x.shape
        flat = x.reshape(b * t, h)  # (N, H)
        scores, weights, indices = self.gate(flat)
        out = self.experts(flat, indices, weights).view(b, t, h)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        self._record_counts(indices, token_mask)
        if self.training and self.moe.aux_loss_alpha > 0:
            aux = balance_loss(scores, indices, b, t, self.moe, token_mask)
        else:
            aux = torch.zeros((), device=x.device, dtype=torch.float32)
        return out, aux

    @torch.no_grad()
    def _record_counts(self, indices: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        ones = torch.ones_like(indices)  # (N, k)
        if token_mask is not None:
            ones = ones * token_mask.reshape(-1, 1).to(ones.dtype)
        counts = torch.zeros(self.moe.n_routed_experts, dtype=torch.int64, device=indices.device)
        self.last_expert_counts = counts.scatter_add_(0, indices.reshape(-1), ones.reshape(-1))
