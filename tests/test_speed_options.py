"""Speed options (README "Speed"): attention kernels keep packed documents apart, gradient checkpointing and
torch.compile give the same numbers, fused AdamW on CUDA, liger-kernel's clear error where it is missing."""

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import BF16, QUICK
from transformers import AutoModelForCausalLM

from llmdistill import models
from llmdistill.config import LLMDistillError, load_config
from llmdistill.losses.divergences import cross_entropy
from llmdistill.session import check_kernels, preflight
from llmdistill.signal import forward_to_head, packed_attention_kwargs
from llmdistill.train import adamw

FIRST, SECOND = 20, 30  # two packed documents, then padding-free filler to the row's end
ROW = 64


def _packed_row(vocab: int):
    torch.manual_seed(1)
    ids = torch.randint(2, vocab, (1, ROW))
    pos = torch.cat([torch.arange(FIRST), torch.arange(SECOND), torch.arange(ROW - FIRST - SECOND)])
    return ids, pos.unsqueeze(0)


def _cpu_kernels():
    kernels = ["eager", "sdpa"]
    from transformers.utils import is_torch_flex_attn_available

    if is_torch_flex_attn_available():
        kernels.append("flex_attention")  # forward only on CPU: torch has no flex backward there
    return kernels


@pytest.mark.parametrize("kernel", _cpu_kernels())
def test_packed_documents_stay_isolated_under_each_attention_kernel(tiny_llama, kernel):
    # A copy of the config: from_config records the kernel in the config it is given.
    config = copy.deepcopy(tiny_llama.config)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=kernel).eval()
    model.load_state_dict(tiny_llama.state_dict())
    ids, pos = _packed_row(tiny_llama.config.vocab_size)
    with torch.no_grad():
        packed = forward_to_head(model, {"input_ids": ids, "position_ids": pos}).logits()
        alone = forward_to_head(
            model,
            {"input_ids": ids[:, FIRST : FIRST + SECOND], "position_ids": pos[:, FIRST : FIRST + SECOND]},
        ).logits()
        # What isolation prevents: the same document seen after the first one, as a continuation of it.
        joined = forward_to_head(
            model, {"input_ids": ids, "position_ids": torch.arange(ROW).unsqueeze(0)}
        ).logits()
    second = packed[:, FIRST : FIRST + SECOND]
    torch.testing.assert_close(second, alone, atol=1e-5, rtol=1e-5)
    assert (joined[:, FIRST : FIRST + SECOND] - alone).abs().max() > 1e-3


def test_flash_attention_gets_each_documents_bounds_over_the_flattened_batch():
    # transformers' flash path infers documents from position_ids for one row only; we hand it the cuts.
    flash = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    _, row = _packed_row(100)
    pos = torch.cat([row, torch.arange(ROW).unsqueeze(0)])  # two rows: three documents, then one
    kwargs = packed_attention_kwargs(flash, pos)
    assert kwargs["cu_seq_lens_q"].tolist() == [0, FIRST, FIRST + SECOND, ROW, 2 * ROW]
    assert kwargs["cu_seq_lens_k"].tolist() == kwargs["cu_seq_lens_q"].tolist()
    assert int(kwargs["max_length_q"]) == ROW
    sdpa = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa"))
    assert packed_attention_kwargs(sdpa, pos) == {}


def test_a_missing_attention_kernel_is_a_one_line_error_naming_the_field():
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        pytest.skip("flash-attn is installed here: nothing to refuse")
    with pytest.raises(LLMDistillError, match=r"student.attn_implementation=flash_attention_2 needs"):
        models.check_attn_implementation("flash_attention_2", "student.attn_implementation")


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss, _ = cross_entropy(forward_to_head(model, batch), None, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_llama):
    config = copy.deepcopy(tiny_llama.config)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()
    model.load_state_dict(tiny_llama.state_dict())
    ids, pos = _packed_row(tiny_llama.config.vocab_size)
    targets = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
    batch = {"input_ids": ids, "position_ids": pos, "targets": targets}
    plain_loss, plain_grads = _loss_and_grads(model, batch)
    cfg = load_config(None, [*QUICK, "train.gradient_checkpointing=true"])
    from llmdistill.train import apply_speed_options

    apply_speed_options(model, None, cfg)
    assert model.model.gradient_checkpointing
    ckpt_loss, ckpt_grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(ckpt_loss, plain_loss, atol=1e-6, rtol=0)
    assert plain_grads.keys() == ckpt_grads.keys() and len(plain_grads) > 10
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_adamw_is_fused_on_cuda_and_foreach_on_cpu():
    params = [torch.nn.Parameter(torch.zeros(3))]
    cfg = load_config(None, list(QUICK))
    assert adamw(params, cfg, "cpu").defaults["foreach"] is True
    assert adamw(params, cfg, "cuda:0").defaults["fused"] is True
    offloaded = load_config(None, [*QUICK, "deepspeed.offload_optimizer=true"])
    # an offloaded optimizer steps CPU tensors
    assert not adamw(params, offloaded, "cuda:0").defaults["fused"]


def test_liger_without_liger_kernel_is_a_one_line_error_before_any_weights_load():
    try:
        import liger_kernel  # noqa: F401

        pytest.skip("liger-kernel is installed here: nothing to refuse")
    except ImportError:
        pass
    cfg = load_config(None, [*QUICK, "train.liger=true"])
    with pytest.raises(LLMDistillError, match=r"^train.liger: liger-kernel is not installed \(pip install"):
        check_kernels(cfg, preflight(cfg))


def test_compile_with_zero3_is_refused_in_the_config():
    with pytest.raises(LLMDistillError, match="train.compile: not supported with deepspeed.zero_stage=3"):
        load_config(None, [*QUICK, "train.compile=true", "deepspeed.zero_stage=3"])


@pytest.mark.slow  # inductor compiles the decoder layer on CPU: about a minute on a shared 2-core machine
def test_compiled_student_trains_like_the_eager_one(tmp_path, one_rank):
    from llmdistill.train import Trainer

    losses = {}
    for compiled in (False, True):
        cfg = load_config(
            None,
            [
                *QUICK,
                "data.seq_len=32",
                "train.micro_batch_size=2",
                "train.export=false",
                f"train.compile={str(compiled).lower()}",
                f"run.output_dir={tmp_path}",
                f"run.name=compile-{compiled}",
            ],
        )
        trainer = Trainer(cfg)
        try:
            losses[compiled] = [trainer.train_step()["loss"] for _ in range(3)]
        finally:
            trainer.close()
    assert losses[True] == pytest.approx(losses[False], abs=1e-4, rel=1e-4)


def test_bf16_master_weights_through_deepspeed_extra(tmp_path, one_rank):
    # README "Speed": a plain bf16 loop's precision (master weights, gradients and AdamW state in bf16) is a
    # DeepSpeed setting that deepspeed.extra passes through; it trains like the fp32-master default.
    from llmdistill.train import Trainer

    extra = "deepspeed.extra={bf16: {bf16_master_weights_and_grads: true, bf16_optimizer_states: true}}"
    losses, masters = {}, {}
    for pure in (False, True):
        cfg = load_config(
            None,
            [
                *QUICK,
                *BF16,
                *([extra] if pure else []),
                "data.seq_len=32",
                "train.micro_batch_size=2",
                "train.export=false",
                f"run.output_dir={tmp_path}",
                f"run.name=bf16-master-{pure}",
            ],
        )
        trainer = Trainer(cfg)
        try:
            masters[pure] = {p.dtype for p in trainer.engine.optimizer.single_partition_of_fp32_groups}
            losses[pure] = [trainer.train_step()["loss"] for _ in range(3)]
        finally:
            trainer.close()
    assert masters == {False: {torch.float32}, True: {torch.bfloat16}}
    assert losses[True] == pytest.approx(losses[False], rel=1e-2)
    assert losses[True] != losses[False]
