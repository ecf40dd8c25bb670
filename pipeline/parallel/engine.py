"""DeepSeek-OCR as a DeepSpeed `PipelineModule` and the engine built around it.

`build_pipeline_module` turns the units of `pipeline.parallel.partition` into LayerSpecs (each
rank builds only its own stage) and splits them at *our* boundaries: DeepSpeed has no
explicit split-point argument, so `OCRPipelineModule` overrides `_partition_layers` with the
`parts` computed by `partition()` (the paper split by default: [SAM+compressor |
CLIP+projector+embed+merge | decoder 0-5 | decoder 6-11 + head] for PP=4;
parallel.partition_method=balanced equalises the per-stage training FLOPs instead).
`get_additional_losses()` reports the next-token and MoE balance losses, which the engine
averages over micro-batches and data-parallel ranks.

Gradient checkpointing is set per stage (`stage_checkpointed`); the last stage computes the loss
in token chunks (`parallel.loss_chunk_tokens`, pipeline/loss.py).

`build_engine` wraps `deepspeed.initialize` and applies two documented adjustments to the
engine instance (DeepSpeed 0.19, ../shared/spec/engine_notes.md):
- a step guard around `_take_model_step`: every rank learns (one all-reduce) whether any rank
  saw a non-finite loss; if so the update, the LR schedule step and the step count are
  skipped on all ranks and the gradients are dropped (`install_step_guard`);
- the rotary `inv_freq` buffers are restored to fp32 after DeepSpeed casts the module to
  bf16 (a bf16 inverse frequency shifts RoPE angles by whole radians at position 8k).
Units are initialised with seed `train.seed + unit index`, so a random init does not depend
on the pipeline layout; `model.init_from` overwrites them with a checkpoint's weights.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn

from decoder import DecoderConfig, RotaryEmbedding
from deepencoder import EncoderConfig
from pipeline.config import DataConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig
from pipeline.model import checkpoint_blocks, model_configs
from pipeline.parallel.ds_config import build_optimizer_and_scheduler, deepspeed_config
from pipeline.parallel.memory import BALANCE_VISION_FRACTION, unit_costs, workload_of
from pipeline.parallel.partition import Partition, build_units, partition
from pipeline.parallel.stages import StageUnit, pack_hidden, unit_key_to_model_key, unpack_hidden
from pipeline.parallel.topology import Topology
from pipeline.units import PrepareCache, Unit


def run_model_configs(
    model: ModelConfig, *, vocab_size: int, image_token_id: int, bos_token_id: int = 0, eos_token_id: int = 1
) -> tuple[EncoderConfig, DecoderConfig, int]:
    """(encoder, decoder, image id) of a run: `pipeline.model.model_configs`, the one translation the
    single process uses too, with the tokenizer's vocabulary and ids; the image id checked."""
    enc, dec = model_configs(model, vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    if not 0 <= image_token_id < dec.vocab_size:
        raise ValueError(f"image_token_id {image_token_id} outside the vocabulary [0, {dec.vocab_size})")
    return enc, dec, image_token_id


def run_partition(m: ModelConfig, data: DataConfig, p: ParallelConfig) -> Partition:
    """The stage split of this run: parallel.partition boundaries, else parallel.partition_method
    ("balanced" weighs units by `unit_costs` at BALANCE_VISION_FRACTION). ValueError for more
    stages than units, bad boundaries, an unknown method or checkpoint stage."""
    units = build_units(m)
    costs = None
    if p.partition is None and p.partition_method == "balanced":
        enc, dec = model_configs(m)
        costs = unit_costs(units, enc, dec, workload_of(m, data, p, BALANCE_VISION_FRACTION))
    split = partition(units, p.pp, p.partition, p.partition_method, costs)
    bad = [s for s in p.checkpoint_stages or () if not 0 <= s < p.pp]
    if bad:
        raise ValueError(
            f"parallel.checkpoint_stages={p.checkpoint_stages}: stages {bad} outside [0, {p.pp})"
        )
    return split


def unit_layer_specs(
    units: Sequence[Unit],
    configs: tuple[EncoderConfig, DecoderConfig, int],
    model: ModelConfig,
    *,
    seed: int = 0,
    loss_chunk_tokens: int = 0,
):
    """One `LayerSpec` of a `StageUnit` per unit (built lazily, on its own stage only)."""
    from deepspeed.pipe import LayerSpec

    enc, dec, image_id = configs
    cache = PrepareCache()  # shared by the decoder units that land on the same rank
    return [
        LayerSpec(
            StageUnit,
            unit,
            enc,
            dec,
            image_id,
            freeze=model.freeze_sam,
            loss_chunk_tokens=loss_chunk_tokens,
            cache=cache,
            seed=seed + index,
        )  # fmt: skip
        for index, unit in enumerate(units)
    ]


def _pipeline_module_class():
    from deepspeed.pipe import PipelineModule

    class OCRPipelineModule(PipelineModule):
        """PipelineModule split at explicit unit boundaries `parts` (stage s: parts[s]..parts[s+1]-1)."""

        def __init__(self, layers, *, parts: Sequence[int], **kwargs) -> None:
            object.__setattr__(self, "_explicit_parts", [int(p) for p in parts])
            super().__init__(layers, **kwargs)

        def _partition_layers(self, method: str = "explicit") -> None:
            parts = self._explicit_parts
            if len(parts) != self.num_stages + 1 or parts[0] != 0 or parts[-1] != len(self._layer_specs):
                raise ValueError(
                    f"parts {parts} do not split {len(self._layer_specs)} units into {self.num_stages}"
                )
            self.parts = list(parts)
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=parts[stage], stop=parts[stage + 1])
            # `hidden` tuples cross boundaries packed (stages.pack_hidden); SAM's output does not
            after_sam = [spec.module_args[0].kind == "sam" for spec in self._layer_specs]
            self.receives_packed = stage > 0 and not after_sam[parts[stage] - 1]
            self.sends_packed = stage < self.num_stages - 1 and not after_sam[parts[stage + 1] - 1]

        def _is_checkpointable(self, funcs) -> bool:
            """Activation checkpointing (activation_checkpoint_interval) wraps decoder layers only."""
            return all(isinstance(f, StageUnit) and f.unit.kind == "decoder_layer" for f in funcs)

        def forward(self, forward_input):
            if self.receives_packed:
                forward_input = unpack_hidden(forward_input)
            out = super().forward(forward_input)
            return pack_hidden(out) if self.sends_packed else out

        def units(self) -> list[StageUnit]:
            return [f for f in self.forward_funcs if isinstance(f, StageUnit)]

        def head(self) -> StageUnit | None:
            found = [u for u in self.units() if u.unit.kind == "head"]
            return found[0] if found else None

        def get_additional_losses(self):
            head = self.head()
            zero = torch.zeros((), device=self.frozen_or_any_device())
            if head is None or head.last_lm_loss is None:
                return OrderedDict(lm_loss=zero, aux_loss=zero.clone())
            return OrderedDict(lm_loss=head.last_lm_loss.float(), aux_loss=head.last_aux_loss.float())

        def frozen_or_any_device(self) -> torch.device:
            return next(self.parameters()).device

        def expert_counts(self) -> dict[int, torch.Tensor]:
            """Tokens per expert of this stage's MoE layers since the last reset, by layer index."""
            return {layer: c for u in self.units() for layer, c in u.expert_counts.items()}

        def reset_step_records(self) -> None:
            for u in self.units():
                u.reset_step_records()

        def model_state_dict(self) -> dict[str, torch.Tensor]:
            """This stage's weights under DeepSeekOCR keys (the zero-weight link left out)."""
            out = {}
            for unit in self.units():
                for key, value in unit.state_dict().items():
                    model_key = unit_key_to_model_key(key)
                    if model_key is not None:
                        out[model_key] = value
            return out

        def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
            """Copy this stage's tensors from a full DeepSeekOCR state dict (strict for this stage)."""
            for unit in self.units():
                wanted = {k: unit_key_to_model_key(k) for k in unit.state_dict()}
                missing = [m for m in wanted.values() if m is not None and m not in state]
                if missing:
                    raise ValueError(
                        f"model.init_from lacks {len(missing)} tensors of this stage, e.g. {missing[:3]}"
                    )
                own = unit.state_dict()
                with torch.no_grad():
                    for key, model_key in wanted.items():
                        if model_key is None:
                            continue
                        src = state[model_key]
                        if src.shape != own[key].shape:
                            raise ValueError(
                                f"model.init_from: {model_key} has shape {tuple(src.shape)}, this model "
                                f"{tuple(own[key].shape)}: the checkpoint is a different model size"
                            )
                        own[key].copy_(src)

    return OCRPipelineModule


def engine_dynamic_shape(split: Partition, pack: bool) -> bool:
    """Whether the engine must exchange tensor shapes before every activation it sends.

    With dynamic shapes DeepSpeed sends shape metadata before each activation and the receiver
    reads it back to the host (a device sync per micro-batch and stage). Packed rows (always
    micro_batch x seq_len: the training stream is endless) keep every boundary's shapes fixed
    except where the SAM features cross. One flag for all stages: both ends of a boundary must
    agree."""
    return split.varying_boundary or not pack


def stage_checkpointed(p: ParallelConfig, m: ModelConfig, stage: int) -> bool:
    """Whether `stage` recomputes its blocks in backward: listed in parallel.checkpoint_stages,
    or, when that is unset, model.gradient_checkpointing."""
    stages = p.checkpoint_stages
    return m.gradient_checkpointing if stages is None else stage in stages


def build_pipeline_module(
    m: ModelConfig, data: DataConfig, p: ParallelConfig, topology: Topology,
    configs: tuple[EncoderConfig, DecoderConfig, int], *, seed: int,
):  # fmt: skip
    """The `OCRPipelineModule` of this rank (needs torch.distributed initialised); `seed` is train.seed."""
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    split = run_partition(m, data, p)
    specs = unit_layer_specs(
        [u.unit for u in split.units], configs, m, seed=seed, loss_chunk_tokens=p.loss_chunk_tokens
    )
    cls = _pipeline_module_class()
    module = cls(
        specs,
        parts=split.parts,
        topology=PipeDataParallelTopology(num_pp=topology.pp, num_dp=topology.dp),
        loss_fn=None,  # the head unit returns the loss (labels ride along in the activations)
        activation_checkpoint_interval=p.activation_checkpoint_interval,
        dynamic_shape=engine_dynamic_shape(split, data.pack),
    )
    if stage_checkpointed(p, m, module.stage_id):
        for unit in module.units():
            checkpoint_blocks(unit.model, [unit.unit])
    return module


def restore_fp32_rotary(module: nn.Module) -> None:
    """Give every RotaryEmbedding an fp32 inv_freq again (DeepSpeed casts buffers to bf16)."""
    for sub in module.modules():
        if isinstance(sub, RotaryEmbedding) and sub.inv_freq.dtype != torch.float32:
            sub.inv_freq = torch.empty(sub.inv_freq.shape, dtype=torch.float32, device=sub.inv_freq.device)
            sub.init_weights()


def _drop_gradients(engine) -> None:
    """Zero the accumulated gradients the way `DeepSpeedEngine._take_model_step` does after a step."""
    mixed = engine.bfloat16_enabled() or engine.zero_optimization() or engine.fp16_enabled()
    if mixed and hasattr(engine.optimizer, "zero_grad"):
        engine.optimizer.zero_grad()
    else:
        engine.zero_grad()


def install_step_guard(
    engine, local_figures: Callable[[], torch.Tensor], on_reduced: Callable[[torch.Tensor], None]
) -> None:
    """Skip the optimizer step on every rank when any rank reports a non-finite step.

    `local_figures()` is this rank's vector [non-finite flag (0 or 1), *figures]; one all-reduce
    sums it over all ranks (the step's global figures ride along), `on_reduced(sums)` receives
    the sums, and the update runs only when the summed flag is 0."""
    import torch.distributed as dist

    original = engine._take_model_step

    def guarded_step(lr_kwargs=None):
        figures = local_figures().to(device=engine.device, dtype=torch.float64)
        dist.all_reduce(figures)
        on_reduced(figures)
        if float(figures[0]) == 0.0:
            original(lr_kwargs)
        else:
            _drop_gradients(engine)

    engine._take_model_step = guarded_step


def build_engine(
    module: nn.Module, p: ParallelConfig, o: OptimConfig, train: TrainConfig, topology: Topology
):
    """deepspeed.initialize with our AdamW groups and LambdaLR; returns (engine, optimizer, scheduler)."""
    import deepspeed

    optimizer, scheduler = build_optimizer_and_scheduler(module, o, train.max_steps)
    engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(p, o, train, topology),
    )
    restore_fp32_rotary(engine.module)
    return engine, ds_optimizer, ds_scheduler
