"""The online teacher in a train worker and what the feature terms need from both models' forward passes.

- `load_teacher`: the teacher, frozen (eval, no gradients), in the training precision (bf16 on GPUs), placed on the
  worker's device whole, partitioned across the workers by DeepSpeed ZeRO-3 (each holds 1/N of its weights and
  gathers one block at a time, as TRL prepares its reference models), or kept in CPU memory and streamed to the GPU a
  module at a time (accelerate's `cpu_offload`).
- `Taps`: forward hooks that keep the outputs of the mapped decoder blocks, and the attention maps of the mapped
  layers. Maps come from `MAPS_ATTENTION`, an attention implementation that runs the eager (map-returning)
  attention only on layers marked for it and sdpa everywhere else.
- `build_projections` / `save_projections` / `load_projections`: the learned linear maps from the student's width to
  the teacher's, one per layer pair (identity where the widths agree), trained with the student, saved beside it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

MAPS_ATTENTION = "sdpa_keeping_maps"  # registered with transformers by `register_maps_attention`
PROJECTIONS = "projections.safetensors"  # in the student folder, with PROJECTIONS_CONFIG
PROJECTIONS_CONFIG = "projections.json"
PLACEMENTS = ("device", "zero3", "cpu_offload")


def register_maps_attention() -> None:
    """Register `MAPS_ATTENTION` with transformers (idempotent): eager attention, which returns its map, on the
    attention modules whose `keep_map` is set, sdpa elsewhere; both take the eager implementation's additive mask."""
    import sys

    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    from transformers.models.qwen2 import modeling_qwen2

    def attention(module, query, key, value, attention_mask, **kwargs):
        if getattr(module, "keep_map", False):
            # the model's own eager attention (softcapping and the like included), Qwen2's where it has none
            eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward",
                            modeling_qwen2.eager_attention_forward)
            out, weights = eager(module, query, key, value, attention_mask, **kwargs)
            module.kept_map = weights
            return out, weights
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(MAPS_ATTENTION, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(MAPS_ATTENTION, eager_mask)


def decoder_blocks(model) -> nn.ModuleList:
    """The decoder's blocks of a causal LM (a PEFT-wrapped one included)."""
    return model.get_decoder().layers


class Taps:
    """Keeps, for each forward pass of `model`, the output of the decoder blocks in `hidden` and the attention maps
    of the blocks in `maps` ({block: tensor}); the model must run `MAPS_ATTENTION` for maps."""

    def __init__(self, model, hidden: list[int], maps: list[int]):
        self.hidden: dict[int, torch.Tensor] = {}
        self.blocks = decoder_blocks(model)
        for i in set(hidden):
            self.blocks[i].register_forward_hook(self._keeper(i))
        self.mapped = sorted(set(maps))
        for i in self.mapped:
            self.blocks[i].self_attn.keep_map = True

    def _keeper(self, i: int):
        def keep(module, args, output):  # noqa: ARG001 - hook signature
            self.hidden[i] = output[0] if isinstance(output, tuple) else output
        return keep

    @property
    def maps(self) -> dict[int, torch.Tensor]:
        return {i: self.blocks[i].self_attn.kept_map for i in self.mapped}

    def features(self, logits: torch.Tensor | None) -> dict[str, Any]:
        """What the latest forward pass kept, handed over and no longer held here (else the maps and states of the
        last step would stay in memory until the next one)."""
        out = {"logits": logits, "hidden": dict(self.hidden), "maps": self.maps}
        self.release()
        return out

    def release(self) -> None:
        """Let go of what the hooks kept: after the backward pass (which recomputes a checkpointed block and keeps
        its map again) and after a forward pass whose features nobody takes (held-out scoring)."""
        self.hidden.clear()
        for i in self.mapped:
            self.blocks[i].self_attn.kept_map = None


def widths(model) -> tuple[int, int, int]:
    """(blocks, hidden width, attention heads) of a causal LM."""
    config = model.config.get_text_config()
    return config.num_hidden_layers, config.hidden_size, config.num_attention_heads


def build_projections(pairs: list[tuple[int, int]], student_width: int, teacher_width: int) -> nn.ModuleList:
    """One projection per layer pair: a bias-free linear map from the student's width to the teacher's, or the
    identity where they agree (nothing to learn)."""
    if student_width == teacher_width:
        return nn.ModuleList(nn.Identity() for _ in pairs)
    return nn.ModuleList(nn.Linear(student_width, teacher_width, bias=False) for _ in pairs)


def save_projections(projections: nn.ModuleList, pairs: list[tuple[int, int]], folder: Path) -> None:
    """The projections' weights (safetensors) and the layer pairs they belong to (JSON), in the student folder."""
    from safetensors.torch import save_file

    state = {k: v.detach().float().contiguous().cpu() for k, v in projections.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    if state:
        save_file(state, str(folder / PROJECTIONS))
    widths_ = [[m.in_features, m.out_features] if isinstance(m, nn.Linear) else None for m in projections]
    (folder / PROJECTIONS_CONFIG).write_text(json.dumps({"pairs": [list(p) for p in pairs], "widths": widths_}))


def load_projections(folder: Path) -> tuple[nn.ModuleList, list[tuple[int, int]]]:
    """What `save_projections` wrote: (projections, layer pairs)."""
    from safetensors.torch import load_file

    config = json.loads((Path(folder) / PROJECTIONS_CONFIG).read_text())
    modules = nn.ModuleList(nn.Linear(w[0], w[1], bias=False) if w else nn.Identity() for w in config["widths"])
    if any(config["widths"]):
        modules.load_state_dict(load_file(str(Path(folder) / PROJECTIONS)))
    return modules, [tuple(p) for p in config["pairs"]]


def load_teacher(name: str, revision: str | None, dtype: torch.dtype, placement: str, attn_implementation: str,
                 device: torch.device, ds_config: dict[str, Any] | None = None):
    """The online teacher, frozen; returns (a callable that runs its forward pass, the module whose blocks `Taps`
    hooks, bytes of its weights this process holds)."""
    from transformers import AutoModelForCausalLM

    from pipeline import storage

    storage.fetched(name)
    model = AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=dtype,
                                                 attn_implementation=attn_implementation)
    model.eval().requires_grad_(False)
    if placement == "zero3":
        import deepspeed

        # no optimizer: DeepSpeed partitions the weights and gathers each block for its forward pass (ZeRO-Inference)
        engine, *_ = deepspeed.initialize(model=model, config={**(ds_config or {}), "zero_optimization": {
            "stage": 3, "stage3_param_persistence_threshold": 0}})
        engine.eval()
        held = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in engine.module.parameters())
        return engine, engine.module, held
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    if placement == "cpu_offload":
        from accelerate import cpu_offload

        cpu_offload(model, execution_device=device)  # weights stay in CPU memory, each module's moved in for its pass
        return model, model, 0 if device.type != "cpu" else held
    return model.to(device), model, held
