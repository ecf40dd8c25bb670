"""Training state (model, optimizer, scheduler, RNG, data position) as safetensors + JSON, no pickle.

`save_state(state, directory, name)` writes `<name>.safetensors` (every tensor and numpy array
of the nested state) and `<name>.json` (the structure, with each tensor replaced by a reference).
Reading it back runs no code from the files, unlike `torch.load(weights_only=False)`: a planted
checkpoint can at worst give wrong numbers or a ValueError.

JSON has no tuples, non-string keys or arrays, so the structure encodes them as
{"__tuple__": [...]}, {"__items__": [[key, value], ...]} (dicts with non-str keys, such as the
optimizer's per-parameter state), {"__tensor__": name} and {"__ndarray__": name, "dtype": ...}.
Values round-trip exactly (Python floats through repr, tensors bit for bit).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_SPECIAL = ("__tuple__", "__items__", "__tensor__", "__ndarray__")


def _encode(value, tensors: dict[str, torch.Tensor], seen: set[int]):
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensor = value.detach().cpu().contiguous()
        if tensor.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
        return {"__tensor__": name}
    if isinstance(value, np.ndarray):
        name = f"t{len(tensors)}"
        tensors[name] = torch.from_numpy(
            np.ascontiguousarray(value).astype(np.int64 if value.dtype.kind in "iu" else value.dtype)
        )
        return {"__ndarray__": name, "dtype": value.dtype.str}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, seen) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors, seen) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not any(k in _SPECIAL for k in value):
            return {k: _encode(v, tensors, seen) for k, v in value.items()}
        return {
            "__items__": [[_encode(k, tensors, seen), _encode(v, tensors, seen)] for k, v in value.items()]
        }
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"training state holds a {type(value).__name__}, which save_state cannot store")


def _decode(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy().astype(np.dtype(value["dtype"]))
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__items__" in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__items__"]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def save_state(state: dict, directory: Path, name: str) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors, set())
    save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(structure))


def load_state(directory: Path, name: str) -> dict:
    """Inverse of `save_state` (tensors on the CPU); ValueError naming the file if one is unreadable."""
    tensor_file, structure_file = directory / f"{name}.safetensors", directory / f"{name}.json"
    try:
        tensors = load_file(str(tensor_file))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{tensor_file}: unreadable training state ({err})") from err
    try:
        structure = json.loads(structure_file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{structure_file}: unreadable training state ({err})") from err
    return _decode(structure, tensors)
