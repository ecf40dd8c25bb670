"""`dsocr-bench`: every benchmark row in one run, peers measured in the same process.

Rows: (a) decoder training step, (b) frozen SAM + compressor forward, (c) full-model training
step through the project's Trainer (bench/full_step.py), (d) data loading per CPU core. Each
section runs inside its own try/except: a failure becomes a FAILED row with the error, the run
goes on. Optional extras (compiled peers) are skipped when the time budget runs low; the wall
time of every section is printed and kept. bench_results.json and PERFORMANCE.md (the README
fragment) are (re)written to --out after every section. `BenchSettings.quick` uses the debug
presets on CPU and takes the GPU run's code paths (compiled variants with aot_eager).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.finetune_step import FinetuneStepSettings, measure_finetune
from bench.full_step import VARIANTS, FullStepSettings, measure_full_step
from bench.measure import free, machine_info, matmul_peak_tflops, mfu, peak_memory_gib, reset_peak_memory
from bench.report import (
    Row,
    Target,
    join_notes,
    render_text,
    status_row,
    wall_time,
    with_peer,
    write_result,
)
from pipeline.processing import PAPER_MODES

SECTIONS = ("decoder", "sam", "full", "finetune", "data")  # table order
# run order: the full step (the headline, its compile the most expensive) gets the time budget first;
# data reads its result
RUN_ORDER = ("full", "decoder", "sam", "finetune", "data")
# transformers DeepSeek-OCR-2 image processor settings that produce the same views as our modes
PEER_PROCESSOR = {
    "tiny": {"crop_to_patches": False, "tile_size": 512},
    "small": {"crop_to_patches": False, "tile_size": 640},
    "base": {"crop_to_patches": False, "tile_size": 1024},
    "large": {"crop_to_patches": False, "tile_size": 1280},
    "gundam": {"crop_to_patches": True, "tile_size": 640, "min_patches": 2, "max_patches": 9},
}
FOOTNOTES = [
    "ratio = ours / peer, both measured in this run on this machine; higher is better for every unit.",
    "MFU = counted model FLOPs per second / the bf16 matmul peak measured in this run (decoder training "
    "6 * N_active * T + causal attention; frozen SAM forward on padded windows; CLIP + projector 3 x forward: "
    "the formulas in bench/measure.py).",
    "Decoder peer: transformers DeepseekOcr2TextModel (experts 'grouped_mm', SDPA) + an lm_head, same sizes, "
    "same initial weights, same loss and AdamW; tokens/s over batch x seq.",
    "SAM peer: transformers DeepseekOcr2SamVisionEncoder (downsample_channels [512, 1024], SDPA), our weights "
    "copied in; forward under no_grad (SAM is frozen in stage 2); 'max rel diff' compares the two outputs.",
    "Full step: every variant is trained by the project's Trainer over pipeline/train/local_engine.py "
    "(bf16 autocast, fp32 masters, fused AdamW, grad clip 1.0, constant LR, frozen SAM, one packed row per step): 'trainer' eager, "
    "'trainer + compile' with parallel.compile_layers; the peer is the same Trainer and engine with "
    "transformers' SAM and text model swapped in (CLIP + projector ours), from our initial weights. tokens/s "
    "counts real tokens; 'syncs' = synchronising CUDA calls in one step (where: the JSON's details); 'SAM "
    "calls' = SAM forwards per step vs view-size groups; 'peak' = peak memory of the timed steps (chunked "
    "loss head), 'full logits' = one more eager step with loss_chunk_tokens=0.",
    "Fine-tune step: ours = peft LoRA (r16/alpha16, decoder q,k,v,o,gate,up,down; routed experts out) or full "
    "(SAM frozen) on DeepSeekOCR with activation checkpointing, in the Trainer; peer = the released model's own "
    "Hugging Face code + peft (transformers 4.46.x, its own process, bf16 weights, eager attention), from a "
    "release-layout export of the same weights, same LoRA modules (equal trainable counts); one Gundam page per "
    "row. Inference: generate (batch 8, no-repeat) vs the release's infer() loop, same new tokens per page.",
    "Data: samples/s on one core (torch threads 1) through the real StreamingLoader (decode, mode transform "
    "to uint8 views, tokenize, pack) on rendered 1024 px text pages; peer = PNG decode + transformers "
    "DeepseekOcr2ImageProcessor with the same view sizes (images only, normalised float32 views).",
]


@dataclass
class BenchSettings:
    device: str = "cuda"
    quick: bool = False
    only: tuple[str, ...] = SECTIONS
    out: Path = Path("dsocr-bench-out")
    budget_s: float = 330.0
    command: str = "dsocr-bench"
    release_code: str = ""  # the finetune rows' peer: the released model's modeling files
    peer_path: str = ""  # and its package path (transformers 4.46.x + peft)
    # derived in __post_init__; each section takes its own sizes from `quick`
    compile_backend: str = field(init=False)
    full: FullStepSettings = field(init=False)
    finetune: FinetuneStepSettings = field(init=False)

    def __post_init__(self) -> None:
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"--device must be cuda or cpu, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but CUDA is not available: use --device cpu --quick")
        unknown = set(self.only) - set(SECTIONS)
        if unknown or not self.only:
            raise ValueError(f"--only takes a comma list of {','.join(SECTIONS)}, got {','.join(self.only)}")
        self.out = Path(self.out)
        # every compiled variant runs everywhere; off CUDA with aot_eager (graphs traced, forward and
        # backward, no kernels generated), so the CPU smoke run takes the GPU run's code paths
        self.compile_backend = "inductor" if self.device == "cuda" else "aot_eager"
        if not self.quick:
            self.full = FullStepSettings(compile_backend=self.compile_backend)
        else:
            # the GPU run's variants: peer, trainer, trainer + compile
            self.full = FullStepSettings(encoder="debug", decoder="debug", mode="debug", seq_len=256,
                                         text_range=(20, 60), rows=2, steps=2, warmup=2,
                                         compile_backend=self.compile_backend)  # fmt: skip
        sizes = {} if not self.quick else dict(encoder="debug", decoder="debug", mode="debug-gundam", page=(128, 181),
                                               text_range=(20, 40), batch_sizes=(1, 2), steps=1, warmup=1,
                                               infer_pages=3, infer_batch=2, infer_tokens=5)  # fmt: skip
        self.finetune = FinetuneStepSettings(
            release_code=self.release_code, peer_path=self.peer_path, **sizes
        )


class Run:
    """Shared state of one benchmark run: settings, device, measured peak, clock, details."""

    def __init__(self, s: BenchSettings) -> None:
        self.s = s
        self.device = torch.device(s.device)
        self.start = time.perf_counter()
        self.details: dict = {}
        self.section_wall_s: dict[str, float] = {}
        self.peak_tflops, self.peak_note = matmul_peak_tflops(self.device, s.quick)

    def time_left(self) -> float:
        return self.s.budget_s - (time.perf_counter() - self.start)

    def guarded(self, title: str, unit: str, fn) -> list[Row]:
        """fn(self) -> list[Row]; on an exception one FAILED row instead (the other sections still run)."""
        t0 = time.perf_counter()
        try:
            rows = fn(self)
        except Exception as error:
            rows = [status_row(title, "all variants", unit, error)]
        for row in rows:
            row.extra.setdefault("wall_s", round(time.perf_counter() - t0, 1))
        torch._dynamo.reset()  # compiled graphs of one section never count against the next one's cache
        free(self.device)
        print(render_text(rows), flush=True)
        return rows


def _pct(fraction: float | None) -> float | None:
    return None if fraction is None else 100 * fraction


# ----------------------------------------------------------------------------- (a) decoder


def decoder_rows(run: Run) -> list[Row]:
    from bench.bench_decoder import OracleWithHead, OursWrapped, oracle_model, time_training
    from decoder import DecoderModel, decoder_config

    s, device, dtype = run.s, run.device, torch.bfloat16
    preset, seq_len, steps, warmup = ("debug", 256, 3, 1) if s.quick else ("full", 8192, 10, 3)
    cfg = decoder_config(preset, max_position_embeddings=max(seq_len, 8192))
    fpt = cfg.matmul_flops_per_token(seq_len, causal=True)
    torch.manual_seed(0)
    with torch.device("meta"):
        ours = DecoderModel(cfg)
    ours.to_empty(device=device)
    ours.init_weights()
    for p in ours.parameters():
        p.data = p.data.to(dtype)
    init = {k: v.detach().to("cpu", copy=True) for k, v in ours.state_dict().items()}
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len), device=device)
    labels = torch.roll(ids, -1, dims=1)

    def timed(model) -> dict:
        reset_peak_memory(device)
        times, loss = time_training(model, ids, labels, steps, warmup, device)
        step = sorted(times)[len(times) // 2]
        return {"tokens_per_s": seq_len / step, "ms": 1e3 * step, "first_loss": loss,
                "peak_gib": peak_memory_gib(device), "mfu": mfu(seq_len / step * fpt, run.peak_tflops)}  # fmt: skip

    res = {"ours": timed(OursWrapped(ours.train()))}
    ours.load_state_dict(init)
    ours.compile_layers(backend=s.compile_backend)
    res["ours_compiled"] = timed(OursWrapped(ours))
    ours = None
    free(device)
    body = oracle_model(cfg, device, dtype)
    body.load_state_dict({k: v for k, v in init.items() if k != "lm_head.weight"}, strict=True)
    peer = OracleWithHead(body, cfg.vocab_size, cfg.hidden_size, device, dtype).train()
    peer.lm_head.weight.data.copy_(init["lm_head.weight"])
    res["peer"] = timed(peer)
    if run.time_left() > 200:
        body.load_state_dict({k: v for k, v in init.items() if k != "lm_head.weight"}, strict=True)
        peer.lm_head.weight.data.copy_(init["lm_head.weight"])
        for layer in body.layers:
            layer.compile(backend=s.compile_backend)
        res["peer_compiled"] = timed(peer)
    run.details["decoder"] = res
    section = f"decoder step ({preset}, 1x{seq_len}, bf16)"
    target = Target("ratio", 1.5, "vs transformers eager") if not s.quick else Target()

    def row(name: str, key: str) -> Row:
        o, p = res[key], res["peer"]
        notes = join_notes(with_peer("MFU", _pct(o["mfu"]), _pct(p["mfu"]), ".1f", "%"),
                           with_peer("", o["ms"], p["ms"], ".1f", " ms/step"),
                           with_peer("first loss", o["first_loss"], p["first_loss"], ".4f"),
                           with_peer("peak", o["peak_gib"], p["peak_gib"], ".1f", " GiB"))  # fmt: skip
        return Row(section, name, "tokens/s", o["tokens_per_s"], p["tokens_per_s"], "transformers eager", target,
                   notes, extra=o)  # fmt: skip

    compiled = row("ours + compile_layers", "ours_compiled")
    # the compiled peer is a second peer of the same figure: a note, not a row of its own
    if "peer_compiled" in res:
        p = res["peer_compiled"]
        compiled.notes += (f"; vs transformers + compile {p['tokens_per_s']:,.0f} tokens/s: "
                           f"{res['ours_compiled']['tokens_per_s'] / p['tokens_per_s']:.2f}x")  # fmt: skip
    else:
        compiled.notes += "; transformers + compile skipped (time budget)"
    return [row("ours eager", "ours"), compiled]


# ----------------------------------------------------------------------------- (b) SAM


def sam_rows(run: Run) -> list[Row]:
    from bench.bench_sam import measure_sam
    from deepencoder.config import encoder_config

    s = run.s
    cfg = encoder_config("full" if not s.quick else "debug").sam
    sizes, batch, iters, warmup = ([128, 64], 2, 2, 1) if s.quick else ([1024, 640], 16, 10, 3)
    res = measure_sam(cfg, sizes, batch, run.device, warmup=warmup, iters=iters,
                      compile_ours=run.time_left() > 150, compile_backend=s.compile_backend)  # fmt: skip
    run.details["sam"] = {str(k): v for k, v in res.items()}
    target = Target("ratio", 2.0, "vs transformers") if not s.quick else Target()
    rows = []
    for side, r in res.items():
        section = f"frozen SAM + compressor fwd ({side} px, batch {batch}, bf16)"
        peer = r["peer"]
        for key, name in (("ours", "ours eager"), ("ours_compiled", "ours + compiled blocks")):
            if key not in r:
                continue
            o = r[key]
            notes = join_notes(with_peer("MFU", _pct(mfu(o["images_per_s"] * r["flops_per_image"], run.peak_tflops)),
                                         None, ".1f", "%"),
                               with_peer("", o["ms"], peer["ms"], ".1f", " ms/batch"),
                               f"max rel diff {r['max_rel_diff']:.1e}",
                               with_peer("peak", o["peak_gib"], peer["peak_gib"], ".1f", " GiB"))  # fmt: skip
            rows.append(Row(section, name, "images/s", o["images_per_s"], peer["images_per_s"], "transformers",
                            target, notes))  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- (c) full step


def full_rows(run: Run) -> list[Row]:
    s = run.s
    settings = s.full
    if settings.compile and run.time_left() < 120:
        settings = dataclasses.replace(settings, compile=False)  # compiling takes ~1-2 min: budget
    res = measure_full_step(settings, run.device, run.peak_tflops)
    run.details["full"] = res
    f = s.full
    section = f"full step ({f.encoder}+{f.decoder}, {f.mode} pages in 1x{f.seq_len} rows, bf16)"
    targets = {"trainer": Target(), "trainer_compiled": Target()}
    if not s.quick:
        targets = {"trainer": Target("ratio", 1.45, "vs peer"),
                   "trainer_compiled": Target("ratio", 2.0, "vs peer; stretch 65,000 tokens/s, MFU >= 40%")}  # fmt: skip
    peer = res["variants"].get("peer", {})
    peer_name = (
        "transformers SAM + decoder" if peer else "peer failed: " + res["errors"].get("peer", "not run")
    )
    rows = []
    for key in ("trainer", "trainer_compiled"):
        name, target = VARIANTS[key], targets[key]
        if key in res["errors"]:
            rows.append(status_row(section, name, "tokens/s", res["errors"][key], target))
            continue
        v = res["variants"].get(key)
        if v is None:
            continue
        graph = "graph!" if v["sam_graph"] else "no graph"
        notes = join_notes(with_peer("MFU", _pct(v["mfu"]), _pct(peer.get("mfu")), ".1f", "%"),
                           f"{v['step_ms']:.0f} ms/step", f"{v['tflops_per_step']:.1f} TFLOP/step",
                           with_peer("first loss", v["first_loss"], peer.get("first_loss"), ".4f"),
                           with_peer("syncs", v["host_syncs"], peer.get("host_syncs"), "d"),
                           f"SAM calls {v['sam_calls_per_step']}/{v['view_groups_per_step']} groups, {graph}",
                           with_peer("peak", v["peak_gib"], peer.get("peak_gib"), ".1f", " GiB"),
                           with_peer("full logits", v["peak_gib_full_logits"], None, ".1f", " GiB"))  # fmt: skip
        rows.append(Row(section, name, "tokens/s", v["tokens_per_s"], peer.get("tokens_per_s"), peer_name, target,
                        notes, extra=v))  # fmt: skip
    if s.full.compile and not settings.compile:
        rows.append(status_row(section, VARIANTS["trainer_compiled"], "tokens/s", "time budget",
                               targets["trainer_compiled"], status="skipped"))  # fmt: skip
    if rows:
        rows[-1].notes += f"; {res['docs_per_row']:.1f} pages/row, packing {res['packing']:.3f}"
    return rows


# ----------------------------------------------------------------------------- (d) fine-tuning


def finetune_rows(run: Run) -> list[Row]:
    f = run.s.finetune
    res = measure_finetune(f, run.device)
    run.details["finetune"] = res
    section = f"fine-tune step ({f.encoder}+{f.decoder}, {f.mode} pages, one per row, bf16)"
    peer_name = f"release code + peft (transformers {res.get('peer_transformers', '?')})"
    rows = []
    for key, ours in res["ours"].items():
        if key == "infer":
            continue
        lora = key.startswith("lora")
        name = f"{'LoRA r' + str(f.lora_r) if lora else 'full'}, batch {key.split('_b')[1]}"
        target = Target("ratio", 2.0, "vs peer; peak <= 0.5x") if lora and not run.s.quick else Target()
        peer = res["peer"].get(key, {})
        notes = join_notes(with_peer("samples/s", ours["samples_per_s"], peer.get("samples_per_s"), ".2f"),
                           with_peer("peak", ours["peak_gib"], peer.get("peak_gib"), ".1f", " GiB"),
                           with_peer("first loss", ours["first_loss"], peer.get("first_loss"), ".4f"),
                           with_peer("trainable", ours["trainable"], peer.get("trainable"), ",d"),
                           f"{ours['step_ms']:.0f} ms/step")  # fmt: skip
        if lora and "merged_logits_max_abs_diff" in res and key == f"lora_b{f.batch_sizes[0]}":
            notes += (f"; merged export in the release's code: max |logit diff| {res['merged_logits_max_abs_diff']:.3g}"
                      f" (max |logit| {res['merged_logits_max_abs']:.3g})")  # fmt: skip
        why = res["errors"].get(f"peer_{key}") or res["errors"].get("peer")
        rows.append(Row(section, name, "tokens/s", ours["tokens_per_s"], peer.get("tokens_per_s"),
                        peer_name if peer else f"peer not run: {why}", target, notes, extra=ours))  # fmt: skip
    ours, peer = res["ours"].get("infer"), res["peer"].get("infer", {})
    if ours:
        why = res["errors"].get("peer_infer") or res["errors"].get("peer")
        notes = join_notes(with_peer("new tokens/page", ours["new_tokens_per_page"], peer.get("new_tokens_per_page"), ".0f"),
                           with_peer("peak", ours["peak_gib"], peer.get("peak_gib"), ".1f", " GiB"))  # fmt: skip
        rows.append(Row(f"inference ({f.mode} pages, {f.infer_tokens} new tokens each, greedy + no-repeat)",
                        f"generate, batch {ours['batch']}", "pages/s", ours["pages_per_s"], peer.get("pages_per_s"),
                        "release infer(), one page a call" if peer else f"peer not run: {why}", Target(), notes,
                        extra=ours))  # fmt: skip
    for key, error in res["errors"].items():
        if key.startswith("ours_"):
            rows.append(status_row(section, key.removeprefix("ours_"), "tokens/s", error))
    return rows


# ----------------------------------------------------------------------------- (e) data


def data_rows(run: Run) -> list[Row]:
    import random

    from bench.bench_data import end_to_end, render_page
    from pipeline.data.testing import sample_members, write_tar
    from pipeline.tokenizer import build_tokenizer

    s = run.s
    modes, samples, page_count = (("tiny", "base"), 6, 2) if s.quick else (PAPER_MODES, 48, 16)
    full = run.details.get("full", {})
    rates = [
        v["tokens_per_s"] / v["tokens_per_step"] for k, v in full.get("variants", {}).items() if k != "peer"
    ]
    pages_per_s = max(rates) * full["docs_per_row"] * s.full.micro_batch if rates else None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = random.Random(0)
        pages = [render_page(rng, 1024) for _ in range(page_count)]
        tokenizer = build_tokenizer([text for _, text in pages] * 4, vocab_size=2000)
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            members = []
            for i, (png, text) in enumerate(pages):
                members += sample_members(f"page{i:04d}", text, png)
            shard = str(write_tar(Path(tmp) / "bench-000000.tar", members))
            for mode in modes:
                ours, packing = end_to_end(shard, tokenizer, mode, samples, 8192)
                peer = _peer_processor_rate(mode, [png for png, _ in pages], samples)
                target = Target("value", 30, "GPU feed") if mode == "base" and not s.quick else Target()
                notes = f"end to end incl. tokenize + pack (packing {packing:.3f}); peer: images only"
                if mode == s.full.mode and pages_per_s:
                    notes += f"; the fastest full step eats {pages_per_s:.0f} pages/s = {pages_per_s / ours:.1f} cores"
                rows.append(Row(f"data loading ({mode})", "StreamingLoader, 1 core", "samples/s/core", ours, peer,
                                "transformers image processor", target, notes))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return rows


def _peer_processor_rate(mode: str, pngs: list[bytes], samples: int) -> float:
    """PNG decode + transformers' DeepSeek-OCR-2 image processor with our mode's view sizes, per core."""
    import io

    from PIL import Image
    from transformers.models.deepseek_ocr2.image_processing_deepseek_ocr2 import DeepseekOcr2ImageProcessor

    proc = DeepseekOcr2ImageProcessor(size={"height": 1024, "width": 1024}, **PEER_PROCESSOR[mode])
    decode = lambda png: Image.open(io.BytesIO(png)).convert("RGB")  # noqa: E731
    proc(images=[decode(pngs[0])], return_tensors="pt")  # warm-up
    start = time.perf_counter()
    for i in range(samples):
        proc(images=[decode(pngs[i % len(pngs)])], return_tensors="pt")
    return samples / (time.perf_counter() - start)


# ----------------------------------------------------------------------------- the run

ROWS = {
    "decoder": ("decoder step", "tokens/s", decoder_rows),
    "sam": ("frozen SAM + compressor fwd", "images/s", sam_rows),
    "full": ("full step", "tokens/s", full_rows),
    "finetune": ("fine-tune step", "tokens/s", finetune_rows),
    "data": ("data loading", "samples/s/core", data_rows),
}


def _table_order(by_section: dict[str, list[Row]]) -> list[Row]:
    return [row for section in SECTIONS for row in by_section.get(section, [])]


def _result(run: Run, by_section: dict[str, list[Row]], machine: dict) -> dict:
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": run.s.command,
        "quick": run.s.quick,
        "machine": machine,
        "peak_tflops": run.peak_tflops,
        "peak_note": run.peak_note,
        "wall_s": time.perf_counter() - run.start,
        "section_wall_s": run.section_wall_s,
        "rows": [r.to_dict() for r in _table_order(by_section)],
        "details": run.details,
        "footnotes": FOOTNOTES,
    }


def run_suite(s: BenchSettings) -> dict:
    """Run the selected sections; returns the result dict written to --out (JSON + PERFORMANCE.md),
    which is also rewritten after every section (a run killed from outside keeps what it measured)."""
    s.out.mkdir(parents=True, exist_ok=True)
    run = Run(s)
    machine = machine_info(run.device)
    where = (
        f"{machine['device_name']} (single-GPU rows on the first visible GPU)"
        if s.device == "cuda"
        else "CPU"
    )
    print(f"dsocr-bench: {where}, quick={s.quick}, sections {','.join(s.only)}; "
          f"measured bf16 matmul peak {run.peak_tflops:.1f} TFLOP/s", flush=True)  # fmt: skip
    by_section: dict[str, list[Row]] = {}
    for section in RUN_ORDER:
        if section in s.only:
            title, unit, fn = ROWS[section]
            t0 = time.perf_counter()
            by_section[section] = run.guarded(title, unit, fn)
            run.section_wall_s[section] = round(time.perf_counter() - t0, 1)
            print(f"[dsocr-bench] {section}: {run.section_wall_s[section]:.0f} s "
                  f"(run {time.perf_counter() - run.start:.0f} s)", flush=True)  # fmt: skip
            write_result(_result(run, by_section, machine), s.out)
    result = _result(run, by_section, machine)
    json_path, md_path = write_result(result, s.out)
    print("\n" + render_text(_table_order(by_section)))
    print(f"\nwall time: {wall_time(result)}")
    print(f"wrote {json_path} and {md_path}", flush=True)
    return result
