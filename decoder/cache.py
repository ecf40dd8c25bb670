"""Preallocated key/value cache for incremental (token-by-token) decoding.

One (B, nh, capacity, hd) key and value buffer per layer, a shared fill length, and a
(B, capacity) validity mask so left-padded batches decode together (padding keys are
never attended). Used by generation (pipeline/generation.py) through DecoderModel.forward.
"""

from __future__ import annotations

import torch

from .config import DecoderConfig


class KVCache:
    """Keys/values of all layers for `batch_size` rows and up to `capacity` positions.

    DecoderModel.forward writes the new tokens of every layer (`update`) and then calls
    `advance(T)` once; `length` is the number of positions filled so far.
    """

    def __init__(
        self,
        config: DecoderConfig,
        batch_size: int,
        capacity: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        layers: range | None = None,
    ) -> None:
        if batch_size < 1 or capacity < 1:
            raise ValueError(f"batch_size and capacity must be >= 1, got {batch_size}, {capacity}")
        self.batch_size = batch_size
        self.capacity = capacity
        self.layers = layers if layers is not None else range(config.num_layers)
        shape = (batch_size, config.num_heads, capacity, config.head_dim)
        self.keys = {i: torch.zeros(shape, device=device, dtype=dtype) for i in self.layers}
        self.values = {i: torch.zeros(shape, device=device, dtype=dtype) for i in self.layers}
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)
        self.length = 0

    def check_room(self, batch_size: int, num_new: int) -> None:
        if batch_size != self.batch_size:
            raise ValueError(f"KVCache was built for batch {self.batch_size}, got batch {batch_size}")
        if self.length + num_new > self.capacity:
            raise ValueError(
                f"KVCache overflow: {self.length} cached + {num_new} new > capacity {self.capacity}"
            )

    def set_valid(self, new_valid: torch.Tensor) -> None:
        """Record which of the next (B, T) positions are real tokens (1) or padding (0)."""
        t = new_valid.shape[1]
        self.valid[:, self.length : self.length + t] = new_valid.to(torch.bool)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v (B, nh, T, hd) at [length, length+T); return all keys/values so far."""
        t = k.shape[2]
        end = self.length + t
        self.keys[layer_idx][:, :, self.length : end] = k
        self.values[layer_idx][:, :, self.length : end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def advance(self, num_new: int) -> None:
        self.length += num_new

    def next_positions(self, batch_size: int, num_new: int, new_valid: torch.Tensor | None) -> torch.Tensor:
        """RoPE positions (B, T) of the next tokens: count of real tokens before each one."""
        past = self.valid[:, : self.length].sum(dim=1, keepdim=True)  # (B, 1)
        if new_valid is None:
            steps = torch.arange(num_new, device=self.valid.device).expand(batch_size, num_new)
            return past + steps
        return past + (new_valid.long().cumsum(dim=1) - 1).clamp(min=0)

    def reset(self) -> None:
        self.length = 0
        self.valid.zero_()
