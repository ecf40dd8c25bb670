"""Launch N CPU ranks of tests/parallel/pp_worker.py with torchrun's environment (gloo, DS_ACCELERATOR=cpu)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("pp_worker.py")
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 _"
EXTENSIONS = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "dsocr-torch-extensions"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A guard against hung ranks, not a speed check: the first launch on a fresh machine also builds
# DeepSpeed's CPU extensions, and a loaded CI machine is slow. DSOCR_LAUNCH_TIMEOUT_S overrides it.
LAUNCH_TIMEOUT_S = float(os.environ.get("DSOCR_LAUNCH_TIMEOUT_S", 1200))


def launch(spec: dict, world_size: int, work: Path, *, timeout: float = LAUNCH_TIMEOUT_S) -> list[dict]:
    """Run `world_size` ranks on `spec`; returns each rank's result dict (rank order)."""
    work.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "world_size": world_size, "result": str(work / "result")}
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "DS_ACCELERATOR": "cpu",
            "TORCH_EXTENSIONS_DIR": str(EXTENSIONS),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
            "CUDA_VISIBLE_DEVICES": "",
        }
        log = open(work / f"rank{rank}.log", "w")  # noqa: SIM115 (held by the child until it exits)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), str(spec_path)], env=env, stdout=log, stderr=log, cwd=REPO
            )
        )
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(codes):
        logs = "\n".join(
            f"--- rank {r}\n" + (work / f"rank{r}.log").read_text()[-3000:] for r in range(world_size)
        )
        raise AssertionError(f"ranks exited with {codes}\n{logs}")
    return [json.loads((work / f"result.rank{r}.json").read_text()) for r in range(world_size)]


def debug_model_and_shards(work: Path):
    """The tokenizer, 4 x 16 synthetic OCR shards and the seeded debug model the ranks start from."""
    import torch

    from pipeline.data.testing import write_ocr_shards
    from pipeline.model import build_model
    from pipeline.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer(ALPHABET)
    shards = write_ocr_shards(work / "shards", num_shards=4, per_shard=16)
    torch.manual_seed(0)
    model = build_model(
        "debug",
        "debug",
        tok.vocab_size,
        image_token_id=tok.image_id,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
    )
    return tok, shards, model


def rank_outcome(train) -> dict:
    """Worker side: run `train()` (an `engine_base.EngineResult`) into a JSON-able dict; a RuntimeError (e.g.
    too many non-finite losses) becomes {"error": message}, which the test reads."""
    import dataclasses

    try:
        result = dataclasses.asdict(train())
    except RuntimeError as err:
        return {"error": str(err)}
    checkpoint = result.pop("last_checkpoint")
    return {**result, "checkpoint": str(checkpoint)}


def write_rank_result(spec: dict, out: dict) -> None:
    """Worker side: this rank's result file for `launch`, then leave the process group."""
    import torch

    rank = torch.distributed.get_rank()
    Path(f"{spec['result']}.rank{rank}.json").write_text(json.dumps(out))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def truncate_one_file(src: Path, dst: Path) -> None:
    """A copy of checkpoint `src` whose largest engine file is shorter than its manifest says."""
    shutil.copytree(src, dst)
    victim = max((dst / "engine").rglob("*.pt"), key=lambda f: f.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
