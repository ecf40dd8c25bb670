"""Benchmarks of issue 13: one command (`dsocr-bench`, bench/suite.py) that measures our training
components next to the implementations a user would pick instead, in the same run.

Modules: report (rows, targets, the table, PERFORMANCE.md), measure (timing, matmul peak,
host-sync counting, counted FLOPs), bench_decoder / bench_data (standalone scripts reused as
libraries), bench_sam (frozen SAM + compressor forward), full_step (the full-model training
step, its sync-free variant, the transformers peer), profiling (the full step under
torch.profiler: gzip'd Chrome trace + summary), pipeline_rows (bench/pipeline_gpu.sh, the
pipeline engineer's 4-GPU script, run as a subprocess), suite (the rows and the run).
Installed with the project (pyproject packages bench*, package data pipeline_gpu.sh).
"""
