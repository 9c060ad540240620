"""Loading and saving HF models and tokenizers, the checks between teacher and student, PEFT wrapping."""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.initialization import no_init_weights
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from transformers.utils import (
    is_flash_attn_2_available,
    is_flash_attn_3_available,
    is_torch_flex_attn_available,
)

from llmdistill.config import LLMDistillError, PeftConfig
from llmdistill.embedded import EMBEDDED_MODELS, STUDENT_TOKENIZERS, student_tokenizer
from llmdistill.embedded import EMBEDDED_TEACHER as EMBEDDED_TEACHER  # importers read it from here

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# The fields of a model config that fix its parameters' shapes: a checkpoint, or a served copy of the student,
# of another shape cannot take these weights.
SHAPE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
)


def model_shape(config) -> dict:
    raw = config.to_dict()
    return {k: raw[k] for k in SHAPE_KEYS if k in raw}


def resolve_model_path(path: str, what: str, tokenizer_only: bool = False) -> str:
    """A local dir, a hub name, "embedded" or "embedded:chat"; a missing local path is an error naming `what`
    (the field)."""
    if path in EMBEDDED_MODELS:
        if not (EMBEDDED_MODELS[path] / "config.json").exists():
            raise LLMDistillError(f"{what}: the embedded model {path!r} is not built; run `make teacher`")
        return str(EMBEDDED_MODELS[path])
    if tokenizer_only and path.startswith("embedded:"):
        # Student tokenizers built on demand from the embedded corpus, for cross-tokenizer configs (alm.yaml).
        if path.split(":", 1)[1] not in STUDENT_TOKENIZERS:
            known = sorted(STUDENT_TOKENIZERS)
            raise LLMDistillError(f"{what}: unknown embedded tokenizer {path!r}; known: {known}")
        return str(student_tokenizer(path.split(":", 1)[1]))
    p = Path(path)
    looks_local = path.startswith((".", "/", "~")) or p.exists() or path.count("/") != 1
    if looks_local:
        p = p.expanduser()
        if not p.exists():
            raise LLMDistillError(f"{what}: model path not found: {path}")
        if not tokenizer_only and not (p / "config.json").exists():
            raise LLMDistillError(f"{what}: {path} is not a Hugging Face model directory (no config.json)")
        return str(p)
    return path  # a hub name; loading it fails with the hub's own message when offline


def load_tokenizer(path: str, trust_remote_code: bool = False):
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    path: str, dtype: str = "float32", trust_remote_code: bool = False, attn_implementation: str = "sdpa"
):
    try:
        return AutoModelForCausalLM.from_pretrained(
            path,
            dtype=DTYPES[dtype],
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
        )
    except ValueError as err:
        raise LLMDistillError(f"could not load model {path}: {err}") from None


def model_from_config(config, dtype: str = "float32", attn_implementation: str = "sdpa"):
    """A randomly initialised model; seed torch first for a reproducible init."""
    return AutoModelForCausalLM.from_config(
        config, dtype=DTYPES[dtype], attn_implementation=attn_implementation
    )


# The attention kernels a machine may lack: how transformers tells, and what they need.
OPTIONAL_KERNELS = {
    "flash_attention_2": (is_flash_attn_2_available, "the flash-attn package and a CUDA GPU"),
    "flash_attention_3": (is_flash_attn_3_available, "flash-attn 3 (flash_attn_interface) and a Hopper GPU"),
    "flex_attention": (is_torch_flex_attn_available, "torch >= 2.5"),
}
# The kernels through which transformers applies a model's attn_logit_softcapping (Gemma-2): eager and
# flex_attention cap the scores themselves, flash kernels get `softcap` where their function takes it (see
# flash_kernel_takes_softcap); its sdpa path passes the cap nowhere, so the scores go uncapped.
SOFTCAP_KERNELS = ("eager", "flex_attention", "flash_attention_2", "flash_attention_3")


def check_attn_implementation(name: str, field: str) -> None:
    """Refuse an attention kernel this machine cannot run, naming the config field, before weights load."""
    if name in OPTIONAL_KERNELS and not OPTIONAL_KERNELS[name][0]():
        raise LLMDistillError(f"{field}={name} needs {OPTIONAL_KERNELS[name][1]}, which this machine lacks")


def flash_kernel_takes_softcap(name: str) -> bool:
    """Whether the flash kernel transformers runs for `name` takes a `softcap` argument (flash-attn >= 2.6):
    transformers passes the cap to the varlen function (the one packed batches use) only if it does."""
    from transformers.modeling_flash_attention_utils import lazy_import_flash_attention

    (_, varlen, *_), _ = lazy_import_flash_attention(name)
    return varlen is not None and "softcap" in inspect.signature(varlen).parameters


def check_attn_softcapping(name: str, field: str, config) -> None:
    """Refuse an attention kernel that would silently skip the model's attention-logit soft-capping
    (`attn_logit_softcapping`, Gemma-2), naming the config field; needs only the config."""
    cap = getattr(config, "attn_logit_softcapping", None)
    if cap is None:
        return
    if name not in SOFTCAP_KERNELS:
        raise LLMDistillError(
            f"{field}={name} ignores the model's attn_logit_softcapping={cap} (transformers' {name} path "
            "drops it): use eager or flex_attention"
        )
    # A flash kernel this machine lacks is refused by check_attn_implementation before weights load.
    if name.startswith("flash_attention") and OPTIONAL_KERNELS[name][0]():
        if not flash_kernel_takes_softcap(name):
            raise LLMDistillError(
                f"{field}={name}: the installed flash kernel takes no softcap, so it would ignore the "
                f"model's attn_logit_softcapping={cap}: upgrade flash-attn (>= 2.6) or use eager or "
                "flex_attention"
            )


def generation_config_of(path: str):
    """The generation config saved beside the model at `path` (EOS ids, sampling defaults), or None if it has
    none (or the hub cannot be reached)."""
    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return None


def liger_patches(model_type: str, field: str = "train.liger"):
    """liger-kernel's function that patches an instance, after checking it is installed and knows
    `model_type`; call it before any weights load."""
    try:
        from liger_kernel.transformers.monkey_patch import (  # lazy: optional, GPU-only
            MODEL_TYPE_TO_APPLY_LIGER_FN,
            _apply_liger_kernel_to_instance,
        )
    except ImportError:
        raise LLMDistillError(
            f"{field}: liger-kernel is not installed (pip install 'llmdistill[gpu]'; it needs a CUDA GPU)"
        ) from None
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise LLMDistillError(f"{field}: liger-kernel has no kernels for model type {model_type!r}")
    return _apply_liger_kernel_to_instance


def apply_liger(model, field: str = "train.liger") -> None:
    """liger-kernel's Triton kernels in place of the model's RMSNorm, SwiGLU MLP and RoPE.

    The LM head and loss are left alone: the objective applies the head itself, chunk by chunk."""
    patch = liger_patches(getattr(model.config, "model_type", None), field)
    patch(
        model=model,
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
    )


def config_with_overrides(base_config, overrides: dict):
    """The teacher's config with `overrides` (student.from_teacher). A new num_hidden_layers takes the
    teacher's per-layer attention pattern (`layer_types`: Qwen2/3, Gemma-2/3) along: cut to the new depth, or
    repeated from its start when deeper, unless `layer_types` is overridden too."""
    raw = base_config.to_dict()
    unknown = sorted(k for k in overrides if k not in raw)
    if unknown:
        raise LLMDistillError(f"student.from_teacher: {unknown} are not fields of the teacher's config")
    layers = overrides.get("num_hidden_layers")
    if isinstance(layers, int) and not isinstance(layers, bool) and layers > 0:
        pattern = raw.get("layer_types")
        if pattern and "layer_types" not in overrides:
            raw["layer_types"] = [pattern[i % len(pattern)] for i in range(layers)]
        if raw.get("max_window_layers") is not None and "max_window_layers" not in overrides:
            # Qwen2/3: the layers below this index never slide; there are no more of them than layers.
            raw["max_window_layers"] = min(raw["max_window_layers"], layers)
    raw.update(overrides)
    return _config_for_model(raw.pop("model_type"), raw, "student.from_teacher")


def config_from_dict(raw: dict):
    raw = dict(raw)
    if "model_type" not in raw:
        raise LLMDistillError("student.config: needs a model_type (e.g. llama, qwen2, mistral)")
    return _config_for_model(raw.pop("model_type"), raw, "student.config")


def _config_for_model(model_type: str, fields: dict, field: str):
    """transformers' config of `model_type`; one that its validators refuse is one line naming `field`."""
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (ValueError, TypeError, StrictDataclassError) as err:
        # huggingface_hub's validation errors span lines ("Class validation error ...:\n    ValueError: ...")
        raise LLMDistillError(f"{field}: {' '.join(str(err).split())}") from None


def count_parameters(model) -> int:
    # Under ZeRO-3 a parameter's local tensor is empty; ds_numel holds its full size.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def max_positions(config) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def check_sequence_length(seq_len: int, config, what: str) -> None:
    limit = max_positions(config)
    if limit is not None and seq_len > limit:
        raise LLMDistillError(f"data.seq_len={seq_len} is above the {what}'s maximum sequence length {limit}")


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.all_special_tokens == b.all_special_tokens


def check_vocabularies(
    teacher_tok, student_tok, teacher_config, student_config, cross_tokenizer_loss: bool
) -> str:
    """Refuse a tokenizer mismatch unless a cross-tokenizer loss is configured; returns a note for the log."""
    if not same_tokenizer(teacher_tok, student_tok):
        if cross_tokenizer_loss:
            return "teacher and student tokenizers differ: cross-tokenizer loss in use"
        raise LLMDistillError(
            f"teacher and student tokenizers differ (teacher: {len(teacher_tok)} tokens, student: "
            f"{len(student_tok)} tokens); distilling across tokenizers needs the 'alm' or 'uld' loss"
        )
    for who, config in (("teacher", teacher_config), ("student", student_config)):
        if config.vocab_size < len(teacher_tok):
            raise LLMDistillError(
                f"{who} vocab_size {config.vocab_size} is smaller than its tokenizer ({len(teacher_tok)})"
            )
    if teacher_config.vocab_size != student_config.vocab_size:
        return (
            f"padded vocabularies differ (teacher {teacher_config.vocab_size}, "
            f"student {student_config.vocab_size}):"
            f" losses compare the shared range"
        )
    return ""


def wrap_peft(model, cfg: PeftConfig):
    from peft import LoraConfig, get_peft_model  # lazy: peft is needed only for LoRA students

    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def empty_model(config, dtype: str = "float32", attn_implementation: str = "sdpa"):
    """A model of `config` whose weights are left uninitialised, for a whole state dict to fill
    (load_whole_state): a random init would only be overwritten, and takes minutes for a model of billions of
    parameters on a CPU. Buffers computed from the config (rotary frequencies) are built as usual, and tied
    weights are tied, as transformers' own init would: PEFT, finding a config that says "tied" over weights
    that are not, sets tie_word_embeddings=False on the config it shares with the caller."""
    with no_init_weights():
        model = model_from_config(config, dtype, attn_implementation)
    model.tie_weights()
    return model


def load_whole_state(model, state_dict: dict) -> None:
    """Load `state_dict` into `model`, which must take every weight from it but an LM head tied to the
    embeddings."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = (
        {k for k in missing if k.endswith("lm_head.weight")}
        if getattr(model.config, "tie_word_embeddings", False)
        else set()
    )
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"state dict does not match the model: missing {missing}, unexpected {unexpected}")


def state_to_model(state_dict: dict, config, peft: PeftConfig | None):
    """A plain fp32 model holding a full state dict: PEFT adapters merged, tied weights restored."""
    unset_hf_deepspeed_config()  # the skeleton below must be a plain model, not a ZeRO-3 partitioned one
    model = empty_model(config, "float32")
    if peft is not None:
        model = wrap_peft(model, peft)
    load_whole_state(model, state_dict)
    if peft is not None:
        model = model.merge_and_unload()
    model.tie_weights()
    return model


def honour_umask(root: Path) -> None:
    """Give every file under `root` the permissions the umask asks for (0644 under umask 022): safetensors
    writes its files 0600 whatever the umask, so a shared run directory's weights would be unreadable to
    the group."""
    umask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(umask)
    for f in [root] if root.is_file() else root.rglob("*"):
        if f.is_file():
            f.chmod(0o666 & ~umask)


def save_student(
    model, tokenizer, out_dir: Path, dtype: str, card: dict | None = None, extra_files: tuple[Path, ...] = ()
) -> Path:
    """Write `model` as a plain HF checkpoint (safetensors) with its tokenizer, `card` as llmdistill.json and
    `extra_files` copied beside it.

    Written into a temporary directory and renamed, so a crash never leaves a half-written student behind.
    """
    model = model.to(DTYPES[dtype])
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for extra in extra_files:
        shutil.copy(extra, tmp / Path(extra).name)
    if card is not None:
        (tmp / "llmdistill.json").write_text(json.dumps(card, indent=2))
    honour_umask(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
    return out_dir
