"""Key map between the released DeepSeek-OCR decoder tensors and DecoderModel's state dict.

Release layout (architecture.md section 6, prefix "model."): `embed_tokens`, `layers.{i}.
{input_layernorm,post_attention_layernorm,self_attn.{q,k,v,o}_proj}`, dense `mlp.{gate,up,
down}_proj`, MoE `mlp.gate`, `mlp.experts.{e}.{gate,up,down}_proj`, `mlp.shared_experts.*`,
`norm`, and `lm_head.weight` at the top level (no prefix). Ours stacks the routed experts:
`mlp.experts.gate_up_proj` [E, 2I, H] = per expert cat(gate [I, H], up [I, H]) and
`mlp.experts.down_proj` [E, H, I]. Both directions are strict: unknown or missing keys raise
a ValueError listing them (pass `config` to check against an exact model layout).
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch

from .config import DecoderConfig

_EXPERT_RELEASE = re.compile(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")
_EXPERT_OURS = re.compile(r"layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_LAYER_COMMON = {
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
}
_DENSE = {f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
_SHARED = {f"mlp.shared_experts.{p}_proj.weight" for p in ("gate", "up", "down")}
_ROUTED_OURS = {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
_TOP = {"embed_tokens.weight", "norm.weight", "lm_head.weight"}


def _expected_ours(config: DecoderConfig) -> set[str]:
    keys = set(_TOP)
    for i in range(config.num_layers):
        names = set(_LAYER_COMMON)
        if config.is_moe_layer(i):
            names |= {"mlp.gate.weight"} | _ROUTED_OURS
            if config.moe.n_shared_experts > 0:
                names |= _SHARED
        else:
            names |= _DENSE
        keys |= {f"layers.{i}.{n}" for n in names}
    return keys


def _inferred_ours(keys: set[str]) -> set[str]:
    """Expected keys for the layers present: every layer 0..max complete as dense or MoE."""
    layer_keys: dict[int, set[str]] = defaultdict(set)
    for key in keys:
        m = _LAYER.fullmatch(key)
        if m:
            layer_keys[int(m.group(1))].add(m.group(2))
    has_shared = any(_SHARED & names for names in layer_keys.values())
    expected = set(_TOP)
    for i in range(max(layer_keys, default=-1) + 1):
        names = layer_keys.get(i, set())
        moe = "mlp.gate.weight" in names or bool(_ROUTED_OURS & names)
        want = set(_LAYER_COMMON) | ((_ROUTED_OURS | {"mlp.gate.weight"}) if moe else _DENSE)
        if moe and has_shared:
            want |= _SHARED
        expected |= {f"layers.{i}.{n}" for n in want}
    return expected


def _check(found: set[str], expected: set[str], unknown: list[str], what: str) -> None:
    missing = sorted(expected - found)
    unexpected = sorted(set(unknown) | (found - expected))
    if missing or unexpected:
        raise ValueError(
            f"{what}: {len(missing)} missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
            f"{len(unexpected)} unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}"
        )


def _known_layer_key(rest: str) -> bool:
    m = _LAYER.fullmatch(rest)
    return m is not None and m.group(2) in (_LAYER_COMMON | _DENSE | _SHARED | {"mlp.gate.weight"})


def decoder_state_from_release(
    sd: dict[str, torch.Tensor], prefix: str = "model.", *, config: DecoderConfig | None = None
) -> dict[str, torch.Tensor]:
    """Release-layout decoder tensors -> DecoderModel state dict (experts stacked).

    `sd` must hold exactly the decoder tensors (split vision keys off first).
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    experts: dict[int, dict[tuple[int, str], torch.Tensor]] = defaultdict(dict)
    for key, value in sd.items():
        if key == "lm_head.weight":
            out[key] = value
            continue
        if not key.startswith(prefix):
            unknown.append(key)
            continue
        rest = key[len(prefix) :]
        m = _EXPERT_RELEASE.fullmatch(rest)
        if m:
            experts[int(m.group(1))][(int(m.group(2)), m.group(3))] = value
        elif rest in ("embed_tokens.weight", "norm.weight") or _known_layer_key(rest):
            out[rest] = value
        else:
            unknown.append(key)
    missing_experts = []
    for layer, parts in sorted(experts.items()):
        n = 1 + max(e for e, _ in parts)
        if config is not None and config.moe is not None:
            n = max(n, config.moe.n_routed_experts)
        want = {(e, p) for e in range(n) for p in ("gate", "up", "down")}
        missing_experts += [
            f"{prefix}layers.{layer}.mlp.experts.{e}.{p}_proj.weight" for e, p in sorted(want - set(parts))
        ]
        if want - set(parts):
            continue
        gate_up = [torch.cat([parts[(e, "gate")], parts[(e, "up")]], dim=0) for e in range(n)]  # (2I, H)
        out[f"layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(gate_up)  # (E, 2I, H)
        out[f"layers.{layer}.mlp.experts.down_proj"] = torch.stack([parts[(e, "down")] for e in range(n)])
    if missing_experts:
        raise ValueError(f"release decoder state: missing expert tensors {missing_experts[:20]}")
    expected = _expected_ours(config) if config is not None else _inferred_ours(set(out))
    _check(set(out), expected, unknown, "release decoder state")
    return out


def decoder_state_to_release(
    our_sd: dict[str, torch.Tensor], prefix: str = "model.", *, config: DecoderConfig | None = None
) -> dict[str, torch.Tensor]:
    """DecoderModel state dict -> release-layout tensors (experts unstacked into separate copies)."""
    expected = _expected_ours(config) if config is not None else _inferred_ours(set(our_sd))
    unknown = [k for k in our_sd if not (k in _TOP or _known_layer_key(k) or _EXPERT_OURS.fullmatch(k))]
    _check(set(our_sd), expected, unknown, "decoder state")
    out: dict[str, torch.Tensor] = {}
    for key, value in our_sd.items():
        m = _EXPERT_OURS.fullmatch(key)
        if key == "lm_head.weight":
            out[key] = value
        elif m is None:
            out[prefix + key] = value
        elif m.group(2) == "gate_up_proj":
            inter = value.shape[1] // 2
            for e in range(value.shape[0]):
                base = f"{prefix}layers.{m.group(1)}.mlp.experts.{e}"
                out[f"{base}.gate_proj.weight"] = value[e, :inter].clone()  # (I, H)
                out[f"{base}.up_proj.weight"] = value[e, inter:].clone()  # (I, H)
        else:
            for e in range(value.shape[0]):
                out[f"{prefix}layers.{m.group(1)}.mlp.experts.{e}.down_proj.weight"] = value[
                    e
                ].clone()  # (H, I)
    return out
