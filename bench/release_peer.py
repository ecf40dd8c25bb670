"""The peers' fine-tuning stack in its own process: the released model's own Hugging Face code
(modeling_deepseekocr.py and its siblings beside the weights, `trust_remote_code`; it needs
transformers 4.46.x) + peft, on the batches bench/finetune_step.py wrote. It imports nothing of
this repository, so its package path can hold that transformers without touching ours:

    PYTHONPATH=<site with transformers 4.46.3 + peft>:<repo> python -m bench.release_peer JOB.json

JOB.json: {"model": dir (+ tokenizer files), "batches": file.pt, "out": file.json, "runs": [{"name",
"method" (lora | full), "batch" (key of the file's batch lists), "warmup", "steps", "lr", "lora":
{"r", "alpha", "targets" (regex)}}], "logits": {"model": dir (fp32), "batch": key, "positions":
[...], "out": file.pt} or null, "infer": {"pages": [png, ...], "prompt", "max_new_tokens",
"output_path"} or null}. Each run loads the model afresh (bf16 weights, as the release's README
loads them; eager attention: flash-attn is not on the image), trains with torch AdamW and grad
clip 1.0 (the HF Trainer's default), and records tokens/s, samples/s, peak memory and the first
step's loss; `infer` times the release's own infer() loop. Without CUDA (a check of the harness
only, no figure to quote) the release's `.cuda()` calls are made no-ops.
"""

from __future__ import annotations

import json
import sys
import time

import torch


def load(model_dir: str, device: torch.device, dtype: torch.dtype = torch.bfloat16):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True, torch_dtype=dtype,
                                      use_safetensors=True, low_cpu_mem_usage=True)  # fmt: skip
    return model.to(device)


def release_inputs(batch: dict, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The release's forward arguments: per image (tiles or a zero tile, global view), normalised
    as its BasicImageTransform does (mean 0.5, std 0.5), and the crop grid (w, h) per image."""

    def norm(pixels: torch.Tensor) -> torch.Tensor:
        return ((pixels.to(device).float() / 255.0 - 0.5) / 0.5).to(dtype)

    images = []
    for tiles, global_view in batch["images"]:
        side = batch["tile_side"]
        patches = torch.zeros(1, 3, side, side, dtype=dtype, device=device) if tiles is None else norm(tiles)
        images.append((patches, norm(global_view[None])))
    ids = batch["input_ids"].to(device)
    return {"input_ids": ids, "attention_mask": batch["attention_mask"].to(device), "images": images,
            "images_seq_mask": ids == batch["image_token_id"],
            "images_spatial_crop": torch.tensor(batch["crops"], dtype=torch.long)}  # fmt: skip


def train_run(spec: dict, job: dict, batches: dict, device: torch.device) -> dict:
    model = load(job["model"], device)
    if spec["method"] == "lora":
        import peft

        lora = spec["lora"]
        config = peft.LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                                 target_modules=lora["targets"], bias="none")  # fmt: skip
        model = peft.get_peft_model(model, config)
    else:  # full: all but SAM (the release runs SAM, CLIP and the projector under no_grad anyway)
        for name, param in model.named_parameters():
            param.requires_grad_("sam_model" not in name)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    data = batches[spec["batch"]]
    inputs = [release_inputs(b, device) for b in data]
    labels = [b["labels"].to(device) for b in data]

    def step(i: int) -> float:
        k = i % len(inputs)
        loss = model(**inputs[k], labels=labels[k]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    first = float(step(0))
    for i in range(1, spec["warmup"]):
        step(i)
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(spec["warmup"], spec["warmup"] + spec["steps"]):
        last = step(i)
    if cuda:
        torch.cuda.synchronize(device)
    step_s = (time.perf_counter() - start) / spec["steps"]
    tokens = sum(int(b["attention_mask"].sum()) for b in data) / len(data)
    rows = data[0]["input_ids"].shape[0]
    result = {"name": spec["name"], "method": spec["method"], "trainable": trainable, "step_ms": 1e3 * step_s,
              "tokens_per_s": tokens / step_s, "samples_per_s": rows / step_s, "first_loss": first,
              "last_loss": float(last), "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None}  # fmt: skip
    return result  # the model and optimizer go with this frame; main() empties the CUDA cache


def logits_run(spec: dict, batches: dict, device: torch.device) -> None:
    """fp32 logits of the model in spec["model"] (an fp32 export: the comparison is then exact
    up to kernel order, not bf16 rounding) at spec["positions"] of one page."""
    model = load(spec["model"], device, torch.float32).eval()
    batch = batches[spec["batch"]][0]
    with torch.no_grad():
        logits = model(**release_inputs(batch, device, torch.float32)).logits
    torch.save(logits[0, spec["positions"]].float().cpu(), spec["out"])


def infer_run(spec: dict, job: dict, device: torch.device) -> dict:
    """The release's own `infer()` (its preprocessing, Gundam crops, bf16 autocast, HF generate with
    its no-repeat rule), one page per call as its README runs it; `generate` is held to
    spec["max_new_tokens"] new tokens (the release asks for 8192)."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(job["model"])
    model = load(job["model"], device).eval()  # bf16: infer() casts its views to bf16 itself
    generate, lengths = model.generate, []

    def held(input_ids, *args, **kwargs):  # N new tokens, counted from generate's own output
        out = generate(input_ids, *args, **{**kwargs, "max_new_tokens": spec["max_new_tokens"]})
        lengths.append(out.shape[-1] - input_ids.shape[-1])
        return out

    model.generate = held
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for page in spec["pages"]:
        model.infer(tokenizer, prompt=spec["prompt"], image_file=page, output_path=spec["output_path"],
                    base_size=1024, image_size=640, crop_mode=True, eval_mode=True)  # fmt: skip
    if cuda:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    return {"pages_per_s": len(spec["pages"]) / elapsed, "new_tokens_per_page": sum(lengths) / len(lengths),
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None, "batch": 1}  # fmt: skip


def main(argv: list[str]) -> int:
    with open(argv[0]) as f:
        job = json.load(f)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        # the release's forward moves a mask with .cuda()
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
    batches = torch.load(job["batches"], weights_only=False)
    results, errors = [], {}
    for spec in job["runs"]:
        try:
            results.append(train_run(spec, job, batches, device))
        except Exception as error:  # the row reports it; the other runs still go
            errors[spec["name"]] = f"{type(error).__name__}: {error}"[:500]
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if job.get("logits"):
        try:
            logits_run(job["logits"], batches, device)
        except Exception as error:
            errors["logits"] = f"{type(error).__name__}: {error}"[:500]
    infer = None
    if job.get("infer"):
        try:
            infer = infer_run(job["infer"], job, device)
        except Exception as error:
            errors["infer"] = f"{type(error).__name__}: {error}"[:500]
    import transformers

    out = {"runs": results, "infer": infer, "errors": errors, "transformers": transformers.__version__}
    with open(job["out"], "w") as f:
        json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
