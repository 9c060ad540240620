"""The Triton kernels of llmdistill/losses/kernels.py against the torch path of divergences.py they replace.

Without a GPU they run in Triton's interpreter on CPU tensors: the same kernel code, executed op by op. The
interpreter must be on before anything imports Triton (in a whole test session something always has), so
`test_the_kernels_in_tritons_interpreter` runs this file again in a child process started with
TRITON_INTERPRET=1, where the `interpreter` cases exist. On a CUDA machine the `cuda` cases compile and run
the kernels, in bf16 too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmdistill.losses import divergences, get_loss, kernels
from llmdistill.signal import StudentOutput, TeacherSignal

INTERPRETED = kernels.interpreted()
NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
DEVICES = ["interpreter"] if INTERPRETED else [pytest.param("cuda", marks=NO_GPU)]
CASES = [("fkl", 0.0), ("rkl", 1.0), ("jsd", 0.3)]
REFERENCE = {"fkl": divergences.fkl_grad, "rkl": divergences.rkl_grad, "jsd": divergences.jsd_grad(0.3)}


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreted run")
def test_the_kernels_in_tritons_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        cwd=Path(__file__).parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    passed = re.search(r"(\d+) passed", done.stdout)
    assert passed and int(passed.group(1)) >= 28, done.stdout[-2000:]


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    """Where the kernels run: CPU tensors in the interpreter, or CUDA."""
    monkeypatch.setenv("LLMDISTILL_LOSS_KERNELS", "triton")
    return "cpu" if request.param == "interpreter" else "cuda"


def torch_path(monkeypatch, fn, *args):
    """fn(*args) with the kernels turned off: the reference."""
    with monkeypatch.context() as m:
        m.setenv("LLMDISTILL_LOSS_KERNELS", "torch")
        return fn(*args)


def assert_like_the_torch_path(monkeypatch, value_and_grad, logits, index, grad_scale):
    """value_and_grad's value and gradient with the kernels against the same without; returns the gradient."""
    value, grad = value_and_grad(logits, index, grad_scale)
    ref_value, ref_grad = torch_path(monkeypatch, value_and_grad, logits, index, grad_scale)
    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-5)
    if grad_scale is None:
        assert grad is None
    else:
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    return grad


def counting(monkeypatch, *names):
    """The names of the calls of kernels.<name> for each name, so a test knows the kernel path ran."""
    calls = []
    for name in names:
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, f=original, n=name, **k: calls.append(n) or f(*a, **k))
    return calls


@pytest.mark.parametrize("kind,beta", CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("padding", [0, 37], ids=["same-vocab", "padded-student"])
def test_divergence_kernel_matches_the_torch_path(device, monkeypatch, kind, beta, temperature, padding):
    g = torch.Generator().manual_seed(0)
    rows, vocab = 6, 5003  # more than one block of the kernel, not a multiple of it
    logits = (torch.randn(rows, vocab + padding, generator=g) * 3).to(device)
    teacher = (torch.randn(1, rows, vocab, generator=g) * 3).to(device)
    teacher[0, 0, :100] = -1e5  # probabilities under the floor
    signal = TeacherSignal(logits=teacher)
    index = torch.arange(rows, device=device)
    value_and_grad = divergences.dense_divergence(signal, temperature, REFERENCE[kind], (kind, beta))
    calls = counting(monkeypatch, "divergence")
    assert_like_the_torch_path(monkeypatch, value_and_grad, logits, index, None)
    grad = assert_like_the_torch_path(monkeypatch, value_and_grad, logits, index, 0.7)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    assert (grad[:, vocab:] == 0).all()
    assert len(calls) == 2


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "tvd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_k_bucket_kernels_match_the_torch_path(device, monkeypatch, name, temperature):
    """A top-k teacher with the rest-of-vocabulary bucket: the student's two log-sum-exps and the gradient's
    [rows, V] part come from kernels, the rest is the torch path's own code on [rows, K + 1]."""
    g = torch.Generator().manual_seed(4)
    rows, width, k = 5, 4500, 7
    logits = (torch.randn(rows, width, generator=g) * 3).to(device)
    teacher = torch.randn(1, rows, width, generator=g).mul_(3).log_softmax(-1).topk(k)
    ids = teacher.indices.to(device)
    logits[0].scatter_(0, ids[0, 0], 60.0)  # a row whose top-k holds all but ~1e-20 of the student's mass
    signal = TeacherSignal(topk_ids=ids, topk_logprobs=teacher.values.to(device))
    student = StudentOutput(hidden=torch.zeros(1, rows, 2, device=device), head=torch.nn.Linear(2, width))
    value_and_grad = get_loss(name).head_term(student, signal, {}, temperature=temperature).value_and_grad
    index = torch.arange(rows, device=device)
    calls = counting(monkeypatch, "log_sum_exps", "scaled_softmax")
    for grad_scale in (0.3, None):
        assert_like_the_torch_path(monkeypatch, value_and_grad, logits, index, grad_scale)
    assert calls == ["log_sum_exps", "scaled_softmax", "log_sum_exps"]


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_kernel_matches_the_torch_path(device, monkeypatch, smoothing):
    g = torch.Generator().manual_seed(1)
    rows, width = 5, 4099
    logits = (torch.randn(rows, width, generator=g) * 4).to(device)
    targets = torch.randint(0, width, (rows,), generator=g).to(device)
    value_and_grad = divergences._nll_value_and_grad({"targets": targets}, smoothing)
    index = torch.arange(rows, device=device)
    calls = counting(monkeypatch, "cross_entropy")
    for grad_scale in (0.25, None):
        assert_like_the_torch_path(monkeypatch, value_and_grad, logits, index, grad_scale)
    assert len(calls) == 2


def test_a_target_outside_the_vocabulary_gives_a_nan_loss_not_a_wild_read(device):
    logits = torch.randn(2, 300, device=device)
    value, _ = kernels.cross_entropy(logits, torch.tensor([5, 300], device=device), 0.0, 1.0)
    assert value.isnan()


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["plain", "softcapped"])
@pytest.mark.parametrize("recompute", [False, True], ids=["eager", "recompute"])
def test_an_objective_through_the_kernels_trains_as_through_torch(device, monkeypatch, recompute, softcap):
    """fkl + ce in one fused head pass, the teacher as hidden states + head: the loss and the gradients of
    the student's hidden states and head weight are those of the torch path, also for a student whose
    logits are soft-capped after its head (the kernels see the capped logits, the cap's chain rule is
    outside them)."""
    g = torch.Generator().manual_seed(2)
    batch_size, seq, hidden_size, vocab = 2, 7, 16, 4111
    hidden = torch.randn(batch_size, seq, hidden_size, generator=g).to(device)
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.5).to(device)
    teacher_hidden = torch.randn(batch_size, seq, hidden_size, generator=g).to(device)
    teacher_weight = (torch.randn(vocab, hidden_size, generator=g) * 0.5).to(device)
    targets = torch.randint(0, vocab, (batch_size, seq), generator=g).to(device)
    targets[0, :2] = -100
    batch = {"targets": targets}
    signal = TeacherSignal(final_hidden=teacher_hidden, head_weight=teacher_weight)

    def run():
        head = torch.nn.Linear(hidden_size, vocab, bias=False).to(device)
        head.weight.data.copy_(weight)
        h = hidden.clone().requires_grad_(True)
        # A head that is not an nn.Linear takes the recompute path (as a ZeRO-3 or PEFT head does).
        student = StudentOutput(
            hidden=h, head=torch.nn.Sequential(head) if recompute else head, logit_softcap=softcap
        )
        terms = [get_loss("fkl").head_term(student, signal, batch, temperature=2.0, chunk_size=5)]
        terms.append(get_loss("ce").head_term(student, signal, batch, chunk_size=5))
        total, values = divergences.fused_head_terms(student, batch, terms, [1.0, 0.5])
        total.backward()
        return total.detach(), values, h.grad, head.weight.grad

    calls = counting(monkeypatch, "divergence", "cross_entropy")
    ours = run()
    assert set(calls) == {"divergence", "cross_entropy"}
    reference = torch_path(monkeypatch, run)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_environment_and_float64_turn_the_kernels_off(device, monkeypatch):
    logits = torch.zeros(2, 8, device=device)
    assert kernels.enabled(logits)
    assert not kernels.enabled(logits.double())  # the kernels compute in fp32
    monkeypatch.setenv("LLMDISTILL_LOSS_KERNELS", "torch")
    assert not kernels.enabled(logits)


def test_cpu_tensors_take_the_torch_path_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not kernels.enabled(torch.zeros(2, 8))


@NO_GPU
@pytest.mark.parametrize("kind,beta", CASES)
def test_bf16_kernels_match_the_torch_path_at_a_real_vocabulary(monkeypatch, kind, beta):
    monkeypatch.delenv("LLMDISTILL_LOSS_KERNELS", raising=False)
    g = torch.Generator(device="cuda").manual_seed(3)
    rows, vocab = 64, 128256
    logits = (torch.randn(rows, vocab, generator=g, device="cuda") * 3).bfloat16()
    teacher = (torch.randn(1, rows, vocab, generator=g, device="cuda") * 3).bfloat16()
    value_and_grad = divergences.dense_divergence(
        TeacherSignal(logits=teacher), 1.0, REFERENCE[kind], (kind, beta)
    )
    index = torch.arange(rows, device="cuda")
    value, grad = value_and_grad(logits, index, 1.0 / rows)
    ref_value, ref_grad = torch_path(monkeypatch, value_and_grad, logits, index, 1.0 / rows)
    torch.testing.assert_close(value, ref_value, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=1e-2, atol=1e-6)


def test_chunks_are_sized_for_the_kernels_buffers_only_when_every_term_runs_one(device, monkeypatch):
    """A kernel chunk holds its [rows, V] buffers in the logits' dtype, the torch path in fp32: with bf16
    logits the automatic size doubles, unless a term (here tvd, which has no kernel) takes the torch path."""
    vocab, positions = 512, 1024
    monkeypatch.setattr(divergences, "CHUNK_BYTES", 4 * vocab * 32)  # 32 fp32 rows, 64 bf16 rows
    hidden = torch.randn(1, positions, 8, device=device, dtype=torch.bfloat16)
    head = torch.nn.Linear(8, vocab, bias=False, device=device, dtype=torch.bfloat16)
    student = StudentOutput(hidden=hidden.requires_grad_(True), head=head)
    batch = {"targets": torch.randint(0, vocab, (1, positions), device=device)}
    teacher = torch.randn(1, positions, vocab, device=device, dtype=torch.bfloat16)
    dense = TeacherSignal(logits=teacher)
    top = teacher.float().log_softmax(-1).topk(4)
    sparse = TeacherSignal(topk_ids=top.indices, topk_logprobs=top.values)
    rows = []
    original = divergences._chunk_terms

    def spy(terms, scales):
        chunk = original(terms, scales)
        return lambda logits, index, grad: rows.append(logits.shape[0]) or chunk(logits, index, grad)

    monkeypatch.setattr(divergences, "_chunk_terms", spy)
    for loss, signal, expected in (("fkl", dense, 64), ("fkl", sparse, 64), ("tvd", dense, 32)):
        rows.clear()
        terms = [get_loss(name).head_term(student, signal, batch) for name in (loss, "ce")]
        divergences.fused_head_terms(student, batch, terms, [1.0, 1.0])
        assert max(rows) == expected
