"""Benchmarks: `dsocr-bench` (bench/cli.py; the rows in bench/suite.py) measures our training
components next to the implementations a user would pick instead, in the same run: report (rows,
targets, PERFORMANCE.md), measure (timing, matmul peak, host syncs, FLOPs), bench_decoder /
bench_sam / bench_data (each component with its peer), step_data (packed page rows), full_step
(the full model through pipeline.train's Trainer, eager and compiled, beside the transformers
peer). bench/ imports pipeline/, never the other way round.
"""
