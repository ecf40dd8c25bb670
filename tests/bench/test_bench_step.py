"""The full-step benchmark on CPU through the GPU run's code paths: the sync-free step's fused AdamW
with its on-device non-finite skip (the H200 failure "output with shape [] doesn't match the
broadcast shape [1]"), every variant of measure_full_step incl. the peer and the compiled one,
and the profile artifacts (gzip'd Chrome trace + summary) with the trace summary on a hand-made
trace."""

from __future__ import annotations

import copy
import gzip
import json

import pytest
import torch
from torch import nn

from bench.full_step import (
    BETAS,
    LR,
    WEIGHT_DECAY,
    FullStepSettings,
    SyncFreeStep,
    measure_full_step,
    nonfinite_flag,
)
from bench.profiling import STEP_ANNOTATION, summarize_trace
from pipeline.train.optim import param_groups


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x)).square().mean()


@pytest.mark.unit
def test_nonfinite_flag_is_the_0dim_float_that_fused_adamw_subtracts_from_its_steps():
    for value, flag in ((1.5, 0.0), (float("nan"), 1.0), (float("inf"), 1.0)):
        f = nonfinite_flag(torch.tensor(value, dtype=torch.bfloat16))
        assert f.shape == () and f.dtype == torch.float32 and float(f) == flag
    # what torch does with found_inf after the fused kernel: steps (0-dim) -= found_inf
    steps = [torch.zeros(())]
    torch._foreach_sub_(steps, [nonfinite_flag(torch.tensor(float("nan")))])
    assert float(steps[0]) == -1.0
    with pytest.raises(RuntimeError, match=r"output with shape \[\] doesn't match the broadcast shape \[1\]"):
        torch._foreach_sub_([torch.zeros(())], [torch.ones(1)])  # the shape the H200 run used


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sync_free_step_equals_adamw_and_skips_a_nonfinite_step(dtype):
    torch.manual_seed(0)
    model = _Tiny().to(dtype)
    reference = copy.deepcopy(model)
    step = SyncFreeStep(model, lambda x: model(x), torch.device("cpu"))
    assert all(g["fused"] for g in step.optimizer.param_groups)  # the GPU run's optimizer on CPU
    ref_opt = torch.optim.AdamW(param_groups(reference, WEIGHT_DECAY), lr=LR, betas=BETAS, foreach=False)
    for _ in range(3):
        x = torch.randn(5, 8, dtype=dtype)
        loss = step(x)
        ref_opt.zero_grad()
        ref_loss = reference(x)
        ref_loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        ref_opt.step()
        assert torch.equal(loss, ref_loss.detach())
    tol = {"rtol": 1e-6, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-3}
    for p, r in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, r, **tol)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.full((5, 8), float("nan"), dtype=dtype)
    assert not torch.isfinite(step(x))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # update skipped on device
    assert {float(s["step"]) for s in step.optimizer.state.values()} == {3.0}  # and the step count
    step(torch.randn(5, 8, dtype=dtype))
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert {float(s["step"]) for s in step.optimizer.state.values()} == {4.0}


@pytest.mark.slow
def test_full_step_variants_and_profile_artifacts_on_cpu(tmp_path):
    settings = FullStepSettings(encoder="debug", decoder="debug", mode="debug", seq_len=192, text_range=(20, 40),
                                rows=1, steps=1, warmup=1, compile=True, compile_backend="aot_eager")  # fmt: skip
    res = measure_full_step(settings, torch.device("cpu"), peak_tflops=1.0, profile_dir=tmp_path)
    assert res["errors"] == {}
    assert set(res["variants"]) == {"peer", "local_trainer", "sync_free", "sync_free_compiled"}
    for key, v in res["variants"].items():
        assert v["tokens_per_s"] > 0 and v["tokens_per_step"] == res["variants"]["peer"]["tokens_per_step"], (
            key
        )
    for key in ("peer", "sync_free", "sync_free_compiled"):
        v = res["variants"][key]
        assert v["sam_calls_per_step"] == v["view_groups_per_step"] and v["sam_graph"] is False, key
    # profiled: today's loop and the fastest variant, each a gzip'd Chrome trace, one summary file
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["profile_summary.txt", "trace_full_step_localtrainer.json.gz",
                     "trace_full_step_sync_free_compiled.json.gz"]  # fmt: skip
    for variant in ("local_trainer", "sync_free_compiled"):
        prof = res["variants"][variant]["profile"]
        with gzip.open(tmp_path / prof["trace"], "rt") as f:
            trace = json.load(f)
        assert any(e.get("name") == STEP_ANNOTATION for e in trace["traceEvents"])
        assert prof["top"] and prof["host_syncs"] == 0 and "table" not in prof  # the table went to the file
    summary = (tmp_path / "profile_summary.txt").read_text()
    assert "=== LocalTrainer:" in summary and "=== sync-free + compile:" in summary and "aten::" in summary


def _x(name: str, cat: str, ts: float, dur: float) -> dict:
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "pid": 1, "tid": 1}


@pytest.mark.unit
def test_trace_summary_counts_kernels_and_only_the_steps_host_syncs():
    events = [
        {"ph": "M", "name": "process_name", "args": {"name": "python"}},
        _x("cudaStreamSynchronize", "cuda_runtime", 5, 1),  # before the step: not counted
        _x(STEP_ANNOTATION, "gpu_user_annotation", 0, 10_000),  # the GPU-side copy is not the step
        _x(STEP_ANNOTATION, "user_annotation", 10, 1000),
        _x("cudaLaunchKernel", "cuda_runtime", 20, 2),
        _x("cudaStreamSynchronize", "cuda_runtime", 30, 50),  # .item()
        _x("cudaMemcpyAsync", "cuda_runtime", 29, 1),  # asynchronous: not a sync
        _x("cudaMemcpy", "cuda_runtime", 100, 5),  # synchronous copy
        _x("cudaDeviceSynchronize", "cuda_runtime", 2000, 5),  # after the step (the profiler's own)
        _x("gemm_a", "kernel", 40, 300),
        _x("gemm_a", "kernel", 400, 300),
        _x("elementwise", "kernel", 800, 100),
        _x("Memcpy HtoD", "gpu_memcpy", 900, 300),
        _x("aten::mm", "cpu_op", 15, 100),
    ]
    s = summarize_trace({"traceEvents": events}, top=2)
    assert s["step_ms"] == 1.0 and s["kernel_launches"] == 4 and s["gpu_busy_ms"] == 1.0
    assert s["host_syncs"] == 2 and s["host_syncs_by_call"] == {"cudaStreamSynchronize": 1, "cudaMemcpy": 1}
    assert s["top"] == [
        {"name": "gemm_a", "calls": 2, "total_ms": 0.6, "share": 0.6},
        {"name": "Memcpy HtoD", "calls": 1, "total_ms": 0.3, "share": 0.3},
    ]
    cpu = summarize_trace(
        {"traceEvents": [e for e in events if e.get("cat") != "kernel" and e.get("cat") != "gpu_memcpy"]}
    )
    assert (
        cpu["gpu_busy_ms"] is None and cpu["top"][0]["name"] == "aten::mm" and cpu["top"][0]["share"] is None
    )
