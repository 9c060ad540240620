"""Gradient balancing between the objective's terms (MoKD-style), on the shared activation, not the
parameters.

What it does, per micro-batch:
1. The losses are evaluated on a detached copy `h` of the student's final hidden state (a leaf that
   requires grad).
2. For each term i whose value depends on h: g_i = d L_i / d h ([B, T, H], one `torch.autograd.grad` that runs
   only the loss's own part of the graph: the chunked head recomputation and its input gradient).
3. Magnitudes are equalised (`normalize`): every g_i is rescaled to the mean norm of the g's ("mean"), or to
   the norm of the task terms' gradient ("task": the `ce` terms), or left alone ("none"). So neither the task
   loss nor a distillation loss dominates merely by scale.
4. Conflicts are removed (`project`, PCGrad): when <g_i, g_j> < 0, g_i loses its component along g_j (against
   the other terms' normalised gradients, in the terms' fixed order, so runs are reproducible).
5. g* = sum_i weight_i * g_i, and the objective returns
       sum_i weight_i * L_i(h)  +  <g*, hidden>  -  <g*, hidden>.detach()
   whose value is the plain weighted sum (what is logged) and whose gradient is g* into the trunk (through the
   real `hidden`) plus, for parameters after h (the LM head, loss projections), the plain weighted sum.

Why on the activation: it needs no access to parameters or their gradients, so it is the same under DDP and
ZeRO 1/2/3 (parameters stay partitioned; nothing is gathered or communicated beyond what the losses already
do; each rank balances its own micro-batch). The trunk receives exactly one backward. Terms that do not read
the final hidden state (hidden_mse on intermediate layers) have no g_i and keep their plain gradient.

Extra cost: per balanced term, one backward through that loss alone (for the fused divergences: recompute the
chunk logits and one [chunk, V] x [V, H] matmul, i.e. ~2 of the head's 3 training matmuls), plus memory for
one [B, T, H] fp32 gradient per term and O(terms^2) dot products over B*T*H. The final backward also still
computes the (discarded) gradient into h. With one fused divergence + ce that is about 1.3x the loss part's
cost, and nothing extra in the transformer trunk.
"""

from __future__ import annotations

import torch

from llmdistill.config import BalanceConfig, config_from_dict


def parse_balance(balance, terms) -> BalanceConfig | None:
    """None (a plain weighted sum), the config's BalanceConfig, or a dict checked by that same schema, with
    the objective's `terms` (the config's rules that tie the two, e.g. normalize=task needs a task term)."""
    if balance is None:
        return None
    raw = balance.model_dump() if isinstance(balance, BalanceConfig) else dict(balance)
    return config_from_dict({"balance": raw, "loss": [t.model_dump() for t in terms]}).balance


def combine_gradients(
    grads: list[torch.Tensor], weights: list[float], names: list[str], spec: BalanceConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """g* from per-term gradients (same shape), following steps 3-5 of the module docstring."""
    flat = [g.float().reshape(-1) for g in grads]
    norms = [f.norm() for f in flat]
    # Tensors, not numbers: the trainer reads every metric once per optimizer step.
    metrics = {f"balance/norm_{n}": v.detach() for n, v in zip(names, norms, strict=True)}
    if spec.normalize != "none":
        if spec.normalize == "task":
            task = [v for n, v in zip(names, norms, strict=True) if n in spec.task_terms]
            target = torch.stack(task).mean()
        else:
            target = torch.stack(norms).mean()
        flat = [f * (target / v.clamp(min=1e-12)) for f, v in zip(flat, norms, strict=True)]
    if spec.project:
        projected = []
        for i, fi in enumerate(flat):
            out = fi
            for j, fj in enumerate(flat):
                if i == j:
                    continue
                # Only a conflicting (negative) component is removed; min(dot, 0) says so without a
                # branch on a device value.
                dot = torch.dot(out, fj).clamp(max=0.0)
                out = out - dot / fj.dot(fj).clamp(min=1e-24) * fj
            projected.append(out)
        for i in range(len(flat)):
            for j in range(i + 1, len(flat)):
                cos = torch.dot(flat[i], flat[j]) / (flat[i].norm() * flat[j].norm()).clamp(min=1e-12)
                metrics[f"balance/cos_{names[i]}_{names[j]}"] = cos.detach()
        flat = projected
    combined = sum(w * f for w, f in zip(weights, flat, strict=True))
    return combined.view_as(grads[0]).to(grads[0].dtype), metrics
