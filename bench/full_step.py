"""Benchmark: the project's trainer on one device, full model, and the transformers peer in the same harness.

Every variant is trained by `pipeline.train.trainer.Trainer` over `LocalEngine` (side-stream
prefetch, fused AdamW skipping a non-finite step on the device, figures read one step later),
fed from a cycle of prebuilt PackedBatches (Base pages + text packed into `seq_len` rows,
bench/step_data.py), parallel.dtype=bf16 (fp32 masters, bf16 autocast), AdamW, grad clip 1.0,
constant LR, SAM frozen. Variants: "trainer" (`local_trainer(DeepSeekOCR)`, eager), "trainer +
compile" (parallel.compile_layers: SAM blocks, CLIP layers, decoder layers), "peer" (`PeerOCR`
in the same LocalEngine + Trainer: transformers' DeepSeek-OCR-2 SAM, frozen, and
DeepseekOcr2TextModel + an lm_head; CLIP + projector stay ours, transformers has no
DeepSeek-OCR-1 CLIP fed with SAM features), from our initial weights so first losses agree.

Each variant: `warmup` steps, `steps` timed steps between two device syncs, tokens/s over real
tokens, MFU from counted FLOPs (bench/measure.py), peak memory, the first step's loss, then one
step with the host syncs located (torch's sync debug mode, CUDA only) and the SAM forwards
counted (1 per view size = no recomputation); the eager trainer takes one more step with full
logits (`loss_chunk_tokens=0`) for its peak memory next to the chunked loss head's.
"""

from __future__ import annotations

import copy
import itertools
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench.measure import (
    free,
    full_step_flops,
    host_sync_sites,
    mfu,
    peak_memory_gib,
    reset_peak_memory,
    sync,
)
from bench.report import error_text
from bench.step_data import flop_inputs
from deepencoder import DeepEncoder
from pipeline.batch import PackedBatch
from pipeline.config import OptimConfig, ParallelConfig, TrainConfig
from pipeline.data.packing import IGNORE_INDEX
from pipeline.model import DeepSeekOCR, ModelOutput, validate_compile_options
from pipeline.processing import normalize_pixels
from pipeline.train.local_engine import LocalEngine, local_trainer
from pipeline.train.trainer import Trainer

LR, GRAD_CLIP = 3e-5, 1.0
RELEASE_IMAGE_TOKEN_ID = 128815  # `<image>` in the released tokenizer (architecture.md section 4)
VARIANTS = {"trainer": "trainer", "trainer_compiled": "trainer + compile", "peer": "peer"}


def label_loss(logits: torch.Tensor, b: PackedBatch) -> torch.Tensor:
    """Mean cross-entropy at the batch's precomputed label positions (no sync)."""
    picked = logits.flatten(0, 1).index_select(0, b.loss_positions)  # (N, V)
    total = F.cross_entropy(picked.float(), b.loss_targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / max(b.num_label_tokens, 1)


class PeerOCR(nn.Module):
    """transformers SAM (frozen) -> our CLIP + projector -> transformers text model + lm_head.
    forward(PackedBatch) -> ModelOutput (aux_loss 0: the transformers model returns none). The image
    table and the embedding merge are DeepSeekOCR's: they read only `encoder` and
    `decoder.embed_tokens`, which the transformers text model has too."""

    image_table = DeepSeekOCR.image_table
    merge = DeepSeekOCR.merge

    def __init__(self, encoder: DeepEncoder, sam: nn.Module, decoder: nn.Module, lm_head: nn.Linear) -> None:
        super().__init__()
        self.encoder, self.sam, self.decoder, self.lm_head = encoder, sam, decoder, lm_head

    def forward(self, b: PackedBatch) -> ModelOutput:
        table = None
        if b.image_positions.numel():
            dtype = self.lm_head.weight.dtype
            with torch.no_grad():
                feats = [self.sam(pixel_values=normalize_pixels(p, dtype)).last_hidden_state
                         for p in b.pixels if p.shape[0]]  # fmt: skip
            table = self.image_table([self.encoder.clip_project(f) for f in feats])
        embeds = self.merge(b.input_ids, table, b.image_positions, b.gather_index)
        hidden = self.decoder(inputs_embeds=embeds, position_ids=b.position_ids, use_cache=False)
        loss = label_loss(self.lm_head(hidden.last_hidden_state), b)
        return ModelOutput(loss, loss, torch.zeros((), device=loss.device), None, b.num_label_tokens, None)


def build_peer(model: DeepSeekOCR, device: torch.device) -> PeerOCR:
    """The peer of `model` with its weights copied in (SAM, CLIP + projector, text model, lm_head),
    fp32 masters as ours, in train mode."""
    from bench.bench_decoder import oracle_model
    from bench.bench_sam import build_peer as build_peer_sam

    dtype, dec_cfg = torch.float32, model.decoder.config
    text = model.decoder.state_dict()
    body = oracle_model(dec_cfg, device, dtype)
    body.load_state_dict({k: v for k, v in text.items() if k != "lm_head.weight"}, strict=True)
    head = nn.Linear(dec_cfg.hidden_size, dec_cfg.vocab_size, bias=False, device=device, dtype=dtype)
    head.weight.data.copy_(text["lm_head.weight"])
    encoder = copy.deepcopy(model.encoder)
    sam = build_peer_sam(encoder.config.sam, encoder.sam_model, device, dtype)
    return PeerOCR(encoder, sam, body, head).train()


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

    def __post_init__(self) -> None:
        validate_compile_options(self.compile, self.compile_backend)
        if self.rows < 1 or self.steps < 1 or self.warmup < 1:
            raise ValueError(
                f"rows, steps, warmup must be >= 1, got {self.rows}, {self.steps}, {self.warmup}"
            )
        if self.steps % self.rows or self.warmup % self.rows:
            raise ValueError(
                f"steps ({self.steps}) and warmup ({self.warmup}) must be multiples of rows={self.rows}"
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


def build_ours(s: FullStepSettings, vocab: int, image_token_id: int, device: torch.device) -> DeepSeekOCR:
    """Our model for the presets on `device` (meta build, `init_weights` under seed 0), SAM frozen."""
    from pipeline.model import build_model

    torch.manual_seed(0)
    with torch.device("meta"):
        model = build_model(s.encoder, s.decoder, vocab, image_token_id=image_token_id)
    model.to_empty(device=device)
    model.init_weights()
    model.encoder.freeze_sam()
    return model


def build_trainer(model: nn.Module, batches: list[PackedBatch], s: FullStepSettings, device: torch.device,
                  train: TrainConfig, *, compile_layers: bool) -> Trainer:  # fmt: skip
    """`local_trainer` for our model; for the peer (no DeepSeekOCR layout for `model_flops`, which
    only the Trainer's log records read) the same LocalEngine + Trainer without a FLOP count."""
    micro = batches[0].input_ids.shape[0]
    optim = OptimConfig(lr=LR, warmup_steps=0, schedule="constant", grad_clip=GRAD_CLIP)
    parallel = ParallelConfig(micro_batch=micro, global_batch=micro, dtype="bf16", compile_layers=compile_layers,
                              compile_backend=s.compile_backend)  # fmt: skip
    if isinstance(model, DeepSeekOCR):
        return local_trainer(model, itertools.cycle(batches), train=train, optim=optim, parallel=parallel,
                             seq_len=s.seq_len, device=device)  # fmt: skip
    engine = LocalEngine(model, optim, max_steps=train.max_steps, grad_accum=1, device=device, dtype=parallel.dtype,
                         out_dir=train.out_dir, keep_last=1)  # fmt: skip
    return Trainer(engine, train, itertools.cycle(batches))


def measure_variant(name: str, make: Callable[[TrainConfig], Trainer], sam: nn.Module, batches: list[PackedBatch],
                    s: FullStepSettings, device: torch.device, peak_tflops: float, flops_fn,
                    full_logits_of: DeepSeekOCR | None = None) -> dict:  # fmt: skip
    """warmup + timed steps of the trainer `make` builds, then one step with syncs and SAM calls
    counted, and with `full_logits_of` (the model it trains) one step more with full logits."""
    with tempfile.TemporaryDirectory() as tmp:
        train = TrainConfig(max_steps=s.warmup + s.steps + 2, log_every=10**9, out_dir=tmp, resume=False)
        trainer = make(train)

        def run(steps: int):
            train.max_steps = trainer.step + steps
            return trainer.train(final_checkpoint=False)

        first_loss = run(s.warmup).losses[0]
        sync(device)
        reset_peak_memory(device)
        start = time.perf_counter()
        timed = run(s.steps)
        sync(device)
        step_s = (time.perf_counter() - start) / s.steps
        peak = peak_memory_gib(device)
        calls, graph = [0], [False]

        def hook(_module, _inputs, output):
            calls[0] += 1
            graph[0] |= bool(getattr(output, "last_hidden_state", output).requires_grad)

        handle = sam.register_forward_hook(hook)
        try:
            sites = host_sync_sites(lambda: run(1), device)
        finally:
            handle.remove()
        peak_full_logits = None
        if full_logits_of is not None:
            chunk, full_logits_of.loss_chunk_tokens = full_logits_of.loss_chunk_tokens, 0
            reset_peak_memory(device)
            try:  # full logits may not fit where the chunked head does: the figure is then absent
                run(1)
                peak_full_logits = peak_memory_gib(device)
            except torch.OutOfMemoryError:
                free(device)
            finally:
                full_logits_of.loss_chunk_tokens = chunk
    tokens = sum(b.num_tokens for b in batches) / len(batches)
    flops = sum(flops_fn(b) for b in batches) / len(batches)
    last = batches[(s.warmup + s.steps) % len(batches)]
    return {"variant": name, "step_ms": 1e3 * step_s, "tokens_per_step": tokens, "tokens_per_s": tokens / step_s,
            "tflops_per_step": flops / 1e12, "mfu": mfu(flops / step_s, peak_tflops), "peak_gib": peak,
            "peak_gib_full_logits": peak_full_logits, "first_loss": first_loss,
            "loss": sum(timed.losses) / max(len(timed.losses), 1), "bad_steps": timed.bad_steps,
            "host_syncs": None if sites is None else sum(sites.values()),
            "sync_sites": None if sites is None else dict(sites.most_common(8)),
            "sam_calls_per_step": calls[0], "sam_graph": graph[0],
            "view_groups_per_step": sum(1 for p in last.pixels if p.shape[0])}  # fmt: skip


def measure_full_step(s: FullStepSettings, device: torch.device, peak_tflops: float) -> dict:
    """Run the variants of the module docstring (peer first): their figures, and the error of any that failed."""
    batches, vocab, image_token_id = build_inputs(s)
    model = build_ours(s, vocab, image_token_id, device)
    enc_cfg, dec_cfg = model.encoder.config, model.decoder.config
    flops_fn = lambda b: full_step_flops(enc_cfg, dec_cfg, *flop_inputs(b))  # noqa: E731
    result: dict = {"settings": {k: getattr(s, k) for k in s.__dataclass_fields__},
                    "docs_per_row": sum(len(k) for b in batches for k in b.keys) / (len(batches) * s.micro_batch),
                    "packing": sum(b.num_tokens for b in batches) / (len(batches) * batches[0].input_ids.numel()),
                    "variants": {}, "errors": {}}  # fmt: skip

    def attempt(key: str, make, sam: nn.Module, full_logits_of: DeepSeekOCR | None = None) -> None:
        try:
            result["variants"][key] = measure_variant(VARIANTS[key], make, sam, batches, s, device, peak_tflops,
                                                      flops_fn, full_logits_of)  # fmt: skip
        except Exception as error:  # reported in the table, the other variants still run
            result["errors"][key] = error_text(error)
        free(device)

    peer = build_peer(model, device)
    make_peer = lambda train, m=peer: build_trainer(m, batches, s, device, train, compile_layers=False)  # noqa: E731
    attempt("peer", make_peer, peer.sam)
    del peer, make_peer
    free(device)
    for key, compiled in (("trainer", False), ("trainer_compiled", True)):
        if compiled and not s.compile:
            continue
        make = lambda train, c=compiled: build_trainer(model, batches, s, device, train, compile_layers=c)  # noqa: E731
        attempt(key, make, model.encoder.sam_model, None if compiled else model)
    return result
