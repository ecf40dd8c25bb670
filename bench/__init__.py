"""Benchmarks: one command (`dsocr-bench` = bench/cli.py, the rows in bench/suite.py)
that measures our training components next to the implementations a user would pick instead, in
the same run.

Modules: report (rows, targets, the table, PERFORMANCE.md), measure (timing, matmul peak,
host-sync counting, counted FLOPs), bench_decoder / bench_sam / bench_data (the decoder step, the
frozen SAM + compressor forward, the data path, each with its peer), step_data (packed page rows),
full_step (the full model trained by pipeline.train's Trainer, eager and compiled, with its peak
memory, host syncs and a full-logits step, and the transformers peer in the same Trainer).
bench/ imports pipeline/, never the other way round.
"""
