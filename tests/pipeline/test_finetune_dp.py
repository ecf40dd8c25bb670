"""Data-parallel LoRA fine-tune through DeepSpeed on 2 CPU ranks (gloo): both ranks train, the
replicas stay identical (checked inside the run), rank 0 evaluates, and its adapter and merged
exports load back with the adapters changed from their zero initialisation."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint_io import save_checkpoint
from pipeline.data.testing import write_ocr_shards
from pipeline.finetune.export import load_adapter
from pipeline.model import build_model
from pipeline.tokenizer import build_char_tokenizer

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EXTENSIONS = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "dsocr-torch-extensions"))
WORKER = """
import json, sys
from omegaconf import OmegaConf
from pipeline.config import to_run_config
from pipeline.finetune.distributed import run_finetune_dp

spec = json.load(open(sys.argv[1]))
job = run_finetune_dp(to_run_config(OmegaConf.create(spec)))
if job is not None:
    out = {"steps": job.steps, "first": job.first_loss, "last": job.last_loss,
           "cer": {k: r.raw.corpus_cer for k, r in job.reports.items()},
           "adapter": str(job.adapter_dir), "merged": str(job.merged_dir)}
    open(spec["train"]["out_dir"] + "/result.json", "w").write(json.dumps(out))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_lora_finetune(tmp_path):
    tok = build_char_tokenizer("abcdefghijklmnopqrstuvwxyz0123456789 _")
    torch.manual_seed(0)
    base = build_model("debug", "debug", tok.vocab_size, image_token_id=tok.image_id, hidden_size=64)
    save_checkpoint(base, tok, tmp_path / "base")
    target = write_ocr_shards(
        tmp_path / "target", num_shards=2, per_shard=8, size=(48, 32), prefix="tgt", answer_chars=5
    )
    replay = write_ocr_shards(
        tmp_path / "replay", num_shards=2, per_shard=8, size=(48, 32), prefix="rep", answer_chars=5
    )
    out = tmp_path / "run"
    spec = {
        "model": {"init_from": str(tmp_path / "base")},
        "data": {"kind": "webdataset", "seq_len": 256, "pack": False,
                 "sources": [{"name": "target", "shards": target[0], "modes": {"debug": 1.0}}]},
        "parallel": {"dp": 2, "micro_batch": 2, "global_batch": 8, "zero_stage": 1},
        "optim": {"lr": 1e-2, "warmup_steps": 0, "schedule": "constant"},
        "finetune": {"lora": {"r": 4, "alpha": 8}, "val": target[1], "eval_samples": 4,
                     "replay": {"share": 0.25, "shards": replay[0], "modes": {"debug": 1.0}, "val": replay[1]}},
        "eval": {"mode": "debug", "batch_size": 4, "max_new_tokens": 6},
        "train": {"max_steps": 3, "log_every": 1, "out_dir": str(out), "device": "cpu"},
    }  # fmt: skip
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    port, procs = free_port(), []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu",
               "TORCH_EXTENSIONS_DIR": str(EXTENSIONS), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
               "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
        log = open(tmp_path / f"rank{rank}.log", "w")  # noqa: SIM115 (held by the child)
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(spec_path)], env=env, stdout=log,
                                      stderr=log, cwd=REPO))  # fmt: skip
    try:
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = "\n".join((tmp_path / f"rank{r}.log").read_text()[-3000:] for r in range(2))
    assert codes == [0, 0], logs

    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 3 and result["first"] > 0 and result["last"] > 0
    assert set(result["cer"]) == {"target_before", "target_after", "original_before", "original_after"}
    model, _ = load_adapter(result["adapter"])
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and max(float(p.abs().max()) for p in lora_b) > 0  # trained away from B = 0
    assert (Path(result["merged"]) / "config.json").is_file()
