"""configs/recipes: every recipe loads, names its own command, and each derive/distil pair agrees on paths.

Pairing convention: `NAME.derive.yaml` writes the student that `NAME.yaml` distils (its student.path is what
`derive_output` says the derive recipe writes); any other distil recipe with a local student reads the output
of some derive recipe. The hub is unreachable here, so each teacher's published config is written below from
its model card / config.json: the derive recipe's shape is checked against it with the same validator and
parameter arithmetic the derivation uses, on a weightless (meta-device) model of the teacher.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from llmdistill import models
from llmdistill.config import load_config
from llmdistill.derive import derive_output
from llmdistill.derive.prune import check_supported, parameter_shapes, resolve_shape, shape_parameters
from llmdistill.derive.search import feasible_shapes
from llmdistill.losses import get_loss

RECIPES = Path(__file__).resolve().parent.parent / "configs" / "recipes"
DERIVE = sorted(RECIPES.glob("*.derive.yaml"))
# Distillation recipes: the others that name a student (eval-standard.yaml only benchmarks).
DISTIL = sorted(
    p for p in RECIPES.glob("*.yaml") if p not in DERIVE and "student" in yaml.safe_load(p.read_text())
)
# The teacher keys recipes may use: they stay stable while the teacher section is restructured.
TEACHER_KEYS = {"source", "path", "dtype", "trust_remote_code", "hidden_states", "attn_implementation"}

# Hub name -> (model_type, the config.json fields that size the model, parameters on the model card).
TEACHERS = {
    "meta-llama/Llama-3.1-8B": (
        "llama",
        dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=False,
        ),
        8.03e9,
    ),
    "meta-llama/Llama-3.2-3B": (
        "llama",
        dict(
            vocab_size=128256,
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=28,
            num_attention_heads=24,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=True,
        ),
        3.21e9,
    ),
    "Qwen/Qwen3-8B-Base": (
        "qwen3",
        dict(
            vocab_size=151936,
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=False,
        ),
        8.2e9,
    ),
    "Qwen/Qwen3-1.7B-Base": (
        "qwen3",
        dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=True,
        ),
        1.7e9,
    ),
    "mistralai/Mistral-7B-v0.3": (
        "mistral",
        dict(
            vocab_size=32768,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=False,
        ),
        7.25e9,
    ),
    "google/gemma-2-9b": (
        "gemma2",
        dict(
            vocab_size=256000,
            hidden_size=3584,
            intermediate_size=14336,
            num_hidden_layers=42,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            tie_word_embeddings=True,
        ),
        9.24e9,
    ),
}


def teacher_config(hub_name: str):
    from transformers import AutoConfig

    model_type, fields, _ = TEACHERS[hub_name]
    return AutoConfig.for_model(model_type, **fields)


def weightless_teacher(hub_name: str):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(teacher_config(hub_name))


def stated_parameters(path: Path) -> float:
    """The student size the recipe's header states, as `~4.51B parameters`."""
    found = re.search(r"~([\d.]+)B parameters", path.read_text())
    assert found, f"{path.name}: the header should state the student's size as ~N.NNB parameters"
    return float(found.group(1)) * 1e9


def test_there_is_a_recipe_for_each_family():
    teachers = {load_config(p).teacher.path for p in DERIVE}
    assert teachers == set(TEACHERS)
    assert len(DISTIL) >= len(DERIVE) + 1  # and a cross-tokenizer one


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_recipe_loads_and_starts_with_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and f"configs/recipes/{path.name}" in first
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    assert set(raw.get("teacher", {})) <= TEACHER_KEYS
    if path in DERIVE:
        assert "launch/derive.py" in first and cfg.derive is not None
        assert cfg.teacher.dtype == "bfloat16"
    elif path in DISTIL:
        assert "launch/train.py" in first
        assert cfg.train.dtype == cfg.student.dtype == cfg.teacher.dtype == "bfloat16"
        assert f"zero{cfg.deepspeed.zero_stage}.json" in cfg.deepspeed.config_file


@pytest.mark.parametrize("path", DERIVE, ids=lambda p: p.name)
def test_derive_recipe_pairs_with_its_distil_recipe(path):
    derive_cfg = load_config(path)
    distil = path.with_name(path.name.replace(".derive.yaml", ".yaml"))
    assert distil.is_file(), f"{path.name} has no distil recipe {distil.name}"
    distil_cfg = load_config(distil)
    assert distil_cfg.student.path == str(derive_output(derive_cfg))
    assert distil_cfg.teacher.path == derive_cfg.teacher.path


@pytest.mark.parametrize("path", DISTIL, ids=lambda p: p.name)
def test_every_local_student_is_a_derive_output(path):
    student = load_config(path).student.path
    outputs = {str(derive_output(load_config(p))) for p in DERIVE}
    assert student in outputs, f"{path.name}: student.path {student} is written by no derive recipe"


def test_the_cross_tokenizer_recipe_crosses_tokenizers():
    crossing = [p for p in DISTIL if any(get_loss(t.name).cross_tokenizer for t in load_config(p).loss)]
    assert crossing
    for path in crossing:
        cfg = load_config(path)
        source = next(p for p in DERIVE if str(derive_output(load_config(p))) == cfg.student.path)
        student_teacher = load_config(source).teacher.path
        # the student keeps its own teacher's vocabulary: a different tokenizer from the one teaching it
        assert TEACHERS[student_teacher][1]["vocab_size"] != TEACHERS[cfg.teacher.path][1]["vocab_size"]


@pytest.mark.parametrize("path", [*DERIVE, *DISTIL], ids=lambda p: p.name)
def test_recipes_run_their_models_under_kernels_that_keep_their_soft_capping(path):
    """Gemma-2 soft-caps its attention logits, which transformers' sdpa drops: derivation and preflight refuse
    sdpa for it, so a recipe names a kernel that applies the cap, for its teacher and for its student (a
    derived student keeps its teacher's config)."""
    cfg = load_config(path)
    teacher = teacher_config(cfg.teacher.path)
    models.check_attn_softcapping(cfg.teacher.attn_implementation, "teacher.attn_implementation", teacher)
    if path in DISTIL:
        source = next(p for p in DERIVE if str(derive_output(load_config(p))) == cfg.student.path)
        student = teacher_config(load_config(source).teacher.path)
        models.check_attn_softcapping(cfg.student.attn_implementation, "student.attn_implementation", student)


@pytest.mark.parametrize("hub_name", sorted(TEACHERS))
def test_teacher_table_matches_the_model_cards(hub_name):
    teacher = weightless_teacher(hub_name)
    published = TEACHERS[hub_name][2]
    assert sum(p.numel() for p in teacher.parameters()) == pytest.approx(published, rel=0.015)


@pytest.mark.parametrize("path", DERIVE, ids=lambda p: p.name)
def test_derive_recipe_shape_is_a_valid_pruning_of_the_teacher(path):
    cfg = load_config(path)
    teacher = weightless_teacher(cfg.teacher.path)
    config = teacher.config
    check_supported(config)
    named = parameter_shapes(teacher)
    total = sum(p.numel() for p in teacher.parameters())
    if cfg.derive.search is None:
        shape = resolve_shape(config, cfg.derive.target.model_dump() if cfg.derive.target else None)
        assert shape_parameters(named, config, shape) == pytest.approx(stated_parameters(path), rel=0.005)
    else:
        feasible = feasible_shapes(config, named, cfg.derive.search, total)
        assert len(feasible) >= cfg.derive.search.max_candidates
