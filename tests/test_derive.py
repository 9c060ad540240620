"""llmdistill.derive: importance scores, pruning plans, search, masks and the end-to-end derivation."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from llmdistill.config import ConfigError, DeriveSearch, LLMDistillError, config_from_dict  # noqa: E402
from llmdistill.derive import derive_student  # noqa: E402
from llmdistill.derive.importance import (  # noqa: E402
    activation_scores,
    aggregate,
    combine_depth_scores,
    finish_aggregate,
    held_out_loss,
    layers_skipped,
    magnet_grad_scores,
    perplexity_scores,
)
from llmdistill.derive.masks import (  # noqa: E402
    apply_masks,
    load_masks,
    mask_gradients,
    mask_sparsity,
    saliency_masks,
)
from llmdistill.derive.prune import (  # noqa: E402
    build_student,
    check_supported,
    identity_plan,
    importance_plan,
    parameter_shapes,
    random_plan,
    resolve_shape,
    select_heads,
    select_layers,
    shape_parameters,
)
from llmdistill.derive.search import enumerate_shapes, feasible_shapes, pick_candidates  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 300


def tiny_config(family: str = "llama", **overrides):
    """A small random decoder of the given family; GQA (4 query heads over 2 KV heads), head_dim 32.

    Gemma-2/3 alternate sliding-window and full layers with a window shorter than the test sequences, so a
    layer kept with the wrong attention type changes the logits."""
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=family in ("llama", "qwen3", "gemma2", "gemma3_text"),
    )
    if family in ("gemma2", "gemma3_text"):
        # soft-capping on, at values the random logits reach, so that it is exercised
        common.update(sliding_window=8, final_logit_softcapping=3.0, attn_logit_softcapping=5.0)
        common.update(query_pre_attn_scalar=32)
    if family == "gemma3_text":
        common.update(sliding_window_pattern=2)
    if family == "phi3":
        common.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    common.update(overrides)
    cls = {
        "llama": LlamaConfig,
        "mistral": MistralConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
        "gemma2": Gemma2Config,
        "gemma3_text": Gemma3TextConfig,
        "phi3": Phi3Config,
    }[family]
    return cls(**common)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).eval()
    # Norm weights start at exactly 1; perturb them so that a wrongly indexed norm cannot go unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def random_batches(n: int = 2, batch: int = 2, seq: int = 24, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
        out.append(
            {
                "input_ids": ids,
                "position_ids": torch.arange(seq).expand(batch, seq),
                "targets": torch.roll(ids, -1, dims=1),
            }
        )
    return out


def logits(model, batch):
    with torch.no_grad():
        # no KV cache: a hand-cut teacher's layers keep their old layer_idx, which would index past its cache
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3"]


# ---------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_nothing_gives_the_teachers_logits(family):
    teacher = tiny_model(family)
    batch = random_batches()[0]
    scores = activation_scores(teacher, random_batches())
    shape = resolve_shape(teacher.config, None)
    plan = importance_plan(
        scores, combine_depth_scores({"b": scores["block_importance"]}), teacher.config, shape
    )
    assert plan["layers"] == [0, 1, 2, 3] and all(abs(s - 1) < 1e-12 for s in plan["norm_scale"].values())
    for p in (plan, identity_plan(teacher.config)):
        student = build_student(teacher, p)
        torch.testing.assert_close(logits(student, batch), logits(teacher, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gemma3_text", "phi3"])
def test_dropping_layers_equals_removing_them_by_hand(family):
    teacher = tiny_model(family, num_hidden_layers=5)
    keep = [0, 3, 4]  # drop {1, 2}: one sliding and one full layer in Gemma's alternation
    plan = identity_plan(teacher.config)
    plan = {
        **plan,
        "shape": {**plan["shape"], "num_layers": 3},
        "layers": keep,
        **{k: [plan[k][i] for i in keep] for k in ("heads", "kv_heads", "neurons")},
    }
    student = build_student(teacher, plan)

    by_hand = copy.deepcopy(teacher)
    by_hand.model.layers = torch.nn.ModuleList([by_hand.model.layers[i] for i in keep])
    by_hand.config.num_hidden_layers = 3
    if getattr(teacher.config, "layer_types", None) is not None:
        by_hand.config.layer_types = [teacher.config.layer_types[i] for i in keep]
    batch = random_batches()[0]
    torch.testing.assert_close(logits(student, batch), logits(by_hand, batch), atol=1e-5, rtol=0)
    assert student.config.num_hidden_layers == 3
    assert len(getattr(student.config, "layer_types", None) or [0] * 3) == 3
    if family.startswith("gemma"):  # the kept layers keep their sliding / full attention
        assert student.config.layer_types == [teacher.config.layer_types[i] for i in keep]
        assert len(set(student.config.layer_types)) == 2


def test_a_pruned_student_runs_under_the_teachers_attention_kernel():
    """The candidates' held-out loss runs on students built here: under sdpa they would drop the attention
    soft-capping that the teacher's eager kernel applies (Gemma-2; Gemma-3 has the field but never caps)."""
    from transformers import AutoModelForCausalLM

    sdpa = tiny_model("gemma2")
    with torch.no_grad():  # attention logits far past the cap (5.0), as a trained model's reach Gemma's 50
        for layer in sdpa.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    teacher = AutoModelForCausalLM.from_config(copy.deepcopy(sdpa.config), attn_implementation="eager").eval()
    teacher.load_state_dict(sdpa.state_dict())
    student = build_student(teacher, identity_plan(teacher.config))
    assert student.config._attn_implementation == "eager"
    batch = random_batches()[0]
    assert (logits(sdpa, batch) - logits(teacher, batch)).abs().max() > 1e-4  # the cap matters here
    torch.testing.assert_close(logits(student, batch), logits(teacher, batch), atol=1e-5, rtol=0)


def test_a_pruned_student_keeps_the_teachers_generation_config():
    teacher = tiny_model("qwen3", eos_token_id=5)
    teacher.generation_config.eos_token_id = [5, 7]  # a chat model's extra end-of-turn token
    teacher.generation_config.do_sample = True
    teacher.generation_config.temperature = 0.6
    teacher.generation_config.top_p = 0.95
    plan = random_plan(teacher.config, resolve_shape(teacher.config, {"num_layers": 2}), seed=0)
    student = build_student(teacher, plan)
    assert student.generation_config.to_dict() == teacher.generation_config.to_dict()
    assert student.generation_config is not teacher.generation_config


def test_select_layers_contiguous_and_independent():
    scores = torch.tensor([5.0, 1.0, 0.5, 4.0, 0.2, 6.0])
    assert select_layers(scores, 4, "independent") == [0, 1, 3, 5]
    assert select_layers(scores, 4, "contiguous") == [0, 3, 4, 5]  # run {1, 2} sums lowest (1.5)
    assert select_layers(scores, 6, "contiguous") == list(range(6))


def test_gqa_head_selection_keeps_whole_groups_and_consistent_heads():
    scores = torch.tensor([1.0, 2.0, 9.0, 8.0, 0.1, 0.2, 5.0, 0.3])  # 4 KV groups of 2 query heads
    q, kv = select_heads(scores, 4, 4, 2)
    assert kv == [1, 3] and q == [2, 3, 6, 7]
    q, kv = select_heads(scores, 4, 2, 2)  # one query head per kept group: its best
    assert kv == [1, 3] and q == [2, 6]


def zeroed_model(family: str):
    """A model where some KV groups, MLP neurons and hidden channels contribute exactly nothing.

    A zero v_proj row block silences every query head of that KV group; a zero up_proj row silences a neuron;
    a channel that the embedding, o_proj and down_proj never write stays zero in the residual stream. The tiny
    rms_norm_eps keeps RMSNorm exactly scale-free, so removing zero channels changes nothing once norms are
    rescaled. Phi-3's fused projections get the same rows zeroed inside qkv_proj and gate_up_proj.
    """
    ffn = 48
    model = tiny_model(
        family, num_key_value_heads=2, num_attention_heads=4, intermediate_size=ffn, rms_norm_eps=1e-12
    )
    d = 32
    dead_group, dead_neurons, dead_channels = {0: 1, 1: 0, 2: 1, 3: 1}, [3, 17, 40], [5, 6, 33, 60]
    v_offset = 4 * d + 2 * d if family == "phi3" else 0  # v rows follow the q and k rows in qkv_proj
    with torch.no_grad():
        model.model.embed_tokens.weight[:, dead_channels] = 0
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            v_proj = attn.qkv_proj if family == "phi3" else attn.v_proj
            rows = slice(v_offset + dead_group[i] * d, v_offset + (dead_group[i] + 1) * d)
            v_proj.weight[rows] = 0
            if v_proj.bias is not None:
                v_proj.bias[rows] = 0
            attn.o_proj.weight[dead_channels] = 0
            up_rows = [(n + 7 * i) % ffn for n in dead_neurons]
            if family == "phi3":  # up rows follow the gate rows in gate_up_proj
                mlp.gate_up_proj.weight[[ffn + r for r in up_rows]] = 0
            else:
                mlp.up_proj.weight[up_rows] = 0
            mlp.down_proj.weight[dead_channels] = 0
    return model, dead_group, dead_neurons, dead_channels


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"])
def test_width_pruning_removes_exactly_the_dead_units_and_keeps_outputs(family):
    model, dead_group, dead_neurons, dead_channels = zeroed_model(family)
    cfg = model.config
    scores = activation_scores(model, random_batches())
    shape = resolve_shape(
        cfg, {"hidden_size": 60, "intermediate_size": 45, "num_attention_heads": 2, "num_key_value_heads": 1}
    )
    plan = importance_plan(scores, torch.ones(4), cfg, shape)
    assert plan["hidden"] == [c for c in range(64) if c not in dead_channels]
    for i in range(4):
        live = 1 - dead_group[i]
        assert plan["kv_heads"][i] == [live] and plan["heads"][i] == [2 * live, 2 * live + 1]
        assert plan["neurons"][i] == sorted(set(range(48)) - {(n + 7 * i) % 48 for n in dead_neurons})
    student = build_student(model, plan)
    assert student.config.head_dim == 32 and student.config.hidden_size == 60
    batch = random_batches()[1]
    torch.testing.assert_close(logits(student, batch), logits(model, batch), atol=1e-5, rtol=1e-5)


def test_mha_prunes_single_query_heads():
    model = tiny_model("mistral", num_key_value_heads=4, rms_norm_eps=1e-12)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight[2 * 32 : 3 * 32] = 0  # head 2 writes nothing
    scores = activation_scores(model, random_batches())
    plan = importance_plan(
        scores, torch.ones(4), model.config, resolve_shape(model.config, {"num_attention_heads": 3})
    )
    assert all(h == [0, 1, 3] for h in plan["heads"]) and all(k == [0, 1, 3] for k in plan["kv_heads"])
    batch = random_batches()[0]
    torch.testing.assert_close(
        logits(build_student(model, plan), batch), logits(model, batch), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3_text", "phi3"])
def test_kept_heads_and_neurons_are_the_planned_ones(family, tmp_path):
    """A random plan's student equals the teacher with every other head and neuron masked out by hand.

    A query head writes only through its o_proj columns and a neuron only through its down_proj column, so
    zeroing those in the teacher removes exactly the units the plan drops: for Phi-3 this checks that the
    fused qkv_proj and gate_up_proj rows were cut at the right offsets. The student goes through
    save_pretrained / AutoModelForCausalLM.from_pretrained, as a derived checkpoint does.
    """
    from transformers import AutoModelForCausalLM

    teacher = tiny_model(family, num_attention_heads=4, num_key_value_heads=2)
    shape = resolve_shape(
        teacher.config, {"intermediate_size": 40, "num_attention_heads": 2, "num_key_value_heads": 1}
    )
    plan = random_plan(teacher.config, shape, seed=3)
    assert any(h != [0, 1] for h in plan["heads"])  # the plan really picks among heads
    build_student(teacher, plan).save_pretrained(tmp_path)
    student = AutoModelForCausalLM.from_pretrained(tmp_path).eval()

    masked = copy.deepcopy(teacher)
    with torch.no_grad():
        for i, layer in enumerate(masked.model.layers):
            for h in set(range(4)) - set(plan["heads"][i]):
                layer.self_attn.o_proj.weight[:, h * 32 : (h + 1) * 32] = 0
            layer.mlp.down_proj.weight[:, sorted(set(range(96)) - set(plan["neurons"][i]))] = 0
    batch = random_batches()[0]
    torch.testing.assert_close(logits(student, batch), logits(masked, batch), atol=1e-5, rtol=1e-5)
    assert type(student) is type(teacher) and student.config.intermediate_size == 40


# ---------------------------------------------------------------------------------------------- scores


def test_aggregations_compute_what_they_say_on_a_hand_built_tensor():
    # |activations| [sequences, tokens, units]: per-sequence means are unit 0: 2, 2; unit 1: 3.5, 0.
    magnitudes = torch.tensor([[[1.0, 7.0], [3.0, 0.0]], [[2.0, 0.0], [2.0, 0.0]]])
    tokens = torch.tensor(4.0)

    def score(aggregation, parts):
        total = sum(aggregate(m, aggregation) for m in parts)
        return finish_aggregate(total, tokens, aggregation).tolist()

    # mean over all tokens: 8 / 4 and 7 / 4, so unit 0 ranks first
    assert score("mean", [magnitudes]) == pytest.approx([2.0, 1.75])
    # Minitron: L2 over sequences of the per-sequence means, sqrt(2^2 + 2^2), sqrt(3.5^2): unit 1 first
    assert score("minitron", [magnitudes]) == pytest.approx([8**0.5, 3.5])
    # the sums add up over batches (and ranks): one sequence per batch gives the same scores
    for aggregation in ("mean", "minitron"):
        assert score(aggregation, [magnitudes[:1], magnitudes[1:]]) == score(aggregation, [magnitudes])


def test_minitron_head_score_is_the_l2_over_head_dim_then_mean_then_l2():
    model = tiny_model()
    batches = random_batches()
    inputs = []
    hook = model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    try:
        scores = activation_scores(model, batches, "minitron")
    finally:
        hook.remove()
    x = torch.cat(inputs).double().unflatten(-1, (4, 32))  # [sequences, tokens, heads, head_dim]
    want = x.norm(dim=-1).mean(dim=1).pow(2).sum(dim=0).sqrt()
    assert torch.allclose(scores["heads"][1], want, rtol=1e-5)
    assert not torch.allclose(activation_scores(model, batches)["heads"][1], want, rtol=1e-2)
    with pytest.raises(ValueError, match="aggregation"):
        activation_scores(model, batches, "median")


def test_depth_scores_and_layer_skipping():
    model = tiny_model("llama")
    batches = random_batches()
    base = held_out_loss(model, batches)
    with layers_skipped(model, {1}):
        assert len(model.model.layers) == 3
    assert len(model.model.layers) == 4 and held_out_loss(model, batches) == pytest.approx(base)
    ppl = perplexity_scores(model, batches, base)
    grad = magnet_grad_scores(model, batches)
    assert ppl.shape == grad.shape == (4,) and (grad > 0).all()
    assert all(p.grad is None for p in model.parameters())
    combined = combine_depth_scores({"a": ppl, "b": grad})
    assert combined.min() >= 0 and combined.max() <= 1


def test_block_importance_of_an_identity_layer_is_zero():
    model = tiny_model("llama")
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: input == output
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    bi = activation_scores(model, random_batches())["block_importance"]
    assert bi[2].abs() < 1e-6 and (bi[[0, 1, 3]] > 1e-4).all()


# ------------------------------------------------------------------------------------------ shapes and search


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma2", "gemma3_text", "phi3"])
def test_parameter_arithmetic_matches_built_students(family):
    teacher = tiny_model(family)
    named = parameter_shapes(teacher)
    for shape in (
        {"num_layers": 2, "hidden_size": 40},
        {"intermediate_size": 24, "num_attention_heads": 2},
        {"num_attention_heads": 2, "num_key_value_heads": 2},
    ):
        full = resolve_shape(teacher.config, shape)
        student = build_student(teacher, random_plan(teacher.config, full, seed=0))
        assert sum(p.numel() for p in student.parameters()) == shape_parameters(named, teacher.config, full)


def test_search_enumerates_feasible_shapes_under_the_budget():
    teacher = tiny_model("llama", num_hidden_layers=6)
    total = sum(p.numel() for p in teacher.parameters())
    search = DeriveSearch(param_budget=0.5, tolerance=0.15)
    shapes = enumerate_shapes(teacher.config, search)
    assert len({tuple(s.values()) for s in shapes}) == len(shapes)
    feasible = feasible_shapes(teacher.config, parameter_shapes(teacher), search, total)
    assert all(0.5 * total * 0.85 <= c["params"] <= 0.5 * total for c in feasible)
    picked = pick_candidates(feasible, 5)
    assert len(picked) == 5 and len({c["shape"]["num_layers"] for c in picked}) > 1


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gemma3_text"])
def test_memory_counts_weights_and_the_kv_cache_a_forward_pass_fills(family):
    """memory_gb equals the student's weight bytes plus the KV cache transformers builds for that batch;
    sliding-window layers (a window of 8 within the context of 20) keep only their window."""
    from llmdistill.derive.search import memory_gb

    teacher = tiny_model(family, **({} if family == "llama" else {"sliding_window": 8}))
    layers = (
        teacher.config.num_hidden_layers
    )  # all kept: the student's share of sliding layers is the teacher's
    shape = resolve_shape(teacher.config, {"num_layers": layers, "hidden_size": 48, "num_attention_heads": 2})
    student = build_student(teacher, random_plan(teacher.config, shape, seed=0)).to(torch.bfloat16)
    search = DeriveSearch(memory_budget_gb=1.0, memory_context=20, memory_batch=3, memory_dtype="bfloat16")
    with torch.no_grad():
        cache = student(input_ids=torch.randint(0, VOCAB, (3, 20)), use_cache=True).past_key_values
    kv_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    weight_bytes = sum(p.numel() * p.element_size() for p in student.parameters())
    params = shape_parameters(parameter_shapes(teacher), teacher.config, shape)
    assert memory_gb(params, teacher.config, shape, search) * 2**30 == weight_bytes + kv_bytes


def test_search_keeps_shapes_under_every_budget():
    from llmdistill.derive.search import memory_gb

    teacher = tiny_model("llama", num_hidden_layers=6)
    total = sum(p.numel() for p in teacher.parameters())
    named = parameter_shapes(teacher)
    memory = dict(memory_context=256, memory_batch=8, memory_dtype="float32")
    full = resolve_shape(teacher.config, None)
    teacher_gb = memory_gb(total, teacher.config, full, DeriveSearch(param_budget=1, **memory))
    by_params = feasible_shapes(teacher.config, named, DeriveSearch(param_budget=0.6, tolerance=0.3), total)
    by_memory = feasible_shapes(
        teacher.config, named, DeriveSearch(memory_budget_gb=0.5 * teacher_gb, tolerance=0.3, **memory), total
    )
    both = feasible_shapes(
        teacher.config,
        named,
        DeriveSearch(param_budget=0.6, memory_budget_gb=0.5 * teacher_gb, tolerance=0.3, **memory),
        total,
    )
    assert all(0.35 * teacher_gb <= c["memory_gb"] <= 0.5 * teacher_gb for c in by_memory)
    # The KV cache weighs here: the memory budget favours fewer layers and KV heads than the parameter budget.
    key = lambda c: tuple(c["shape"].values())  # noqa: E731
    assert {key(c) for c in by_memory} != {key(c) for c in by_params}
    assert both and all(c["params"] <= 0.6 * total and c["memory_gb"] <= 0.5 * teacher_gb for c in both)
    assert all(c["params"] >= 0.42 * total or c["memory_gb"] >= 0.35 * teacher_gb for c in both)
    assert {key(c) for c in both} < {key(c) for c in by_params} | {key(c) for c in by_memory}
    with pytest.raises(LLMDistillError, match="no shape on the grid fits memory_budget_gb="):
        feasible_shapes(teacher.config, named, DeriveSearch(memory_budget_gb=1e-6, **memory), total)
    with pytest.raises(ConfigError, match="give param_budget, memory_budget_gb or both"):
        config_from_dict({"derive": {"search": {"tolerance": 0.1}}})


def test_phi3_longrope_keeps_the_ratio_transformers_checks():
    """transformers sizes Phi-3's longrope factors by hidden_size // num_attention_heads: a shape that changes
    it is a clear error, and the search leaves such shapes out."""
    rope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0] * 16,
        "long_factor": [2.0] * 16,
        "original_max_position_embeddings": 64,
    }
    teacher = tiny_model("phi3", hidden_size=128, num_key_value_heads=4, rope_parameters=rope)
    with pytest.raises(LLMDistillError, match="longrope.*keep it at 32 \\(got 96 // 2 = 48\\)"):
        resolve_shape(teacher.config, {"hidden_size": 96, "num_attention_heads": 2})
    shape = resolve_shape(teacher.config, {"hidden_size": 96, "num_attention_heads": 3})
    student = build_student(teacher, random_plan(teacher.config, shape, seed=0))
    assert student.config.hidden_size == 96 and student.config.num_key_value_heads == 3
    search = DeriveSearch(param_budget=0.7, width_fractions=[1.0, 0.75, 0.5])
    shapes = enumerate_shapes(teacher.config, search)
    assert shapes and all(s["hidden_size"] // s["num_attention_heads"] == 32 for s in shapes)


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_targets_are_clear_errors():
    cfg = tiny_model("llama").config
    with pytest.raises(LLMDistillError, match="hidden_size=128 is larger than the teacher's 64"):
        resolve_shape(cfg, {"hidden_size": 128})
    with pytest.raises(
        LLMDistillError, match="num_attention_heads=3 is not a multiple of num_key_value_heads=2"
    ):
        resolve_shape(cfg, {"num_attention_heads": 3, "num_key_value_heads": 2})
    with pytest.raises(LLMDistillError, match="more than the teacher's 2"):
        resolve_shape(cfg, {"num_attention_heads": 4, "num_key_value_heads": 1})
    teacher = tiny_model("llama")
    total = sum(p.numel() for p in teacher.parameters())
    with pytest.raises(LLMDistillError, match="no shape on the grid fits param_budget=0.01"):
        feasible_shapes(cfg, parameter_shapes(teacher), DeriveSearch(param_budget=0.01), total)
    with pytest.raises(LLMDistillError, match="larger than the teacher"):
        feasible_shapes(cfg, parameter_shapes(teacher), DeriveSearch(param_budget=10 * total), total)


def test_unsupported_architecture_is_named():
    from transformers import Gemma3Config, GPT2Config

    with pytest.raises(LLMDistillError, match="'gpt2' .*GPT2LMHeadModel.* not supported"):
        check_supported(GPT2Config(architectures=["GPT2LMHeadModel"]))
    # Gemma-3's image-text checkpoints: only the text model (gemma3_text) is supported
    with pytest.raises(LLMDistillError, match="'gemma3' .*Gemma3ForConditionalGeneration.* not supported"):
        check_supported(Gemma3Config(architectures=["Gemma3ForConditionalGeneration"]))


def test_config_rejects_target_and_search_together():
    with pytest.raises(ConfigError, match="at most one of derive.target and derive.search"):
        config_from_dict({"derive": {"target": {"num_layers": 2}, "search": {"param_budget": 0.5}}})
    with pytest.raises(ConfigError, match="derive.target.layers: unknown key"):
        config_from_dict({"derive": {"target": {"layers": 2}}})


def test_calibration_batches_are_cut_the_same_whatever_the_world_size():
    import datasets

    from llmdistill.derive import calibration_batches

    n = 11
    ds = datasets.Dataset.from_dict(
        {k: [[i] * 4 for i in range(n)] for k in ("input_ids", "position_ids", "targets")}
    ).with_format("torch")
    one = calibration_batches(ds, 3, 0, 1, "cpu")
    two = calibration_batches(ds, 3, 0, 2, "cpu") + calibration_batches(ds, 3, 1, 2, "cpu")
    key = lambda b: b["input_ids"][:, 0].tolist()
    assert sorted(map(key, one)) == sorted(map(key, two)) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10]]


# ---------------------------------------------------------------------------------------------- masks


def test_saliency_masks_hit_the_sparsity_and_stay_zero_through_adamw():
    model = tiny_model("llama")
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    params = dict(model.named_parameters())
    grads = {n: torch.rand_like(params[n]) for n in names}
    masks = saliency_masks(grads, {n: params[n].detach() for n in names}, 0.25)
    assert mask_sparsity(masks) == pytest.approx(0.25, abs=1e-3)
    smallest = grads[names[0]].flatten().argmin()
    assert not masks[names[0]].flatten()[smallest]
    apply_masks(model, masks)
    mask_gradients(model, masks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for batch in random_batches(3):
        out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    for n in names:
        assert (params[n][~masks[n]] == 0).all() and (params[n][masks[n]] != 0).all()


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A random tiny Llama with a real (small) byte-level BPE tokenizer and a jsonl corpus, on disk."""
    from llmdistill.data import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("derive")
    texts = [p.read_text() for p in sorted(Path(json.__file__).parent.glob("*.py"))]
    texts += [p.read_text() for p in sorted(Path(subprocess.__file__).parent.glob("c*.py"))[:10]]
    tokenizer = train_bpe_tokenizer(iter(texts), VOCAB)
    model = tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=4)
    model.generation_config.eos_token_id = [0, 3]  # more stop tokens and sampling defaults than its config
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.6
    model.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return root


def derive_config(root: Path, derive: dict, name: str, teacher: str = "teacher", attn: str = "sdpa"):
    return config_from_dict(
        {
            "run": {"name": name, "output_dir": str(root / "runs")},
            "teacher": {"path": str(root / teacher), "attn_implementation": attn},
            "data": {
                "train": {"path": str(root / "corpus.jsonl")},
                "validation": {"path": str(root / "corpus.jsonl")},
                "seq_len": 64,
            },
            "train": {"device": "cpu"},
            "derive": {"calibration_samples": 8, "eval_samples": 4, "batch_size": 4, **derive},
        }
    )


def test_derive_student_writes_a_plain_hf_checkpoint(teacher_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = derive_config(
        teacher_dir,
        {
            "target": {"num_layers": 3, "hidden_size": 48, "intermediate_size": 64, "num_attention_heads": 2},
            "depth_methods": ["block_importance", "perplexity", "magnet_grad"],
            "masking": {"sparsity": 0.3},
        },
        "target",
    )
    out = derive_student(cfg)
    assert out == teacher_dir / "runs" / "target" / "derived"
    record = json.loads((out / "derivation.json").read_text())
    assert record["student_shape"] == {
        "num_layers": 3,
        "hidden_size": 48,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
    assert len(record["kept"]["layers"]) == 3 and len(record["kept"]["hidden"]) == 48
    assert set(record["scores"]["depth"]) == {"block_importance", "perplexity", "magnet_grad"}
    assert record["parameters"]["student"] < record["parameters"]["teacher"]
    assert record["masking"]["sparsity"] == pytest.approx(0.3, abs=1e-3)
    assert {p.name for p in (out / "plots").iterdir()} == {
        "layers.png",
        "heads.png",
        "neurons.png",
        "channels.png",
    }

    student = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, nothing of ours
    assert student.config.head_dim == 32 and student.config.num_key_value_heads == 1
    assert sum(p.numel() for p in student.parameters()) == record["parameters"]["student"]
    assert (
        AutoTokenizer.from_pretrained(out).get_vocab()
        == AutoTokenizer.from_pretrained(teacher_dir / "teacher").get_vocab()
    )
    # The teacher's stop tokens and sampling defaults, which its config alone does not hold.
    teacher_generation = json.loads((teacher_dir / "teacher" / "generation_config.json").read_text())
    assert teacher_generation["eos_token_id"] == [0, 3]
    assert json.loads((out / "generation_config.json").read_text()) == teacher_generation
    masks = load_masks(out)
    params = dict(student.named_parameters())
    assert all((params[n][~m] == 0).all() for n, m in masks.items())


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "phi3"])
def test_derive_student_on_other_families(teacher_dir, family):
    """The whole derivation on a Gemma-2 / Gemma-3 / Phi-3 teacher gives a checkpoint that plain transformers
    loads, equal to the plan written in derivation.json applied to the teacher."""
    from transformers import AutoModelForCausalLM

    teacher = tiny_model(family, vocab_size=VOCAB)
    teacher.save_pretrained(teacher_dir / family)
    for f in (teacher_dir / "teacher").glob("tokenizer*"):
        (teacher_dir / family / f.name).write_bytes(f.read_bytes())
    cfg = derive_config(
        teacher_dir,
        {
            "target": {"num_layers": 3, "hidden_size": 48, "intermediate_size": 64, "num_attention_heads": 2},
            "depth_methods": ["block_importance", "perplexity"],
            "plots": False,
        },
        f"derive-{family}",
        teacher=family,
        # Gemma's attention soft-capping: transformers' sdpa would drop it (refused below)
        attn="eager" if family.startswith("gemma") else "sdpa",
    )
    out = derive_student(cfg)
    record = json.loads((out / "derivation.json").read_text())
    student = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(student) is type(teacher)
    assert sum(p.numel() for p in student.parameters()) == record["parameters"]["student"]
    kept = record["kept"]
    if family != "phi3":
        assert student.config.layer_types == [teacher.config.layer_types[i] for i in kept["layers"]]
    plan = {"shape": record["student_shape"], **kept, "norm_scale": record["norm_scale"]}
    batch = random_batches()[0]
    torch.testing.assert_close(
        logits(student, batch), logits(build_student(teacher, plan), batch), atol=1e-5, rtol=0
    )


def test_derive_loads_the_teacher_under_its_kernel_and_refuses_one_that_drops_softcapping(
    teacher_dir, monkeypatch
):
    import llmdistill.derive as derive

    teacher = tiny_model("gemma2", vocab_size=VOCAB)
    teacher.save_pretrained(teacher_dir / "gemma2-kernel")
    for f in (teacher_dir / "teacher").glob("tokenizer*"):
        (teacher_dir / "gemma2-kernel" / f.name).write_bytes(f.read_bytes())
    derive_cfg = {"target": {"num_layers": 3}, "depth_methods": ["block_importance"], "plots": False}
    loaded = []

    def load_model(path, dtype="float32", trust_remote_code=False, attn_implementation="sdpa"):
        loaded.append(attn_implementation)
        return real_load_model(path, dtype, trust_remote_code, attn_implementation)

    real_load_model = derive.load_model
    monkeypatch.setattr(derive, "load_model", load_model)
    cfg = derive_config(teacher_dir, derive_cfg, "gemma2-sdpa", teacher="gemma2-kernel")
    with pytest.raises(
        LLMDistillError,
        match=r"^teacher\.attn_implementation=sdpa ignores the model's attn_logit_softcapping",
    ):
        derive_student(cfg)
    assert loaded == []  # refused before any weights load
    cfg = derive_config(teacher_dir, derive_cfg, "gemma2-eager", teacher="gemma2-kernel", attn="eager")
    derive_student(cfg)
    assert loaded == ["eager"]


def test_derive_student_search_ranks_candidates(teacher_dir):
    cfg = derive_config(
        teacher_dir,
        {"search": {"param_budget": 0.6, "tolerance": 0.2, "max_candidates": 4}, "plots": False},
        "search",
    )
    record = json.loads((derive_student(cfg) / "derivation.json").read_text())
    ranking = record["search"]["ranking"]
    assert len(ranking) == 4 and [c["rank"] for c in ranking] == [1, 2, 3, 4]
    assert [c["loss"] for c in ranking] == sorted(c["loss"] for c in ranking)
    assert record["student_shape"] == ranking[0]["shape"]
    assert record["held_out_loss"]["student"] == pytest.approx(ranking[0]["loss"], rel=1e-6)

    # The same search under a memory budget alone: 60% of what the teacher needs for 4 x 64 tokens in fp32.
    from llmdistill.derive.search import memory_gb
    from llmdistill.models import load_model

    teacher = load_model(str(teacher_dir / "teacher"))
    memory = {"memory_context": 64, "memory_batch": 4, "memory_dtype": "float32"}
    budget = 0.6 * memory_gb(
        record["parameters"]["teacher"],
        teacher.config,
        resolve_shape(teacher.config, None),
        DeriveSearch(memory_budget_gb=1, **memory),
    )
    cfg = derive_config(
        teacher_dir,
        {"search": {"memory_budget_gb": budget, "max_candidates": 3, **memory}, "plots": False},
        "search-memory",
    )
    record = json.loads((derive_student(cfg) / "derivation.json").read_text())
    assert record["search"]["memory_budget_gb"] == budget and record["search"]["budget"] is None
    assert len(record["search"]["ranking"]) == 3
    assert all(0.9 * budget <= c["memory_gb"] <= budget for c in record["search"]["ranking"])


def test_launcher_prints_one_line_errors(teacher_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [
        sys.executable,
        str(ROOT / "launch" / "derive.py"),
        f"teacher.path={teacher_dir / 'teacher'}",
        "derive.target.num_layers=9",
        f"data.train.path={teacher_dir / 'corpus.jsonl'}",
        "data.seq_len=64",
    ]
    run = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2
    assert (
        run.stderr.strip()
        == "error: derive: num_layers=9 is larger than the teacher's 4; pruning only shrinks"
    )


# ------------------------------------------------------------------------------------------- embedded teacher

# Set LLMDISTILL_DERIVE_TEACHER to run this against another trained teacher directory.
TRAINED_TEACHER = Path(
    os.environ.get("LLMDISTILL_DERIVE_TEACHER", ROOT / "llmdistill" / "embedded" / "teacher")
)


@pytest.mark.skipif(
    not (TRAINED_TEACHER / "config.json").exists(),
    reason="needs the trained embedded teacher (llmdistill/embedded/teacher; `make teacher`)",
)
def test_importance_beats_random_on_the_trained_teacher():
    """At ~50% of the teacher's parameters, importance-pruned beats every random plan of the same shape."""
    from llmdistill.config import DatasetSpec
    from llmdistill.derive import calibration_batches, packed_subset
    from llmdistill.derive.importance import depth_scores
    from llmdistill.models import load_model, load_tokenizer

    teacher = load_model(str(TRAINED_TEACHER)).eval()
    tokenizer = load_tokenizer(str(TRAINED_TEACHER))
    calib = calibration_batches(
        packed_subset(
            DatasetSpec(path="embedded:train", max_documents=200), tokenizer, 128, 32, "calibration"
        ),
        8,
        0,
        1,
        "cpu",
    )
    held_out = calibration_batches(
        packed_subset(DatasetSpec(path="embedded:validation"), tokenizer, 128, 16, "validation"),
        8,
        0,
        1,
        "cpu",
    )
    scores = activation_scores(teacher, calib)
    layer_scores = combine_depth_scores(
        depth_scores(teacher, calib, ["block_importance", "perplexity"], scores)
    )
    total = sum(p.numel() for p in teacher.parameters())
    # A shape that prunes depth and every width axis at once, near half the parameters.
    feasible = feasible_shapes(
        teacher.config, parameter_shapes(teacher), DeriveSearch(param_budget=0.5, tolerance=0.15), total
    )
    mixed = [
        c
        for c in feasible
        if all(
            v < t
            for v, t in zip(
                c["shape"].values(),
                (
                    teacher.config.num_hidden_layers,
                    teacher.config.hidden_size,
                    teacher.config.intermediate_size,
                    teacher.config.num_attention_heads + 1,
                    teacher.config.num_key_value_heads + 1,
                ),
                strict=True,
            )
        )
    ]
    shape = (mixed or feasible)[0]["shape"]
    ours = held_out_loss(
        build_student(teacher, importance_plan(scores, layer_scores, teacher.config, shape)), held_out
    )
    randoms = [
        held_out_loss(
            build_student(teacher, random_plan(teacher.config, shape, seed, scores["norm_energy"])), held_out
        )
        for seed in range(5)
    ]
    print(f"shape {shape}: importance {ours:.3f}, random {[round(r, 3) for r in randoms]}")
    assert ours < min(randoms), (shape, ours, randoms)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_held_out_loss_and_perplexity_scores_use_the_soft_capped_logits(family):
    """Gemma-2/3 soft-cap their logits after the head (final_logit_softcapping); derive's NLL applies the
    head itself, so it must cap too: held_out_loss and each perplexity score are those of the model's own
    logits."""
    import torch.nn.functional as F

    model = tiny_model(family)
    with torch.no_grad():  # logits of a trained model's size, so that the cap of 3 bites
        model.model.norm.weight.add_(6.0)
    batches = random_batches()

    def reference_loss():
        nll = sum(
            F.cross_entropy(logits(model, b).reshape(-1, VOCAB), b["targets"].reshape(-1), reduction="sum")
            for b in batches
        )
        return float(nll) / sum(b["targets"].numel() for b in batches)

    base = reference_loss()
    assert held_out_loss(model, batches) == pytest.approx(base, rel=1e-5)
    expected = []
    for i in range(model.config.num_hidden_layers):
        with layers_skipped(model, {i}):
            expected.append(reference_loss() - base)
    torch.testing.assert_close(
        perplexity_scores(model, batches), torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-5
    )
