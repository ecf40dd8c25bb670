"""The training loop and what it needs: optimizer groups, LR schedules, checkpoints, metrics."""
