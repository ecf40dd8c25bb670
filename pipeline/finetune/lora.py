"""Which parameters a fine-tune trains: per-component freezing and LoRA adapters through peft.

Components (`COMPONENT_PATHS`) partition every parameter of `DeepSeekOCR`: SAM + compressor,
CLIP, projector (+ the learned newline / view-separator vectors), token embedding, decoder
blocks + final norm, lm_head. Full fine-tuning sets `requires_grad` per component.

LoRA (peft `LoraConfig` + `get_peft_model`, Hu et al. 2021) goes on nn.Linear modules named
by `LoraSpec.targets` inside the `LoraSpec.scope` components. The decoder's routed experts
are not nn.Linear: they are stacked parameters `gate_up_proj` [E, 2I, H] and `down_proj`
[E, H, I] (decoder/moe.py). So by default LoRA reaches attention, the dense layer-0 MLP and
the shared experts; `LoraSpec.expert_targets` adds the routed experts through peft's
`target_parameters` (peft >= 0.17: one rank-r pair per expert, the 3-D weight read as
(experts, out, in); the fused gate_up gets one pair over both halves, unlike per-expert
gate/up Linears in the release's key layout). A target that matches no module is a
ValueError listing the names that exist.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from torch import nn

from pipeline.finetune.config import COMPONENTS, LoraSpec
from pipeline.model import DeepSeekOCR

log = logging.getLogger(__name__)

COMPONENT_PATHS: dict[str, tuple[str, ...]] = {
    "sam": ("encoder.sam_model",),
    "clip": ("encoder.vision_model",),
    "projector": ("encoder.projector", "encoder.image_newline", "encoder.view_seperator"),
    "embed": ("decoder.embed_tokens",),
    "decoder": ("decoder.layers", "decoder.norm"),
    "lm_head": ("decoder.lm_head",),
}
# Where LoRA targets are looked up per `LoraSpec.scope` entry (the decoder's includes lm_head).
LORA_SCOPE_PATHS: dict[str, tuple[str, ...]] = {
    "sam": ("encoder.sam_model",),
    "clip": ("encoder.vision_model",),
    "projector": ("encoder.projector",),
    "decoder": ("decoder.layers", "decoder.lm_head"),
}
# Module paths that LoRA's `modules_to_save` copies when a component trains fully next to
# the adapters (the projector's two vectors are parameters of the encoder itself: they stay frozen).
SAVED_MODULES: dict[str, tuple[str, ...]] = {
    "sam": ("encoder.sam_model",),
    "clip": ("encoder.vision_model",),
    "projector": ("encoder.projector",),
    "embed": ("decoder.embed_tokens",),
    "lm_head": ("decoder.lm_head",),
}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def component_of(param_name: str) -> str:
    """The component a parameter of DeepSeekOCR belongs to (ValueError if none)."""
    for component, prefixes in COMPONENT_PATHS.items():
        if any(_under(param_name, p) for p in prefixes):
            return component
    raise ValueError(f"parameter {param_name!r} belongs to no component of {COMPONENTS}")


def set_trainable(model: DeepSeekOCR, components: Iterable[str]) -> dict[str, int]:
    """requires_grad = (component in `components`) for every parameter; trainable count per component."""
    chosen = set(components)
    bad = chosen - set(COMPONENTS)
    if bad:
        raise ValueError(f"unknown components {sorted(bad)}; components are {COMPONENTS}")
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, param in model.named_parameters():
        component = component_of(name)
        param.requires_grad_(component in chosen)
        if component in chosen:
            counts[component] += param.numel()
    return counts


def lora_candidates(model: DeepSeekOCR, scope: Iterable[str]) -> tuple[list[str], list[str]]:
    """Full names of the nn.Linear modules and of the stacked expert parameters inside `scope`."""
    prefixes = [p for s in scope for p in LORA_SCOPE_PATHS[s]]
    linears = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(_under(name, p) for p in prefixes)
    ]
    experts = [
        name
        for name, param in model.named_parameters()
        if param.ndim == 3 and any(_under(name, p) for p in prefixes)
    ]
    return linears, experts


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _short_names(names: Iterable[str]) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def resolve_lora_targets(model: DeepSeekOCR, spec: LoraSpec) -> tuple[list[str], list[str]]:
    """(module names, expert parameter names) the spec adapts; ValueError for a target that matches nothing."""
    linears, experts = lora_candidates(model, spec.scope)
    modules: list[str] = []
    missing = []
    for target in spec.targets:
        hits = [n for n in linears if _matches(n, target)]
        if not hits:
            missing.append(target)
        modules += [h for h in hits if h not in modules]
    params: list[str] = []
    missing_params = []
    for target in spec.expert_targets:
        hits = [n for n in experts if _matches(n, target)]
        if not hits:
            missing_params.append(target)
        params += hits
    if missing or missing_params:
        lines = []
        if missing:
            lines.append(f"finetune.lora.targets {missing} match no nn.Linear in scope {spec.scope}")
        if missing_params:
            lines.append(f"finetune.lora.expert_targets {missing_params} match no routed-expert parameter")
        lines.append(
            f"available module names in scope {spec.scope}: {', '.join(_short_names(linears)) or 'none'}"
        )
        lines.append(
            "available routed-expert parameters (finetune.lora.expert_targets): "
            + (", ".join(_short_names(experts)) or "none (no MoE layer in scope)")
        )
        lines.append("a target may also be a dotted suffix of a full name, e.g. shared_experts.gate_proj")
        raise ValueError("; ".join(lines))
    return modules, params


def apply_lora(model: DeepSeekOCR, spec: LoraSpec, full_components: Iterable[str] = ()):
    """Freeze `model`, inject LoRA adapters (in place) and return the peft wrapper.

    full_components: components trained fully next to the adapters (peft modules_to_save).
    The returned `PeftModel` is for saving and merging; training and evaluation call the
    (now adapted) `model` itself.
    """
    import peft

    modules, params = resolve_lora_targets(model, spec)
    if params and "target_parameters" not in {f.name for f in peft.LoraConfig.__dataclass_fields__.values()}:
        raise ValueError(
            f"finetune.lora.expert_targets needs peft >= 0.17 (target_parameters); installed {peft.__version__}. "
            "Supported without it: nn.Linear targets (attention, dense MLP, shared experts)"
        )
    saved = [m for c in full_components for m in SAVED_MODULES[c]]
    if "projector" in full_components:
        log.warning("LoRA + projector: the projector Linear trains; image_newline/view_seperator stay frozen")
    set_trainable(model, ())
    config = peft.LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=modules,
        target_parameters=params or None,
        modules_to_save=saved or None,
        use_rslora=spec.rslora,
        bias="none",
    )
    return peft.get_peft_model(model, config)


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
