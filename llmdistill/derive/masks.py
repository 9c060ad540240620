"""MAGNET in-block masking: zero the least salient weights of the kept blocks and keep them zero in training.

The mask file (safetensors, bool, True = keep) sits beside the derived checkpoint as `masks.safetensors`,
keyed by the student's parameter names. The checkpoint's masked weights are already zero. During distillation:

- `mask_gradients(model, masks)` once, before `deepspeed.initialize`: a tensor hook multiplies each masked
  parameter's gradient by its mask before it is accumulated, so neither the optimizer's fp32 master copy nor
  Adam's moments ever move a masked weight (AdamW's decoupled decay keeps a zero weight at zero). Nothing runs
  after the optimizer step: the hooks alone keep masked weights at zero.
- `apply_masks(model, masks)` zeroes masked weights in place: derivation applies it to the pruned student, and
  export applies it to a LoRA student's merged weights (a LoRA update is dense, so the merge would undo them).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmdistill.config import LLMDistillError

MASK_FILE = "masks.safetensors"
MASKABLE = (
    "q_proj.weight",
    "k_proj.weight",
    "v_proj.weight",
    "o_proj.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
)


def maskable_parameters(model) -> list[str]:
    """The linear weights inside decoder blocks (norms, embeddings and the LM head are never masked)."""
    return [n for n, _ in model.named_parameters() if ".layers." in n and n.endswith(MASKABLE)]


def saliency_masks(
    grads: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], sparsity: float, saliency: str = "grad"
) -> dict[str, torch.Tensor]:
    """Per matrix, mask exactly round(sparsity * numel) entries with the lowest saliency (True = keep).

    Per-matrix rather than global, so no single projection is wiped out because its gradients run small.
    """
    masks = {}
    for name, g in grads.items():
        s = g.abs() if saliency == "grad" else (g * weights[name].float()).abs()
        n_mask = int(round(sparsity * s.numel()))
        keep = torch.ones(s.numel(), dtype=torch.bool)
        keep[torch.argsort(s.flatten(), stable=True)[:n_mask]] = False
        masks[name] = keep.view_as(s)
    return masks


def save_masks(masks: dict[str, torch.Tensor], path: str | Path) -> None:
    save_file({k: v.contiguous() for k, v in masks.items()}, str(path))


def load_masks(masks: str | Path | dict) -> dict[str, torch.Tensor]:
    if isinstance(masks, dict):
        return masks
    path = Path(masks)
    if path.is_dir():
        path = path / MASK_FILE
    if not path.is_file():
        raise LLMDistillError(f"mask file not found: {path}")
    return load_file(str(path))


def _canonical(name: str) -> str:
    # PEFT wraps the model (base_model.model., weights in .base_layer.); DeepSpeed engines add module.
    for prefix in ("module.", "base_model.model."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name.replace(".base_layer.", ".")


def _masked_parameters(
    model, masks: dict[str, torch.Tensor]
) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    params = {_canonical(n): p for n, p in model.named_parameters()}
    missing = sorted(set(masks) - set(params))
    if missing:
        raise LLMDistillError(f"masks name parameters the model does not have: {missing[:3]}...")
    return [(params[n], m) for n, m in masks.items()]


@torch.no_grad()
def apply_masks(model, masks: str | Path | dict) -> None:
    """Zero every masked weight in place. ZeRO-3 parameters are gathered, masked, repartitioned."""
    for param, mask in _masked_parameters(model, load_masks(masks)):
        if hasattr(param, "ds_id"):  # ZeRO-3 partitioned parameter
            import deepspeed  # lazy: only a ZeRO-3 parameter needs it, and importing deepspeed is slow

            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                param.mul_(mask.to(param.device, param.dtype))
        else:
            param.mul_(mask.to(param.device, param.dtype))


def mask_gradients(model, masks: str | Path | dict) -> list:
    """Register hooks that zero masked entries of each gradient; returns the handles (.remove() undoes)."""
    handles = []
    for param, mask in _masked_parameters(model, load_masks(masks)):
        mask = mask.to(param.device)
        handles.append(param.register_hook(lambda g, m=mask: g * m.to(g.dtype)))
    return handles


def mask_sparsity(masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return float(sum((~m).sum().item() for m in masks.values()) / max(total, 1))
