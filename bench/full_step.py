"""Benchmark: one full-model training step on one device (no pipeline), and its transformers peer.

The step: frozen SAM + compressor forward (no graph), CLIP + projector + decoder forward and
backward, gradient clipping, AdamW, on rows of Base-mode pages + text packed to `seq_len`
(bench/step_data.py). Variants, all bf16 parameters, one row per micro-batch:

- "LocalTrainer": the project's single-process loop (pipeline/train/loop.py) with the project's
  optimizer (pipeline/train/optim.py) fed with the same PackedBatches: today's training step.
- "sync-free": the same model forward (`DeepSeekOCR.forward`, which reads nothing back from the
  device: the collate precomputed counts, placeholder and label positions) in a step without
  host round trips: the batch copied one step ahead on a side stream, a fused AdamW that skips
  a non-finite step on the device (`found_inf`) instead of branching on a `.item()`.
- "sync-free + compile": additionally torch.compile'd decoder layers (compile_layers), SAM
  blocks and CLIP blocks (regional compilation).
- peer: the same harness with transformers' components where transformers has them:
  DeepSeek-OCR-2 SAM encoder (frozen) and DeepseekOcr2TextModel ('grouped_mm' experts, SDPA,
  packed rows from position_ids) + an lm_head; the CLIP + projector stay ours (transformers has
  no DeepSeek-OCR-1 CLIP fed with SAM features).

Each variant reports tokens/s (real, non-padding tokens), MFU against the measured matmul peak
from counted FLOPs (bench/measure.py), peak memory, host syncs in one step (torch's sync debug
mode) and the number of SAM forward calls per step (1 per view size = no recomputation).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench.measure import count_host_syncs, full_step_flops, peak_memory_gib, reset_peak_memory, sync
from bench.profiling import profile_step, render_summary, write_summary
from bench.step_data import Prefetcher, flop_inputs
from deepencoder import DeepEncoder
from pipeline.batch import PackedBatch
from pipeline.data.packing import IGNORE_INDEX
from pipeline.model import DeepSeekOCR
from pipeline.processing import normalize_pixels
from pipeline.train.optim import param_groups

LR, BETAS, WEIGHT_DECAY, GRAD_CLIP = 3e-5, (0.9, 0.95), 0.1, 1.0
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
RELEASE_IMAGE_TOKEN_ID = 128815  # `<image>` in the released tokenizer (architecture.md section 4)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Parameters to `dtype`, buffers untouched (RoPE's inv_freq stays fp32)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def label_loss(logits: torch.Tensor, b: PackedBatch) -> torch.Tensor:
    """Mean cross-entropy at the batch's precomputed label positions (no sync)."""
    picked = logits.flatten(0, 1).index_select(0, b.loss_positions)  # (N, V)
    total = F.cross_entropy(picked.float(), b.loss_targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / max(b.num_label_tokens, 1)


def scatter_images(embeds: torch.Tensor, table: torch.Tensor, b: PackedBatch) -> torch.Tensor:
    """(B, L, H) embeddings with the placeholders replaced by table[gather_index], in order."""
    if b.image_positions.numel() == 0:
        return embeds
    bsz, length, hidden = embeds.shape
    source = table[b.gather_index].to(embeds.dtype)  # (P, H)
    return (
        embeds.reshape(bsz * length, hidden)
        .index_copy(0, b.image_positions, source)
        .view(bsz, length, hidden)
    )


class PeerOCR(nn.Module):
    """transformers SAM (frozen) -> our CLIP + projector -> transformers text model + lm_head."""

    def __init__(self, encoder: DeepEncoder, sam: nn.Module, body: nn.Module, lm_head: nn.Linear) -> None:
        super().__init__()
        self.encoder, self.sam, self.body, self.lm_head = encoder, sam, body, lm_head

    def loss(self, b: PackedBatch) -> torch.Tensor:
        embeds = self.body.embed_tokens(b.input_ids)
        if b.image_positions.numel():
            dtype = self.lm_head.weight.dtype
            with torch.no_grad():
                feats = [
                    self.sam(pixel_values=normalize_pixels(p, dtype)).last_hidden_state
                    for p in b.pixels
                    if p.shape[0]
                ]
            flat = [self.encoder.clip_project(f).flatten(0, 1) for f in feats]  # (N*g*g, H) each
            special = torch.stack([self.encoder.image_newline, self.encoder.view_seperator])  # (2, H)
            embeds = scatter_images(embeds, torch.cat([*flat, special.to(flat[0].dtype)]), b)
        hidden = self.body(
            inputs_embeds=embeds, position_ids=b.position_ids, use_cache=False
        ).last_hidden_state
        return label_loss(self.lm_head(hidden), b)


def nonfinite_flag(loss: torch.Tensor) -> torch.Tensor:
    """The `found_inf` of torch's fused Adam/AdamW: 0-dim float32 on the loss's device, 1.0 when the
    loss is not finite. 0-dim, not shape [1]: after the fused kernel torch runs
    `_foreach_sub_(state_steps, [found_inf] * n)` on the 0-dim per-parameter `step` tensors, and an
    in-place subtraction of a [1] tensor from a [] tensor raises "output with shape [] doesn't
    match the broadcast shape [1]" (the H200 run's error; CPU fused AdamW takes the same path)."""
    return (~torch.isfinite(loss.detach())).to(torch.float32).reshape(())


class SyncFreeStep:
    """zero_grad, loss, backward, clip, fused AdamW step; the loss stays on the device.

    The same code on every device (fused AdamW exists for CPU and CUDA tensors), so the CPU smoke
    run exercises what the GPU run does: a non-finite loss skips the update and the step count
    inside the fused kernel (`found_inf`) instead of a `.item()` branch on the host.
    """

    def __init__(
        self, model: nn.Module, loss_fn: Callable[[PackedBatch], torch.Tensor], device: torch.device
    ):
        self.model, self.loss_fn, self.device = model, loss_fn, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        groups = param_groups(model, WEIGHT_DECAY)
        self.optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, fused=True)

    def __call__(self, b: PackedBatch) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)  # foreach where the device has it
        self.optimizer.found_inf = nonfinite_flag(loss)
        self.optimizer.step()
        return loss.detach()


def run_steps(step: Callable[[PackedBatch], torch.Tensor], data: Prefetcher, steps: int, warmup: int, device):
    """Mean step seconds over `steps` steps after `warmup` (one sync at each end), tokens, flops."""
    for _ in range(warmup):
        step(next(data))
    sync(device)
    reset_peak_memory(device)
    data.wait_s = 0.0
    batches, losses = [], []
    start = time.perf_counter()
    for _ in range(steps):
        b = next(data)
        losses.append(step(b))
        batches.append(b)
    sync(device)
    elapsed = time.perf_counter() - start
    return elapsed / steps, batches, float(torch.stack(losses).float().mean())


def count_sam_calls(model_sam: nn.Module, fn: Callable[[], object]) -> tuple[int, bool]:
    """SAM forward calls made by fn() and whether any SAM output carried an autograd graph."""
    calls, graph = [0], [False]

    def hook(_module, _inputs, output):
        calls[0] += 1
        out = output.last_hidden_state if hasattr(output, "last_hidden_state") else output
        graph[0] |= bool(out.requires_grad)

    handle = model_sam.register_forward_hook(hook)
    try:
        fn()
    finally:
        handle.remove()
    return calls[0], graph[0]


def summarize(
    name: str, step_s: float, batches: list[PackedBatch], flops_fn, peak_tflops: float, device
) -> dict:
    tokens = sum(b.num_tokens for b in batches) / len(batches)
    flops = sum(flops_fn(b)["total"] for b in batches) / len(batches)
    return {
        "variant": name,
        "step_ms": 1e3 * step_s,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / step_s,
        "tflops_per_step": flops / 1e12,
        "mfu": flops / step_s / (peak_tflops * 1e12) if peak_tflops > 0 else None,
        "peak_gib": peak_memory_gib(device),
    }


def measure_local_trainer(
    model: DeepSeekOCR,
    batches: list[PackedBatch],
    steps: int,
    warmup: int,
    device: torch.device,
    profile_path: Path | None,
) -> dict:
    """Today's loop (LocalTrainer + build_optimizer) on the same batches: mean step seconds and syncs."""
    import itertools
    import tempfile

    from pipeline.config import RunConfig
    from pipeline.train.loop import LocalTrainer
    from pipeline.train.optim import build_optimizer, build_scheduler

    run = RunConfig()
    run.parallel.dtype = "fp32"  # the model already holds bf16 parameters: no autocast on top
    run.parallel.micro_batch, run.parallel.global_batch = (
        batches[0].input_ids.shape[0],
        batches[0].input_ids.shape[0],
    )
    run.optim.lr, run.optim.grad_clip, run.optim.warmup_steps = LR, GRAD_CLIP, 0
    run.optim.schedule = "constant"
    run.train.log_every, run.train.save_every, run.train.eval_every = 10**9, 0, 0
    run.train.max_steps = warmup
    stamps: list[float] = []

    def data():
        for batch in itertools.cycle(batches):
            stamps.append(time.perf_counter())
            yield batch

    with tempfile.TemporaryDirectory() as tmp:
        run.train.out_dir = tmp
        optimizer = build_optimizer(param_groups(model, WEIGHT_DECAY), run.optim)
        scheduler = build_scheduler(optimizer, 10**6, run.optim)
        trainer = LocalTrainer(model, optimizer, scheduler, data(), run, device=device)
        trainer.train()  # warmup
        sync(device)
        reset_peak_memory(device)
        run.train.max_steps += steps
        begin = time.perf_counter()
        trainer.train()
        sync(device)
        step_s = (time.perf_counter() - begin) / steps
        peak = peak_memory_gib(device)
        run.train.max_steps += 1
        syncs = count_host_syncs(trainer.train, device)
        result = {"step_s": step_s, "host_syncs": syncs, "peak_gib": peak}
        if profile_path is not None:
            run.train.max_steps += 1
            result["profile"] = profile_step(trainer.train, profile_path, device)
        del trainer, optimizer, scheduler
    free(device)
    return result


@dataclass
class FullStepSettings:
    """What the full-step benchmark builds and runs. `rows` distinct batches are cycled; steps and
    warmup are multiples of `rows`, so every variant sees every batch equally often."""

    encoder: str = "full"
    decoder: str = "full"
    mode: str = "base"
    seq_len: int = 8192
    micro_batch: int = 1
    text_range: tuple[int, int] = (600, 1300)
    rows: int = 4
    steps: int = 8
    warmup: int = 4
    compile: bool = True
    compile_backend: str = "inductor"
    peer: bool = True
    local_trainer: bool = True

    def __post_init__(self) -> None:
        if self.compile_backend not in COMPILE_BACKENDS:
            raise ValueError(
                f"compile_backend must be one of {COMPILE_BACKENDS}, got {self.compile_backend!r}"
            )
        if self.rows < 1 or self.steps < 1 or self.warmup < 1:
            raise ValueError(
                f"rows, steps and warmup must be >= 1, got {self.rows}, {self.steps}, {self.warmup}"
            )
        if self.steps % self.rows or self.warmup % self.rows:
            raise ValueError(
                f"steps ({self.steps}) and warmup ({self.warmup}) must be multiples of rows ({self.rows})"
            )


def build_inputs(s: FullStepSettings) -> tuple[list[PackedBatch], int, int]:
    """The packed batches, the vocabulary size and the image token id for the presets."""
    from bench.step_data import make_batches, make_documents, render_views
    from decoder import decoder_config

    vocab = decoder_config(s.decoder).vocab_size
    image_token_id = RELEASE_IMAGE_TOKEN_ID if vocab > RELEASE_IMAGE_TOKEN_ID else vocab - 1
    views = render_views(s.mode, 4)
    per_doc = views[0].num_placeholders + s.text_range[1] + 8
    docs = make_documents(views, s.rows * s.micro_batch * (s.seq_len // per_doc + 2) + 16, text_range=s.text_range,
                          vocab_size=vocab, image_token_id=image_token_id)  # fmt: skip
    batches = make_batches(docs, s.seq_len, s.micro_batch, pad_id=1, image_token_id=image_token_id)
    if len(batches) < s.rows:
        raise ValueError(f"only {len(batches)} packed batches for rows={s.rows}")
    return batches[: s.rows], vocab, image_token_id


def _measure_variant(name, step, batches, s, device, peak, flops_fn, sam_module, profile_path):
    data = Prefetcher(batches, device)
    try:
        step_s, staged, loss = run_steps(step, data, s.steps, s.warmup, device)
        out = summarize(name, step_s, staged, flops_fn, peak, device)
        out["loss"] = loss
        out["data_wait_ms_per_step"] = 1e3 * data.wait_s / s.steps
        out["host_syncs"] = count_host_syncs(lambda: step(next(data)), device)
        calls, graph = count_sam_calls(sam_module, lambda: step(next(data)))
        out["sam_calls_per_step"], out["sam_graph"] = calls, graph
        out["view_groups_per_step"] = sum(1 for p in staged[-1].pixels if p.shape[0])
        if profile_path is not None:
            out["profile"] = profile_step(lambda: step(next(data)), profile_path, device)
    finally:
        data.close()
    return out


def measure_full_step(
    s: FullStepSettings, device: torch.device, peak_tflops: float, profile_dir: Path | None = None
) -> dict:
    """Run the variants of the module docstring; returns their figures and the consistency checks."""
    from bench.bench_decoder import oracle_model
    from bench.bench_sam import build_peer as build_peer_sam
    from pipeline.model import build_model

    dtype = torch.bfloat16
    batches, vocab, image_token_id = build_inputs(s)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = build_model(s.encoder, s.decoder, vocab, image_token_id=image_token_id)
    model.to_empty(device=device)
    model.init_weights()
    cast_parameters(model, dtype).train()
    model.encoder.freeze_sam()
    enc_cfg, dec_cfg = model.encoder.config, model.decoder.config
    flops_fn = lambda b: full_step_flops(enc_cfg, dec_cfg, *flop_inputs(b))  # noqa: E731
    prof = (
        (lambda name: profile_dir / f"trace_full_step_{name}.json.gz") if profile_dir else (lambda name: None)
    )
    result: dict = {
        "settings": {k: getattr(s, k) for k in s.__dataclass_fields__},
        "docs_per_row": sum(len(k) for b in batches for k in b.keys) / (len(batches) * s.micro_batch),
        "packing": sum(b.num_tokens for b in batches) / (len(batches) * batches[0].input_ids.numel()),
        "variants": {},
        "errors": {},
    }  # fmt: skip

    def attempt(name: str, fn: Callable[[], dict]) -> None:
        try:
            result["variants"][name] = fn()
        except Exception as error:  # reported in the table, the other variants still run
            result["errors"][name] = f"{type(error).__name__}: {error}"[:300]
        free(device)

    if s.peer:

        def peer_variant() -> dict:
            body = oracle_model(dec_cfg, device, dtype)
            head = nn.Linear(dec_cfg.hidden_size, vocab, bias=False, device=device, dtype=dtype)
            sam = build_peer_sam(enc_cfg.sam, model.encoder.sam_model, device, dtype)
            peer = PeerOCR(model.encoder, sam, body, head).train()
            step = SyncFreeStep(peer, peer.loss, device)
            try:
                return _measure_variant("peer", step, batches, s, device, peak_tflops, flops_fn, sam, None)
            finally:
                del step, peer, body, head, sam

        attempt("peer", peer_variant)

    if s.local_trainer:

        def local_variant() -> dict:
            lt = measure_local_trainer(model, batches, s.steps, s.warmup, device, prof("localtrainer"))
            out = summarize("LocalTrainer", lt["step_s"], batches, flops_fn, peak_tflops, device)
            out.update(host_syncs=lt["host_syncs"], peak_gib=lt["peak_gib"])
            if "profile" in lt:
                out["profile"] = lt["profile"]
            return out

        attempt("local_trainer", local_variant)

    def sync_free(name: str, profile_name: str | None) -> Callable[[], dict]:
        def run() -> dict:
            step = SyncFreeStep(model, lambda b: model(b).loss, device)
            try:
                path = prof(profile_name) if profile_name else None
                return _measure_variant(name, step, batches, s, device, peak_tflops, flops_fn,
                                        model.encoder.sam_model, path)  # fmt: skip
            finally:
                del step

        return run

    attempt("sync_free", sync_free("sync-free", None if s.compile else "sync_free"))
    if s.compile:
        model.compile_regions(s.compile_backend)
        attempt("sync_free_compiled", sync_free("sync-free + compile", "sync_free_compiled"))
    if profile_dir is not None:
        result["profile_summary"] = str(_write_profile_summary(result["variants"], profile_dir))
    return result


def _write_profile_summary(variants: dict, profile_dir: Path) -> Path:
    """profile_summary.txt beside the traces; the operator tables leave the result dict (JSON)."""
    blocks = []
    for v in variants.values():
        if "profile" in v:
            blocks.append(render_summary(v["variant"], v["profile"], v.get("host_syncs")))
            v["profile"].pop("table")
    return write_summary(profile_dir / "profile_summary.txt", blocks or ["no variant was profiled"])
