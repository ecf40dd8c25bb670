"""Exports of a fine-tune: the LoRA adapter alone, or the model merged into the released layout.

Adapter directory: peft's `adapter_config.json` + `adapter_model.safetensors` (LoRA factors and
any `modules_to_save` copies), the tokenizer files, and `dsocr_finetune.json` recording the
base checkpoint and the vocabulary size the adapter expects (a character vocabulary may have
been extended). `load_adapter(adapter_dir)` rebuilds the adapted model from the base.

Merged: W + (alpha / r) B A folded into every adapted weight (peft `merge_and_unload`), then
`pipeline.checkpoint_io.export_release` writes config.json + model.safetensors under the
release's key names + the tokenizer files, loadable by `load_any` / `import_release` like the
released checkpoint; with the release's modeling files copied in (`modeling_from`) also by
transformers' `trust_remote_code` loading, which config.json's `auto_map` points to.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.checkpoint_io import export_release, load_any
from pipeline.finetune.vocab import resize_vocab
from pipeline.model import DeepSeekOCR
from pipeline.tokenizer import OCRTokenizer, load_tokenizer

ADAPTER_META = "dsocr_finetune.json"


def save_adapter(
    peft_model, tokenizer: OCRTokenizer, out_dir: str | Path, *, base: str, meta: dict | None = None
) -> Path:
    """peft adapter files + tokenizer + dsocr_finetune.json (base path, vocabulary size)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out))
    tokenizer.save(out)
    inner = peft_model.get_base_model()
    record = {"base": str(base), "vocab_size": inner.decoder.config.vocab_size, **(meta or {})}
    (out / ADAPTER_META).write_text(json.dumps(record, indent=2) + "\n")
    return out


def load_adapter(
    adapter_dir: str | Path, *, base: str | Path | None = None, device: torch.device | str = "cpu"
) -> tuple[DeepSeekOCR, OCRTokenizer]:
    """The base checkpoint (`base`, else the one recorded at export) with the adapter applied (not merged)."""
    import peft

    adapter = Path(adapter_dir)
    meta_file = adapter / ADAPTER_META
    if not meta_file.is_file():
        raise ValueError(f"no {ADAPTER_META} in {adapter} (not a dsocr-finetune adapter directory)")
    meta = json.loads(meta_file.read_text())
    base_path = Path(base) if base is not None else Path(meta["base"])
    model, _ = load_any(base_path, device=device)
    resize_vocab(model, int(meta["vocab_size"]))
    peft.PeftModel.from_pretrained(model, str(adapter), is_trainable=False)  # injects in place
    return model.eval(), load_tokenizer(adapter)


def export_merged(
    peft_model_or_model,
    tokenizer: OCRTokenizer,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    modeling_from: str | Path | None = None,
) -> Path:
    """Fold the adapters into the weights (in place: the adapters are gone afterwards) and write
    a release-layout checkpoint with the tokenizer. A plain DeepSeekOCR (full fine-tune) is written as is.
    modeling_from: a released checkpoint directory whose modeling files (*.py) are copied in, so
    config.json's auto_map can name them (without, auto_map is left out)."""
    model = peft_model_or_model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if not isinstance(model, DeepSeekOCR):
        raise TypeError(f"expected a DeepSeekOCR or a peft model around one, got {type(model).__name__}")
    return export_release(model, tokenizer, out_dir, dtype=dtype, modeling_from=modeling_from)
