import pytest
import torch

from llmdistill import models
from llmdistill.config import LLMDistillError, PeftConfig


def test_missing_model_path_is_named(tmp_path):
    with pytest.raises(LLMDistillError, match=r"teacher\.path: model path not found"):
        models.resolve_model_path(str(tmp_path / "nope"), "teacher.path")
    with pytest.raises(LLMDistillError, match="not a Hugging Face model directory"):
        models.resolve_model_path(str(tmp_path), "student.path")


def test_sequence_length_above_the_models_maximum(tiny_llama):
    models.check_sequence_length(128, tiny_llama.config, "teacher")
    with pytest.raises(
        LLMDistillError, match=r"data\.seq_len=129 is above the teacher's maximum sequence length 128"
    ):
        models.check_sequence_length(129, tiny_llama.config, "teacher")


def test_vocabulary_checks(embedded_tokenizer, tiny_llama):
    from llmdistill.data import train_bpe_tokenizer

    other = train_bpe_tokenizer(iter(["completely different text " * 50]), vocab_size=300)
    cfg = tiny_llama.config
    with pytest.raises(LLMDistillError, match="tokenizers differ .* needs the 'alm' or 'uld' loss"):
        models.check_vocabularies(embedded_tokenizer, other, cfg, cfg, cross_tokenizer_loss=False)
    assert "cross-tokenizer" in models.check_vocabularies(embedded_tokenizer, other, cfg, cfg, True)
    padded = cfg.__class__(**{**cfg.to_dict(), "vocab_size": 2112})
    assert "shared range" in models.check_vocabularies(
        embedded_tokenizer, embedded_tokenizer, cfg, padded, False
    )


def _with_tying(config, tied: bool):
    return config.__class__(**{**config.to_dict(), "tie_word_embeddings": tied})


@pytest.mark.parametrize("tied", [False, True])
def test_save_student_merges_lora_and_loads_with_plain_transformers(
    tmp_path, tiny_llama, embedded_tokenizer, tied
):
    from transformers import AutoModelForCausalLM

    config = _with_tying(tiny_llama.config, tied)
    peft_cfg = PeftConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    student = models.wrap_peft(models.model_from_config(config), peft_cfg)
    with torch.no_grad():  # LoRA's B starts at zero; make the adapter matter
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids = torch.randint(2, 2048, (2, 12))
    with torch.no_grad():
        expected = student(input_ids=ids).logits
    # As export gathers it: parameters only, a tied LM head once (as the embeddings)
    state = {k: v.detach().clone() for k, v in student.named_parameters()}
    merged = models.state_to_model(state, config, peft_cfg)
    out = models.save_student(merged, embedded_tokenizer, tmp_path / "student", "float32")
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_a_model_rebuilt_from_its_whole_state_is_the_same_model(tiny_llama, tied):
    config = _with_tying(tiny_llama.config, tied)
    torch.manual_seed(1)
    original = models.model_from_config(config).eval()
    state = {k: v for k, v in original.state_dict().items() if not (tied and k == "lm_head.weight")}
    rng = torch.random.get_rng_state()
    rebuilt = models.empty_model(config)
    # No random init ran: it would draw from torch's generator (and cost minutes at billions of weights).
    assert torch.equal(torch.random.get_rng_state(), rng)
    models.load_whole_state(rebuilt, state)
    assert (rebuilt.lm_head.weight is rebuilt.model.embed_tokens.weight) == tied
    want = dict(original.named_parameters()) | dict(original.named_buffers())  # rotary frequencies too
    got = dict(rebuilt.named_parameters()) | dict(rebuilt.named_buffers())
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    ids = torch.randint(2, 2048, (1, 9))
    with torch.no_grad():
        assert torch.equal(rebuilt(input_ids=ids).logits, original(input_ids=ids).logits)


def test_a_state_missing_a_weight_is_refused_by_name(tiny_llama):
    state = dict(tiny_llama.state_dict())
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(RuntimeError, match=r"missing \['model\.layers\.1\.mlp\.up_proj\.weight'\]"):
        models.load_whole_state(models.empty_model(tiny_llama.config), state)


def _sliding_config(model_type: str, layers: int = 4):
    """A small config of a family whose layers have attention types: Qwen3 with its first 2 layers full and
    the rest sliding, Gemma-2 alternating sliding and full."""
    from transformers import AutoConfig

    extra = {"use_sliding_window": True, "max_window_layers": 2} if model_type == "qwen3" else {}
    return AutoConfig.for_model(
        model_type,
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=8,
        **extra,
    )


@pytest.mark.parametrize(
    "model_type, layers, want_types, want_max_window",
    [
        ("qwen3", 3, ["full", "full", "sliding"], 2),
        ("qwen3", 1, ["full"], 1),
        ("qwen3", 6, ["full", "full", "sliding", "sliding", "full", "full"], 2),
        ("gemma2", 3, ["sliding", "full", "sliding"], None),
        ("gemma2", 6, ["sliding", "full"] * 3, None),
    ],
)
def test_a_new_depth_from_the_teacher_cuts_or_repeats_its_layer_types(
    model_type, layers, want_types, want_max_window
):
    teacher = _sliding_config(model_type)
    student = models.config_with_overrides(teacher, {"num_hidden_layers": layers})
    assert student.num_hidden_layers == layers
    assert student.layer_types == [f"{t}_attention" for t in want_types]
    assert getattr(student, "max_window_layers", None) == want_max_window
    # The teacher's own types, given with the depth, are taken as they are.
    given = ["full_attention"] * layers
    assert (
        models.config_with_overrides(teacher, {"num_hidden_layers": layers, "layer_types": given}).layer_types
        == given
    )


def test_a_config_transformers_refuses_is_one_line_naming_the_field():
    teacher = _sliding_config("gemma2")
    overrides = {"num_hidden_layers": 3, "layer_types": ["full_attention"]}
    with pytest.raises(LLMDistillError, match=r"^student\.from_teacher: .*`num_hidden_layers` \(3\)") as err:
        models.config_with_overrides(teacher, overrides)
    assert "\n" not in str(err.value)
    with pytest.raises(LLMDistillError, match=r"^student\.from_teacher: .*num_hidden_layers") as err:
        models.config_with_overrides(teacher, {"num_hidden_layers": "two"})
    assert "\n" not in str(err.value)
    raw = {**teacher.to_dict(), "num_hidden_layers": 3}  # student.config: the same list, left unchanged
    with pytest.raises(LLMDistillError, match=r"^student\.config: .*`num_hidden_layers` \(3\)") as err:
        models.config_from_dict(raw)
    assert "\n" not in str(err.value)


def test_an_attention_kernel_that_drops_the_softcapping_is_refused_by_field(monkeypatch):
    gemma2 = _sliding_config("gemma2")
    assert gemma2.attn_logit_softcapping == 50.0  # Gemma-2's default
    with pytest.raises(
        LLMDistillError,
        match=r"^student\.attn_implementation=sdpa ignores the model's attn_logit_softcapping=50\.0 .*eager",
    ):
        models.check_attn_softcapping("sdpa", "student.attn_implementation", gemma2)
    for kernel in ("eager", "flex_attention"):
        models.check_attn_softcapping(kernel, "student.attn_implementation", gemma2)
    uncapped = gemma2.__class__(**{**gemma2.to_dict(), "attn_logit_softcapping": None})
    models.check_attn_softcapping("sdpa", "teacher.attn_implementation", uncapped)
    models.check_attn_softcapping("sdpa", "teacher.attn_implementation", _sliding_config("qwen3"))

    # A flash kernel gets the cap only where its function takes it (flash-attn >= 2.6).
    available = (lambda: True, "")
    monkeypatch.setitem(models.OPTIONAL_KERNELS, "flash_attention_2", available)
    monkeypatch.setattr(models, "flash_kernel_takes_softcap", lambda name: True)
    models.check_attn_softcapping("flash_attention_2", "teacher.attn_implementation", gemma2)
    monkeypatch.setattr(models, "flash_kernel_takes_softcap", lambda name: False)
    with pytest.raises(
        LLMDistillError, match=r"^teacher\.attn_implementation=flash_attention_2: .*no softcap"
    ):
        models.check_attn_softcapping("flash_attention_2", "teacher.attn_implementation", gemma2)
