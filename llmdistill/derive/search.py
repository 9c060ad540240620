"""Minitron-style architecture search: which depth x width shape to prune to under a parameter budget.

Every shape on a grid (depth from min_layers to the teacher's, width fractions of hidden size, MLP size and KV
groups) is counted analytically; those inside the budget window are pruned with the same importance scores and
ranked by held-out loss right after pruning (Minitron ranks after a short retraining; `score_fn` lets the
trainer plug that in)."""

from __future__ import annotations

import math
from collections.abc import Callable

from llmdistill.config import DeriveSearch, LLMDistillError
from llmdistill.derive.prune import shape_parameters, teacher_shape, validate_shape


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
                    validate_shape(config, shape)
                    shapes.append(shape)
    return shapes


def feasible_shapes(config, named_shapes, search: DeriveSearch, teacher_params: int) -> list[dict]:
    """Shapes whose parameter count lies in [budget * (1 - tolerance), budget], largest first."""
    budget = budget_parameters(search.param_budget, teacher_params)
    low = budget * (1 - search.tolerance)
    counted = [(s, shape_parameters(named_shapes, config, s)) for s in enumerate_shapes(config, search)]
    feasible = [{"shape": s, "params": n} for s, n in counted if low <= n <= budget]
    if not feasible:
        smallest = min(n for _, n in counted)
        raise LLMDistillError(
            f"derive.search: no shape on the grid has between {int(low):,} and {budget:,} parameters "
            f"(teacher {teacher_params:,}, smallest candidate {smallest:,}); "
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
