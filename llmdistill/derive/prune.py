"""Apply a pruning plan to an HF decoder (Llama / Mistral / Qwen2 / Qwen3 / Gemma-2 / Gemma-3 / Phi-3 layout).

A *shape* is the student's five sizes (num_layers, hidden_size, intermediate_size, num_attention_heads,
num_key_value_heads); head_dim never changes. A *plan* says which teacher units survive: kept layers, kept
hidden channels, and per kept layer its query heads, KV heads and MLP neurons. Pruning works on the state
dict, driven by one table (`PARAM_AXES`) saying which unit each axis of each parameter indexes; the same table
counts the parameters of any shape, so the search's budget arithmetic and the pruning never disagree.

Family differences the table and `prune_state_dict` absorb: Phi-3 fuses q/k/v into `qkv_proj` and gate/up
into `gate_up_proj` (fused axes `qkv` and `ffn2`); Gemma-2/3 add norms after attention and the MLP, write
RMSNorm weights as (1 + w), and multiply the embedding by sqrt(hidden_size), a factor that changes with the
hidden size. Soft-capping, `head_dim` and `query_pre_attn_scalar` depend on no pruned size and stay as they
are."""

from __future__ import annotations

import copy
import re

import torch

from llmdistill.config import LLMDistillError
from llmdistill.models import empty_model, load_whole_state

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
# RMSNorm computes x / rms(x) * (1 + weight): a rescale by s maps weight to s * (1 + weight) - 1.
ONE_PLUS_NORM_TYPES = ("gemma2", "gemma3_text")
# The embedding output is multiplied by sqrt(hidden_size), recomputed from the student's (smaller) config.
SCALED_EMBEDDING_TYPES = ("gemma2", "gemma3_text")
SHAPE_KEYS = ("num_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")

# Parameter name suffix -> the unit each axis indexes. vocab/fixed axes are never pruned; q/kv axes are
# head-major (head h covers rows h*head_dim .. (h+1)*head_dim - 1).
PARAM_AXES = {
    "embed_tokens.weight": ("vocab", "hidden"),
    "lm_head.weight": ("vocab", "hidden"),
    "norm.weight": ("hidden",),
    "input_layernorm.weight": ("hidden",),
    "post_attention_layernorm.weight": ("hidden",),
    "pre_feedforward_layernorm.weight": ("hidden",),  # Gemma-2/3
    "post_feedforward_layernorm.weight": ("hidden",),
    "q_proj.weight": ("q", "hidden"),
    "q_proj.bias": ("q",),
    "k_proj.weight": ("kv", "hidden"),
    "k_proj.bias": ("kv",),
    "v_proj.weight": ("kv", "hidden"),
    "v_proj.bias": ("kv",),
    "o_proj.weight": ("hidden", "q"),
    "o_proj.bias": ("hidden",),
    "qkv_proj.weight": ("qkv", "hidden"),  # Phi-3: rows are [q heads | k heads | v heads]
    "qkv_proj.bias": ("qkv",),
    "q_norm.weight": ("fixed",),  # Qwen3 / Gemma-3 per-head norms act on head_dim, which stays
    "k_norm.weight": ("fixed",),
    "gate_proj.weight": ("ffn", "hidden"),
    "gate_proj.bias": ("ffn",),
    "up_proj.weight": ("ffn", "hidden"),
    "up_proj.bias": ("ffn",),
    "gate_up_proj.weight": ("ffn2", "hidden"),  # Phi-3: rows are [gate neurons | up neurons]
    "gate_up_proj.bias": ("ffn2",),
    "down_proj.weight": ("hidden", "ffn"),
    "down_proj.bias": ("hidden",),
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


# ------------------------------------------------------------------------------------------ checks and shapes


def check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = ", ".join(getattr(config, "architectures", None) or []) or "unknown architecture"
        raise LLMDistillError(
            f"derive: model type {model_type!r} ({arch}) is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    # Gemma names it hidden_activation
    act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None) or "silu"
    if act not in ("silu", "gelu", "gelu_pytorch_tanh", "relu"):
        raise LLMDistillError(f"derive: activation {act!r} is not supported")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def axes_of(name: str) -> tuple[str, ...]:
    # Match module + parameter exactly: "q_norm.weight" must not be taken for the final "norm.weight".
    axes = PARAM_AXES.get(".".join(name.split(".")[-2:]))
    if axes is not None:
        return axes
    raise LLMDistillError(f"derive: parameter {name} is not part of the supported decoder layouts")


def teacher_shape(config) -> dict[str, int]:
    return {
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
    }


def resolve_shape(config, target: dict | None) -> dict[str, int]:
    """The teacher's shape with the target's given fields; KV heads follow query heads at its ratio."""
    shape = teacher_shape(config)
    target = {k: v for k, v in (target or {}).items() if v is not None}
    unknown = sorted(set(target) - set(SHAPE_KEYS))
    if unknown:
        raise LLMDistillError(f"derive.target: unknown fields {unknown}; known: {list(SHAPE_KEYS)}")
    if "num_attention_heads" in target and "num_key_value_heads" not in target:
        ratio = shape["num_attention_heads"] // shape["num_key_value_heads"]
        q = target["num_attention_heads"]
        target["num_key_value_heads"] = q // ratio if q % ratio == 0 else shape["num_key_value_heads"]
    shape.update(target)
    validate_shape(config, shape)
    return shape


def validate_shape(config, shape: dict[str, int]) -> None:
    teacher = teacher_shape(config)
    for key in SHAPE_KEYS:
        if shape[key] < 1:
            raise LLMDistillError(f"derive: {key}={shape[key]} must be positive")
        if shape[key] > teacher[key]:
            raise LLMDistillError(
                f"derive: {key}={shape[key]} is larger than the teacher's {teacher[key]}; "
                "pruning only shrinks"
            )
    q, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    tq, tkv = teacher["num_attention_heads"], teacher["num_key_value_heads"]
    rope = getattr(config, "rope_parameters", None) or {}
    if config.model_type == "phi3" and rope.get("short_factor") is not None:
        # transformers checks Phi-3's longrope factors on hidden_size // num_attention_heads, not head_dim
        ratio = teacher["hidden_size"] // tq
        if shape["hidden_size"] // q != ratio:
            raise LLMDistillError(
                f"derive: this Phi-3 uses longrope, whose factors transformers checks against "
                f"hidden_size // num_attention_heads; keep it at {ratio} "
                f"(got {shape['hidden_size']} // {q} = {shape['hidden_size'] // q})"
            )
    if q % kv:
        raise LLMDistillError(
            f"derive: num_attention_heads={q} is not a multiple of num_key_value_heads={kv}"
        )
    if q // kv > tq // tkv:
        raise LLMDistillError(
            f"derive: {q} query heads over {kv} KV heads is {q // kv} per KV head, "
            f"more than the teacher's {tq // tkv}"
            f"; keep at least {-(-q // (tq // tkv))} KV heads"
        )


def shape_parameters(named_shapes: dict[str, tuple[int, ...]], config, shape: dict[str, int]) -> int:
    """Parameter count of the teacher pruned to `shape`, from the teacher's parameter shapes."""
    d = head_dim(config)
    size = {
        "hidden": shape["hidden_size"],
        "q": shape["num_attention_heads"] * d,
        "kv": shape["num_key_value_heads"] * d,
        "ffn": shape["intermediate_size"],
    }
    size["qkv"] = size["q"] + 2 * size["kv"]
    size["ffn2"] = 2 * size["ffn"]
    total = 0
    for name, dims in named_shapes.items():
        m = _LAYER.match(name)
        if m and int(m.group(1)) != 0:
            continue  # every layer has layer 0's shapes; count it num_layers times
        count = 1
        for axis, n in zip(axes_of(name), dims, strict=True):
            count *= size.get(axis, n)
        total += count * (shape["num_layers"] if m else 1)
    return total


def parameter_shapes(model) -> dict[str, tuple[int, ...]]:
    # named_parameters() lists a tied lm_head once (as the embedding), as the saved model counts it
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


# --------------------------------------------------------------------------------------------- choosing units


def top_indices(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, in ascending index order (keeps the teacher's unit order)."""
    order = torch.argsort(scores.double(), descending=True, stable=True)
    return sorted(order[:k].tolist())


def select_layers(layer_scores: torch.Tensor, n_keep: int, selection: str = "independent") -> list[int]:
    n = len(layer_scores)
    if selection == "independent":
        return top_indices(layer_scores, n_keep)
    # contiguous: drop the run of (n - n_keep) consecutive layers whose scores sum lowest
    n_drop = n - n_keep
    if n_drop == 0:
        return list(range(n))
    sums = [float(layer_scores[s : s + n_drop].sum()) for s in range(n - n_drop + 1)]
    start = min(range(len(sums)), key=sums.__getitem__)
    return [i for i in range(n) if not start <= i < start + n_drop]


def select_heads(
    head_scores: torch.Tensor, n_kv: int, new_q: int, new_kv: int
) -> tuple[list[int], list[int]]:
    """GQA-aware head choice: keep the best whole KV groups, then the best query heads inside each kept group.

    Each kept group keeps the same number of query heads, so query head j of the student still reads KV head
    j // (new_q // new_kv), exactly as in the teacher.
    """
    per_group = len(head_scores) // n_kv
    groups = head_scores.double().view(n_kv, per_group)
    kept_kv = top_indices(groups.sum(1), new_kv)
    kept_q = []
    for g in kept_kv:
        kept_q += [g * per_group + j for j in top_indices(groups[g], new_q // new_kv)]
    return kept_q, kept_kv


def norm_scales(norm_energy: dict[str, torch.Tensor], hidden: list[int]) -> dict[str, float]:
    """Per residual norm, the factor that keeps the kept channels' outputs unchanged after the others go.

    RMSNorm divides by the RMS over all channels; over fewer channels the RMS is sqrt(mean_kept / mean_all)
    times larger, so the weight is multiplied by that. Exact when the dropped channels are zero.
    """
    out = {}
    for name, e in norm_energy.items():
        mean_all = e.double().mean()
        mean_kept = e.double()[hidden].mean()
        out[name] = float((mean_kept / mean_all).sqrt()) if mean_all > 0 else 1.0
    return out


def importance_plan(
    scores: dict,
    layer_scores: torch.Tensor,
    config,
    shape: dict,
    selection: str = "independent",
    rescale_norms: bool = True,
) -> dict:
    """The plan keeping the highest-scored layers, channels, heads and neurons."""
    layers = select_layers(layer_scores, shape["num_layers"], selection)
    hidden = top_indices(scores["channels"], shape["hidden_size"])
    n_kv = teacher_shape(config)["num_key_value_heads"]
    heads, kv_heads, neurons = [], [], []
    for i in layers:
        q, kv = select_heads(
            scores["heads"][i], n_kv, shape["num_attention_heads"], shape["num_key_value_heads"]
        )
        heads.append(q)
        kv_heads.append(kv)
        neurons.append(top_indices(scores["neurons"][i], shape["intermediate_size"]))
    scales = norm_scales(scores["norm_energy"], hidden) if rescale_norms and "norm_energy" in scores else None
    return {
        "shape": dict(shape),
        "layers": layers,
        "hidden": hidden,
        "heads": heads,
        "kv_heads": kv_heads,
        "neurons": neurons,
        "norm_scale": scales,
    }


def random_plan(config, shape: dict, seed: int, norm_energy: dict | None = None) -> dict:
    """A plan of the same shape with every choice random (the baseline importance has to beat)."""
    g = torch.Generator().manual_seed(seed)
    teacher = teacher_shape(config)

    def rand_scores(n):
        return torch.rand(n, generator=g, dtype=torch.float64)

    layers = top_indices(rand_scores(teacher["num_layers"]), shape["num_layers"])
    scores = {
        "channels": rand_scores(teacher["hidden_size"]),
        "heads": torch.stack(
            [rand_scores(teacher["num_attention_heads"]) for _ in range(teacher["num_layers"])]
        ),
        "neurons": torch.stack(
            [rand_scores(teacher["intermediate_size"]) for _ in range(teacher["num_layers"])]
        ),
    }
    if norm_energy is not None:
        scores["norm_energy"] = norm_energy
    layer_scores = torch.zeros(teacher["num_layers"], dtype=torch.float64)
    layer_scores[layers] = 1.0
    return importance_plan(scores, layer_scores, config, shape)


def identity_plan(config) -> dict:
    shape = teacher_shape(config)
    return importance_plan(
        {
            "channels": torch.ones(shape["hidden_size"]),
            "heads": torch.ones(shape["num_layers"], shape["num_attention_heads"]),
            "neurons": torch.ones(shape["num_layers"], shape["intermediate_size"]),
        },
        torch.ones(shape["num_layers"]),
        config,
        shape,
        rescale_norms=False,
    )


# -------------------------------------------------------------------------------------------- applying a plan


def _expand_heads(heads: list[int], d: int) -> torch.Tensor:
    return torch.tensor([h * d + j for h in heads for j in range(d)], dtype=torch.long)


def _fused(parts: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
    """Indices into a fused axis made of blocks of the given teacher sizes, each cut by its own index."""
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return torch.cat([idx + off for idx, off in zip(parts, offsets, strict=True)])


def prune_state_dict(state_dict: dict[str, torch.Tensor], config, plan: dict) -> dict[str, torch.Tensor]:
    """The student's state dict: kept layers renumbered, every axis cut to its kept units."""
    d = head_dim(config)
    teacher = teacher_shape(config)
    q_size, kv_size = teacher["num_attention_heads"] * d, teacher["num_key_value_heads"] * d
    position = {t: s for s, t in enumerate(plan["layers"])}
    hidden = torch.tensor(plan["hidden"], dtype=torch.long)
    scales = dict(plan.get("norm_scale") or {})
    one_plus = config.model_type in ONE_PLUS_NORM_TYPES
    embed_factor = 1.0
    tied = getattr(config, "tie_word_embeddings", False)
    # A tied lm_head may also be in the state dict: it must carry the same (scaled) rows as the embedding.
    embedding_names = {"model.embed_tokens.weight"} | ({"lm_head.weight"} if tied else set())
    if config.model_type in SCALED_EMBEDDING_TYPES:
        # The student multiplies its embedding by sqrt(kept hidden) instead of sqrt(teacher hidden): scale the
        # rows up to match. A tied lm_head reads the same rows, so its logits would grow by the same factor;
        # the final norm takes it back.
        embed_factor = (teacher["hidden_size"] / len(plan["hidden"])) ** 0.5
        if tied:
            scales["model.norm"] = scales.get("model.norm", 1.0) / embed_factor
    out = {}
    for name, tensor in state_dict.items():
        m = _LAYER.match(name)
        index = {"hidden": hidden}
        new_name = name
        if m:
            teacher_layer = int(m.group(1))
            if teacher_layer not in position:
                continue
            s = position[teacher_layer]
            new_name = f"model.layers.{s}.{m.group(2)}"
            q = _expand_heads(plan["heads"][s], d)
            kv = _expand_heads(plan["kv_heads"][s], d)
            ffn = torch.tensor(plan["neurons"][s], dtype=torch.long)
            index |= {
                "q": q,
                "kv": kv,
                "ffn": ffn,
                "qkv": _fused([q, kv, kv], [q_size, kv_size, kv_size]),
                "ffn2": _fused([ffn, ffn], [teacher["intermediate_size"]] * 2),
            }
        pruned = tensor
        for axis, unit in enumerate(axes_of(name)):
            if unit in index:
                pruned = pruned.index_select(axis, index[unit].to(pruned.device))
        prefix = name.rsplit(".", 1)[0]
        if prefix in scales:
            if one_plus:  # in fp32: in bf16, 1 + w would round w to steps of 1/128
                pruned = ((pruned.float() + 1) * scales[prefix] - 1).to(pruned.dtype)
            else:
                pruned = pruned * scales[prefix]
        if name in embedding_names and embed_factor != 1.0:
            pruned = pruned * embed_factor
        out[new_name] = pruned.contiguous().clone()
    return out


def student_config(config, shape: dict):
    """The teacher's config with the five sizes replaced; head_dim and per-layer lists set explicitly."""
    new = copy.deepcopy(config)
    new.num_hidden_layers = shape["num_layers"]
    new.hidden_size = shape["hidden_size"]
    new.intermediate_size = shape["intermediate_size"]
    new.num_attention_heads = shape["num_attention_heads"]
    new.num_key_value_heads = shape["num_key_value_heads"]
    # Written explicitly: left out, transformers would recompute it as hidden_size // num_attention_heads.
    new.head_dim = head_dim(config)
    return new


def build_student(teacher, plan: dict):
    """A new HF model of the plan's shape holding the teacher's kept weights (teacher is not modified), under
    the teacher's attention kernel and with its generation config (EOS ids, sampling defaults), which a model
    built from a config would otherwise rebuild from the config alone."""

    config = student_config(teacher.config, plan["shape"])
    layer_types = getattr(teacher.config, "layer_types", None)
    if layer_types is not None:
        config.layer_types = [layer_types[i] for i in plan["layers"]]
    if hasattr(config, "max_window_layers"):
        # Qwen2/3: the layers below this index never slide; keep the same teacher layers non-sliding
        config.max_window_layers = sum(1 for i in plan["layers"] if i < teacher.config.max_window_layers)
    dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[teacher.dtype]
    # The held-out loss that ranks candidates must see what the teacher's kernel computes (Gemma-2's attention
    # soft-capping is dropped by sdpa, kept by eager).
    student = empty_model(config, dtype, teacher.config._attn_implementation)
    load_whole_state(student, prune_state_dict(teacher.state_dict(), teacher.config, plan))
    if teacher.generation_config is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.to(teacher.device)
