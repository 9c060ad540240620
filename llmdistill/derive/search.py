"""Minitron-style architecture search: which depth x width shape to prune to under a parameter and/or memory
budget.

Every shape on a grid (depth from min_layers to the teacher's, width fractions of hidden size, MLP size and KV
groups) is counted analytically (parameters, and serving memory: weights plus KV cache); those inside the
budget window are pruned with the same importance scores and
ranked by held-out loss right after pruning (Minitron ranks after a short retraining; `score_fn` lets the
trainer plug that in)."""

from __future__ import annotations

import math
from collections.abc import Callable

from llmdistill.config import DeriveSearch, LLMDistillError
from llmdistill.derive.prune import head_dim, shape_parameters, teacher_shape, validate_shape

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 2**30


def budget_parameters(budget: float, teacher_params: int) -> int:
    """A fraction (<= 1) of the teacher's parameters, or an absolute count (> 1)."""
    n = int(budget * teacher_params) if budget <= 1 else int(budget)
    if n > teacher_params:
        raise LLMDistillError(
            f"derive.search.param_budget={budget:g} is larger than the teacher ({teacher_params:,})"
        )
    return n


def _round_to(x: float, multiple: int, upper: int) -> int:
    return min(upper, max(multiple, int(round(x / multiple)) * multiple)) if upper >= multiple else upper


def enumerate_shapes(config, search: DeriveSearch) -> list[dict[str, int]]:
    """Every distinct valid shape on the grid; query heads per KV group stay the teacher's."""
    t = teacher_shape(config)
    per_group = t["num_attention_heads"] // t["num_key_value_heads"]
    fractions = sorted(set(search.width_fractions), reverse=True)
    if any(not 0 < f <= 1 for f in fractions):
        raise LLMDistillError(
            f"derive.search.width_fractions must lie in (0, 1], got {search.width_fractions}"
        )
    hiddens = sorted(
        {_round_to(t["hidden_size"] * f, search.size_multiple, t["hidden_size"]) for f in fractions}
    )
    ffns = sorted(
        {
            _round_to(t["intermediate_size"] * f, search.size_multiple, t["intermediate_size"])
            for f in fractions
        }
    )
    kvs = sorted({max(1, math.ceil(t["num_key_value_heads"] * f)) for f in fractions})
    shapes = []
    for layers in range(min(search.min_layers, t["num_layers"]), t["num_layers"] + 1):
        for hidden in hiddens:
            for ffn in ffns:
                for kv in kvs:
                    shape = {
                        "num_layers": layers,
                        "hidden_size": hidden,
                        "intermediate_size": ffn,
                        "num_attention_heads": kv * per_group,
                        "num_key_value_heads": kv,
                    }
                    try:
                        validate_shape(config, shape)
                    except LLMDistillError:
                        continue  # a family's own constraint (Phi-3 longrope) rules this grid point out
                    shapes.append(shape)
    return shapes


def cached_tokens_per_layer(config, context: int) -> float:
    """Tokens a layer keeps in its KV cache, on average over the layers: a sliding-window layer keeps at most
    its window less one. Which teacher layers a derivation keeps is not known yet, so the teacher's share of
    sliding layers stands for the student's (Gemma-2 alternates, Gemma-3 has five in six, Mistral slides in
    all)."""
    window = getattr(config, "sliding_window", None)
    if not window or window > context:
        return float(context)
    types = getattr(config, "layer_types", None)
    sliding = sum(t == "sliding_attention" for t in types) / len(types) if types else 1.0
    # The newest token attends to itself and the window - 1 before it: those are what the cache keeps.
    return sliding * (window - 1) + (1 - sliding) * context


def memory_gb(params: int, config, shape: dict[str, int], search: DeriveSearch) -> float:
    """GiB to serve a shape: its weights plus a KV cache (keys and values, every layer)."""
    per_value = DTYPE_BYTES[search.memory_dtype]
    kv_cache = (
        2
        * shape["num_layers"]
        * shape["num_key_value_heads"]
        * head_dim(config)
        * cached_tokens_per_layer(config, search.memory_context)
        * search.memory_batch
    )
    return (params + kv_cache) * per_value / GIB


def feasible_shapes(config, named_shapes, search: DeriveSearch, teacher_params: int) -> list[dict]:
    """Shapes under every budget given that use at least (1 - tolerance) of one of them, largest first."""
    limits = {}  # budget name -> (the candidate's value of it, the limit)
    if search.param_budget is not None:
        limits["param_budget"] = budget_parameters(search.param_budget, teacher_params)
    if search.memory_budget_gb is not None:
        limits["memory_budget_gb"] = search.memory_budget_gb
    counted = []
    for s in enumerate_shapes(config, search):
        n = shape_parameters(named_shapes, config, s)
        counted.append({"shape": s, "params": n, "memory_gb": memory_gb(n, config, s, search)})
    value = {"param_budget": "params", "memory_budget_gb": "memory_gb"}

    def fits(c):
        used = [c[value[k]] / limit for k, limit in limits.items()]
        return max(used) <= 1 and max(used) >= 1 - search.tolerance

    feasible = [c for c in counted if fits(c)]
    if not feasible:
        asked = ", ".join(f"{k}={getattr(search, k):g}" for k in limits)
        smallest = min(counted, key=lambda c: c["params"], default=None)
        seen = (
            "no valid shape on the grid"
            if smallest is None
            else f"smallest candidate {smallest['params']:,} parameters, {smallest['memory_gb']:.3g} GiB"
        )
        teacher_gb = memory_gb(teacher_params, config, teacher_shape(config), search)
        raise LLMDistillError(
            f"derive.search: no shape on the grid fits {asked} within tolerance {search.tolerance:g} "
            f"(teacher {teacher_params:,} parameters, {teacher_gb:.3g} GiB; {seen}); "
            "widen tolerance, width_fractions or min_layers"
        )
    return sorted(feasible, key=lambda c: (-c["params"], -c["shape"]["num_layers"]))


def pick_candidates(feasible: list[dict], max_candidates: int) -> list[dict]:
    """Up to max_candidates shapes spread over depths: the largest of each depth first, round-robin."""
    by_depth: dict[int, list[dict]] = {}
    for c in feasible:
        by_depth.setdefault(c["shape"]["num_layers"], []).append(c)
    queues = [by_depth[d] for d in sorted(by_depth, reverse=True)]
    picked = []
    while len(picked) < max_candidates and any(queues):
        for q in queues:
            if q and len(picked) < max_candidates:
                picked.append(q.pop(0))
    return picked


def rank_candidates(
    candidates: list[dict], plan_for: Callable[[dict], dict], score_fn: Callable[[dict], float]
) -> list[dict]:
    """Score each candidate's plan (lower is better) and return them best first, with their plans."""
    ranked = []
    for c in candidates:
        plan = plan_for(c["shape"])
        ranked.append({**c, "loss": float(score_fn(plan)), "plan": plan})
    ranked.sort(key=lambda c: c["loss"])
    for i, c in enumerate(ranked):
        c["rank"] = i + 1
    return ranked
