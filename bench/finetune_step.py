"""Benchmark: fine-tuning the full model in Gundam mode, ours vs the peers' own stack, same weights,
same samples, same LoRA settings.

Ours: `DeepSeekOCR` adapted as `dsocr-finetune` adapts it (pipeline.finetune.lora: peft LoRA on the
decoder's q,k,v,o,gate,up,down = attention, dense MLP and shared experts; or full: CLIP, projector,
embedding, decoder, lm_head, SAM frozen), activation checkpointing on (the presets'
model.gradient_checkpointing), trained by the project's Trainer over LocalEngine (bf16 autocast over
fp32 weights, fused AdamW, grad clip 1.0). Peer: the released model's Hugging Face code + peft
(bench/release_peer.py) in its own process, with its own package path (transformers 4.46.x), from a
release-layout export of our initial weights; its LoRA targets are the same modules by the
release's names (the routed experts excluded on both sides), checked by the trainable counts.

Batches: rendered text pages, portrait (1024 x 1448), through the real Gundam transform; text ids
random (no tokenizer of the full vocabulary here); one page per row, rows padded to the longest,
as the presets train (data.pack=false). Also: our merged export (fp32, after the LoRA steps) is
loaded by the release's code, which must give our fp32 logits on one page (max abs difference).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.full_step import RELEASE_IMAGE_TOKEN_ID
from bench.measure import free, peak_memory_gib, reset_peak_memory, sync
from bench.report import error_text
from pipeline.batch import Example, PackedBatch
from pipeline.config import OptimConfig, ParallelConfig, TrainConfig
from pipeline.data.packing import collate_unpacked
from pipeline.finetune.config import LoraSpec
from pipeline.finetune.lora import apply_lora, set_trainable, trainable_summary
from pipeline.model import DeepSeekOCR
from pipeline.prompts import PROMPTS
from pipeline.train.local_engine import local_trainer

LR = 1e-4
PROMPT = PROMPTS["free_ocr"]  # the prompt the release's README fine-tunes and reads with
FULL_COMPONENTS = ["clip", "projector", "embed", "decoder", "lm_head"]  # experiment=finetune_full
# the release's names of our default LoRA targets: attention, the dense layer-0 MLP, the shared experts
PEER_LORA_TARGETS = (
    r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(shared_experts\.)?(gate|up|down)_proj)"
)


@dataclass
class FinetuneStepSettings:
    encoder: str = "full"
    decoder: str = "full"
    decoder_overrides: dict = field(default_factory=dict)  # e.g. fewer layers for a CPU check of the harness
    mode: str = "gundam"
    page: tuple[int, int] = (1024, 1448)  # a portrait page: 2 x 3 Gundam tiles
    text_range: tuple[int, int] = (600, 900)  # answer tokens per page (a page of text)
    batch_sizes: tuple[int, ...] = (1, 8)
    full_batch: int = 1  # full fine-tuning: this batch only (0: none)
    steps: int = 4
    warmup: int = 2
    infer_pages: int = 8  # inference: pages decoded in batches of infer_batch (ours), one by one (peer)
    infer_batch: int = 8
    infer_tokens: int = 256  # new tokens per page (the random model never emits EOS)
    lora_r: int = 16
    lora_alpha: float = 16.0
    release_code: str = ""  # the released model's directory of *.py (modeling_deepseekocr.py, ...)
    peer_path: str = ""  # prepended to the peer process's PYTHONPATH (transformers 4.46.x + peft)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.warmup < 1 or not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"steps, warmup and batch sizes must be >= 1, got {self.steps}, {self.warmup}, "
                             f"{self.batch_sizes}")  # fmt: skip
        if self.release_code and not any(Path(self.release_code).glob("modeling_*.py")):
            raise ValueError(
                f"--release-code {self.release_code} holds no modeling_*.py (the released model's folder)"
            )


def vocab_size(s: FinetuneStepSettings) -> int:
    from decoder import decoder_config

    return s.decoder_overrides.get("vocab_size", decoder_config(s.decoder).vocab_size)


def bench_tokenizer(vocab_size: int):
    """Letters, space and the special tokens, `<image>` at the release's id (its infer() writes
    that id itself) when the vocabulary
    reaches it (else the last id), every other id a filler: a tokenizer.json that both our loader
    and transformers' PreTrainedTokenizerFast read, with the ids the release's infer() assumes."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from pipeline.tokenizer import BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN, UNK_TOKEN, OCRTokenizer

    image_id = RELEASE_IMAGE_TOKEN_ID if vocab_size > RELEASE_IMAGE_TOKEN_ID else vocab_size - 1
    vocab = {
        t: i
        for i, t in enumerate((BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, *"abcdefghijklmnopqrstuvwxyz \n."))
    }
    vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), image_id)})
    vocab[IMAGE_TOKEN] = image_id
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tokenizer.add_special_tokens([BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN])
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return OCRTokenizer(tokenizer)


def build_model(s: FinetuneStepSettings, image_token_id: int, device: torch.device) -> DeepSeekOCR:
    """The same initial weights on every call (seed 0). The EOS row of the lm_head is zero, so
    greedy decoding of the random model never stops early (its top logit is positive): the
    inference rows time a fixed number of new tokens on both sides."""
    from pipeline.model import build_model as build

    torch.manual_seed(0)
    overrides = {k: v for k, v in s.decoder_overrides.items() if k != "vocab_size"}
    with torch.device("meta"):
        model = build(s.encoder, s.decoder, vocab_size(s), image_token_id=image_token_id, **overrides)
    model.to_empty(device=device)
    model.init_weights()
    with torch.no_grad():
        model.decoder.lm_head.weight[1].zero_()  # EOS = id 1 in every tokenizer here
    return model


def render_pages(s: FinetuneStepSettings, count: int) -> list:
    """`count` rendered text pages (PIL, `s.page` px): the same pages on every call."""
    import random

    from bench.bench_data import render_page
    from data_tools.images import load_rgb

    rng = random.Random(0)
    return [load_rgb(render_page(rng, s.page[0])[0]).resize(s.page) for _ in range(count)]


def build_docs(s: FinetuneStepSettings, vocab: int, image_token_id: int) -> list[Example]:
    from bench.step_data import make_documents
    from pipeline.processing import process_image

    views = [process_image(p, s.mode) for p in render_pages(s, 4)]
    return make_documents(views, 2 * max(s.batch_sizes), text_range=s.text_range, vocab_size=vocab,
                          image_token_id=image_token_id)  # fmt: skip


def peer_batch(docs: list[Example], b: PackedBatch, image_token_id: int) -> dict:
    """One padded batch in the release's forward arguments (pixels still uint8)."""
    images = [(v.tiles, v.global_view) for d in docs for v in d.images]
    tile = next((v.tiles.shape[-1] for d in docs for v in d.images if v.tiles is not None), 640)
    return {"input_ids": b.input_ids, "labels": b.labels, "attention_mask": (b.doc_ids >= 0).long(),
            "images": images, "crops": [list(v.grid) for d in docs for v in d.images], "tile_side": tile,
            "image_token_id": image_token_id}  # fmt: skip


def measure_ours(model: DeepSeekOCR, batches: list[PackedBatch], s: FinetuneStepSettings,
                 device: torch.device) -> dict:  # fmt: skip
    model.set_gradient_checkpointing(True)
    trainable, total = trainable_summary(model)
    micro = batches[0].input_ids.shape[0]
    optim = OptimConfig(lr=LR, warmup_steps=0, schedule="constant", weight_decay=0.0, grad_clip=1.0)
    parallel = ParallelConfig(micro_batch=micro, global_batch=micro, dtype="bf16")
    with tempfile.TemporaryDirectory() as tmp:
        train = TrainConfig(max_steps=s.warmup + s.steps, log_every=10**9, out_dir=tmp, resume=False)
        reset_peak_memory(device)
        trainer = local_trainer(model, itertools.cycle(batches), train=train, optim=optim, parallel=parallel,
                                seq_len=batches[0].input_ids.shape[1], device=device)  # fmt: skip
        train.max_steps = s.warmup
        first = trainer.train(final_checkpoint=False).losses[0]
        sync(device)
        start = time.perf_counter()
        train.max_steps = s.warmup + s.steps
        timed = trainer.train(final_checkpoint=False)
        sync(device)
        step_s = (time.perf_counter() - start) / s.steps
    tokens = sum(b.num_tokens for b in batches) / len(batches)
    return {"trainable": trainable, "total": total, "step_ms": 1e3 * step_s, "tokens_per_s": tokens / step_s,
            "samples_per_s": micro / step_s, "first_loss": first, "last_loss": timed.losses[-1],
            "peak_gib": peak_memory_gib(device), "tokens_per_step": tokens}  # fmt: skip


def measure_ours_infer(pngs: list[Path], tok, s: FinetuneStepSettings, device: torch.device) -> dict:
    """`dsocr-infer`'s path on the page files: decode + Gundam views + batched greedy `generate`
    (no-repeat rule on), the model in bf16 on CUDA (fp32 on CPU)."""
    from data_tools.images import load_rgb
    from pipeline.generation import generate
    from pipeline.processing import process_image

    model = build_model(s, tok.image_id, device).eval()
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    reset_peak_memory(device)
    sync(device)
    start, lengths = time.perf_counter(), []
    for i in range(0, len(pngs), s.infer_batch):
        chunk = pngs[i : i + s.infer_batch]
        images = [[process_image(load_rgb(p), s.mode)] for p in chunk]
        out = generate(model, tok, images, [PROMPT] * len(chunk), max_new_tokens=s.infer_tokens)
        lengths += [len(r.token_ids) for r in out]
    sync(device)
    elapsed = time.perf_counter() - start
    return {"pages_per_s": len(pngs) / elapsed, "new_tokens_per_page": sum(lengths) / len(lengths),
            "peak_gib": peak_memory_gib(device), "batch": s.infer_batch}  # fmt: skip


def run_peer(job: dict, s: FinetuneStepSettings, tmp: Path) -> dict:
    (tmp / "job.json").write_text(json.dumps(job))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (s.peer_path, str(Path(__file__).parents[1])) if p),
    }
    proc = subprocess.run([sys.executable, "-m", "bench.release_peer", str(tmp / "job.json")], env=env,
                          capture_output=True, text=True, timeout=1800)  # fmt: skip
    if proc.returncode != 0 or not Path(job["out"]).is_file():
        raise RuntimeError(f"peer process failed (rc {proc.returncode}): {proc.stderr[-1500:]}")
    return json.loads(Path(job["out"]).read_text())


def measure_finetune(s: FinetuneStepSettings, device: torch.device) -> dict:
    """Ours (LoRA at every batch size, full at `full_batch`), then the peer process on the same
    batches, then the merged-export logits check; errors are reported per variant."""
    from pipeline.checkpoint_io import export_release

    vocab = vocab_size(s)
    tok = bench_tokenizer(vocab)
    docs = build_docs(s, vocab, tok.image_id)
    sizes = {f"lora_b{b}": b for b in s.batch_sizes}
    if s.full_batch:
        sizes[f"full_b{s.full_batch}"] = s.full_batch
    grouped = {k: [docs[i * b : (i + 1) * b] for i in range(2)] for k, b in sizes.items()}
    batches = {
        k: [collate_unpacked(g, tok.pad_id, tok.image_id) for g in groups] for k, groups in grouped.items()
    }
    checked = f"lora_b{s.batch_sizes[0]}"  # its merged export is the one the release's code loads
    one_docs = grouped[checked][0][:1]
    one = collate_unpacked(one_docs, tok.pad_id, tok.image_id)  # the page of the logits check
    positions = list(range(0, one.input_ids.shape[1], 16))
    result: dict = {"settings": {k: getattr(s, k) for k in s.__dataclass_fields__}, "ours": {}, "peer": {},
                    "errors": {}, "tokens_per_row": sum(len(d) for d in docs) / len(docs)}  # fmt: skip
    ours_logits = None
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        peer_ready = bool(s.release_code)
        if peer_ready:
            export_release(build_model(s, tok.image_id, device), tok, tmp / "base", dtype=torch.bfloat16,
                           modeling_from=s.release_code)  # fmt: skip
            free(device)
        for key in sizes:
            try:
                model = build_model(s, tok.image_id, device)
                if key.startswith("lora"):
                    peft_model = apply_lora(model, LoraSpec(r=s.lora_r, alpha=s.lora_alpha))
                else:
                    set_trainable(model, FULL_COMPONENTS)
                result["ours"][key] = measure_ours(model, batches[key], s, device)
                if key == checked and peer_ready:
                    # the merged export for the logits check, in fp32: exact, not bf16-close
                    merged = peft_model.merge_and_unload().float().eval()
                    export_release(
                        merged, tok, tmp / "merged", dtype=torch.float32, modeling_from=s.release_code
                    )
                    with torch.no_grad():
                        logits = merged(one.to(device), return_logits=True).logits[0].float()
                    ours_logits = logits[positions].cpu()
            except Exception as error:
                result["errors"][f"ours_{key}"] = error_text(error)
            model = peft_model = merged = None
            free(device)
        pngs = []
        for i, page in enumerate(render_pages(s, s.infer_pages)):
            pngs.append(tmp / f"page{i:03d}.png")
            page.save(pngs[-1])
        try:
            result["ours"]["infer"] = measure_ours_infer(pngs, tok, s, device)
        except Exception as error:
            result["errors"]["ours_infer"] = error_text(error)
        free(device)
        if not peer_ready:
            result["errors"]["peer"] = "no --release-code (the released model's modeling files)"
            return result
        payload = {k: [peer_batch(g, b, tok.image_id) for g, b in zip(grouped[k], batches[k], strict=True)]
                   for k in sizes}  # fmt: skip
        payload["one"] = [peer_batch(one_docs, one, tok.image_id)]
        torch.save(payload, tmp / "batches.pt")
        lora = {"r": s.lora_r, "alpha": s.lora_alpha, "targets": PEER_LORA_TARGETS}
        runs = [{"name": k, "method": k.split("_")[0], "batch": k, "warmup": s.warmup, "steps": s.steps, "lr": LR,
                 "lora": lora} for k in sizes]  # fmt: skip
        logits = None
        if ours_logits is not None:
            logits = {"model": str(tmp / "merged"), "batch": "one", "out": str(tmp / "peer_logits.pt"),
                      "positions": positions}  # fmt: skip
        infer = {"pages": [str(p) for p in pngs], "prompt": PROMPT, "max_new_tokens": s.infer_tokens,
                 "output_path": str(tmp / "infer_out")}  # fmt: skip
        job = {"model": str(tmp / "base"), "batches": str(tmp / "batches.pt"), "out": str(tmp / "peer.json"),
               "runs": runs, "logits": logits, "infer": infer}  # fmt: skip
        try:
            peer = run_peer(job, s, tmp)
            result["peer"] = {r["name"]: r for r in peer["runs"]}
            if peer.get("infer"):
                result["peer"]["infer"] = peer["infer"]
            result["errors"].update({f"peer_{k}": v for k, v in peer["errors"].items()})
            result["peer_transformers"] = peer["transformers"]
            if ours_logits is not None and (tmp / "peer_logits.pt").is_file():
                theirs = torch.load(tmp / "peer_logits.pt")
                result["merged_logits_max_abs_diff"] = float((theirs - ours_logits).abs().max())
                result["merged_logits_max_abs"] = float(ours_logits.abs().max())
        except Exception as error:
            result["errors"]["peer"] = error_text(error)
    return result
