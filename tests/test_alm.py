"""ALM and ULD: zero at a match, positive otherwise, gradients that pull the student's chunk likelihoods
toward the teacher's, sparse teachers, and the refusal of mixed tokenizers without a cross-tokenizer loss."""

from __future__ import annotations

import copy

import pytest
import torch

from llmdistill import align
from llmdistill.config import LLMDistillError, LossTerm, load_config
from llmdistill.losses import Objective, get_loss
from llmdistill.losses.alm import binarised_divergence
from llmdistill.signal import StudentOutput, TeacherSignal

torch.set_num_threads(1)
DOCS = [
    "def add(a, b):\n    return a + b\n",
    'class Thing:\n    """A docstring with héllo."""\n\n    value = 42\n',
    "import os\nprint(os.path.join('a', 'b'))\n" * 2,
]


def batch_of(student_tok, teacher_tok, seq_len=16, n=4):
    out = align.pack_aligned(DOCS * 3, student_tok, teacher_tok, seq_len)
    length = max(len(x) for x in out["teacher_input_ids"][:n])
    samples = []
    for i in range(n):
        s = {k: v[i] for k, v in out.items()}
        s |= align.pad_teacher(s, length, teacher_tok.pad_token_id)
        samples.append(s)
    return {k: torch.tensor([s[k] for s in samples]) for k in samples[0]}


def run_student(model, batch):
    out = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    return StudentOutput(out.last_hidden_state, model.lm_head)


@torch.no_grad()
def run_teacher(model, batch):
    logits = model(
        input_ids=batch["teacher_input_ids"], position_ids=batch["teacher_position_ids"], use_cache=False
    ).logits
    return TeacherSignal(logits=logits, input_ids=batch["teacher_input_ids"])


def chunk_lls(student, signal, batch):
    """Per-chunk log-likelihoods (student, teacher) with a plain full log_softmax, as a reference."""
    s_lp = torch.log_softmax(student.logits().float(), -1)
    t_lp = torch.log_softmax(signal.logits.float(), -1)
    s_ll, t_ll = {}, {}
    for b in range(batch["input_ids"].shape[0]):
        for t, c in enumerate(batch["student_chunks"][b].tolist()):
            if c >= 0:
                s_ll[(b, c)] = s_ll.get((b, c), 0.0) + s_lp[b, t, batch["targets"][b, t]]
        ids = batch["teacher_input_ids"][b]
        for t, c in enumerate(batch["teacher_chunks"][b].tolist()):
            if c >= 0:
                t_ll[(b, c)] = t_ll.get((b, c), 0.0) + t_lp[b, t, ids[t + 1]]
    keys = sorted(s_ll)
    assert keys == sorted(t_ll)
    return torch.stack([s_ll[k] for k in keys]), torch.stack([t_ll[k] for k in keys])


def test_identical_tokenizers_single_token_chunks_and_zero_loss(embedded_tokenizer, tiny_llama):
    batch = batch_of(embedded_tokenizer, embedded_tokenizer)
    # Same tokenizer: the teacher window is the student's tokens plus its last target; chunks are 1 token.
    assert torch.equal(batch["teacher_input_ids"][:, :-1], batch["input_ids"])
    assert torch.equal(batch["student_chunks"], batch["teacher_chunks"][:, :-1])
    for row in batch["student_chunks"]:
        used = row[row >= 0]
        assert len(set(used.tolist())) == len(used)
    signal = run_teacher(tiny_llama, batch)
    student = run_student(tiny_llama, batch)
    for divergence in ("binary_kl", "abs"):
        for temperature in (1.0, 100.0):
            loss, metrics = get_loss("alm")(
                student, signal, batch, temperature=temperature, divergence=divergence
            )
            assert abs(loss.item()) < 1e-4, (divergence, temperature, loss.item())
    assert metrics["alm/student_tokens_per_chunk"] == metrics["alm/teacher_tokens_per_chunk"] == 1.0
    loss, _ = get_loss("uld")(student, signal, batch)
    assert loss.item() < 1e-5


def other_student(tiny_llama, seed=1):
    torch.manual_seed(seed)
    model = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model


@pytest.mark.parametrize("divergence", ["binary_kl", "binary_ce", "abs"])
def test_positive_loss_and_gradient_pulls_toward_teacher(embedded_tokenizer, tiny_llama, divergence):
    """Cross-tokenizer (SentencePiece student, BPE teacher): gradient steps shrink the chunk log-lik gap."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmdistill.embedded import student_tokenizer
    from llmdistill.models import load_tokenizer

    sp = load_tokenizer(str(student_tokenizer("sp-unigram")))
    batch = batch_of(sp, embedded_tokenizer, seq_len=24)
    signal = run_teacher(tiny_llama, batch)
    torch.manual_seed(0)
    config = LlamaConfig(**{**tiny_llama.config.to_dict(), "vocab_size": len(sp)})
    model = LlamaForCausalLM(config)
    hidden = run_student(model, batch).hidden.detach().requires_grad_(True)
    # Adam: the raw gradient w.r.t. the hidden states is small at a random init; its direction is what counts.
    optimizer = torch.optim.Adam([hidden], lr=0.05)

    def gap():
        student = StudentOutput(hidden, model.lm_head)
        s_ll, t_ll = chunk_lls(student, signal, batch)
        return (s_ll - t_ll).abs().mean().item()

    start = gap()
    for _ in range(30):
        loss, _ = get_loss("alm")(StudentOutput(hidden, model.lm_head), signal, batch, divergence=divergence)
        assert loss.item() > 0
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert gap() < 0.7 * start, (start, gap())


def test_alm_matches_a_plain_reference(embedded_tokenizer, tiny_llama):
    from llmdistill.embedded import student_tokenizer
    from llmdistill.models import load_tokenizer

    sp = load_tokenizer(str(student_tokenizer("sp-unigram")))
    batch = batch_of(sp, embedded_tokenizer, seq_len=24)
    signal = run_teacher(tiny_llama, batch)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(**{**tiny_llama.config.to_dict(), "vocab_size": len(sp)}))
    student = run_student(model, batch)
    s_ll, t_ll = chunk_lls(student, signal, batch)
    for divergence in ("binary_kl", "binary_ce", "abs"):
        got, metrics = get_loss("alm")(student, signal, batch, temperature=10.0, divergence=divergence)
        want = binarised_divergence(t_ll.float(), s_ll.float(), 10.0, divergence).mean()
        assert torch.allclose(got, want, rtol=1e-4), divergence
    assert metrics["alm/chunks_per_seq"] == len(s_ll) / batch["input_ids"].shape[0]
    # A sparse teacher (top-k plus the actual token, as vLLM returns) gives the same ALM loss.
    logp = torch.log_softmax(signal.logits, -1)
    top = logp.topk(3, dim=-1)
    actual = torch.cat([batch["teacher_input_ids"][:, 1:], batch["teacher_input_ids"][:, :1]], 1)[..., None]
    ids = torch.cat([top.indices, actual], -1).int()
    sparse = TeacherSignal(topk_ids=ids, topk_logprobs=logp.gather(-1, ids.long()))
    got_sparse, _ = get_loss("alm")(student, sparse, batch, temperature=10.0)
    want, _ = get_loss("alm")(student, signal, batch, temperature=10.0)
    assert torch.allclose(got_sparse, want, rtol=1e-5)
    # ULD compares sorted distributions of different vocabulary sizes (1024 vs 2048).
    loss, _ = get_loss("uld")(student, signal, batch)
    assert 0 < loss.item() <= 2.0


def test_binary_ce_gradient_vanishes_at_a_match():
    ll = torch.tensor([-0.5, -3.0, -40.0], requires_grad=True)
    for temperature in (1.0, 100.0):
        (grad,) = torch.autograd.grad(
            binarised_divergence(ll.detach(), ll, temperature, "binary_ce").sum(), ll
        )
        assert grad.abs().max() < 1e-4


def test_objective_accepts_alm_params_and_rejects_bad_ones():
    objective = Objective([LossTerm(name="alm", temperature=50.0, divergence="abs", chunks="space")])
    assert objective.cross_tokenizer
    with pytest.raises(LLMDistillError, match="unknown parameter"):
        Objective([LossTerm(name="alm", temp=2.0)])


def test_mixed_tokenizers_without_alm_or_uld_are_refused(tmp_path):
    from llmdistill.session import preflight

    cfg = load_config(
        "configs/tiny/alm.yaml",
        [f"run.output_dir={tmp_path}", "loss=[{name: fkl}]"],
    )
    with pytest.raises(LLMDistillError, match="'alm' or 'uld'"):
        preflight(cfg)
    cfg = load_config("configs/tiny/alm.yaml", [f"run.output_dir={tmp_path}"])
    assert preflight(cfg).student_tok is not None


# ---------------------------------------------------------------------------------------------- debiasing


def hand_built():
    """One sequence, vocabulary of 3 (token 2 is the only space token on both sides). Student positions 0..3,
    teacher 0..4; chunk 0 = student token at 0 / teacher tokens at 0, 1; chunk 1 = student 1, 2 / teacher 2;
    chunk 2 = student 3 (the window's last position: nothing is predicted after it) / teacher 3."""
    q = torch.tensor([[0.25, 0.5, 0.25], [0.5, 0.25, 0.25], [0.25, 0.25, 0.5], [0.15, 0.15, 0.7]])
    p = torch.tensor(
        [[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.3, 0.3, 0.4], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]
    )
    student = StudentOutput(q.log()[None], torch.nn.Identity())  # the head is the identity: logits = log q
    signal = TeacherSignal(logits=p.log()[None])
    batch = {
        "input_ids": torch.zeros(1, 4, dtype=torch.long),
        "targets": torch.tensor([[1, 0, 2, 1]]),
        "student_chunks": torch.tensor([[0, 1, 1, 2]]),
        "teacher_input_ids": torch.tensor([[0, 1, 0, 2, 1]]),
        "teacher_chunks": torch.tensor([[0, 0, 1, 2, -1]]),
    }
    space = torch.tensor([False, False, True])
    return student, signal, batch, {"student_space_tokens": space, "teacher_space_tokens": space}


def test_debiasing_on_a_hand_built_example():
    import math

    student, signal, batch, masks = hand_built()
    alm = get_loss("alm")
    ln = math.log
    # Chunk log-likelihoods: student ln .5, ln(.5 * .5), ln .15; teacher ln(.25 * .25), ln .4, ln .1.
    plain, _ = alm(student, signal, batch, divergence="abs")
    assert plain.item() == pytest.approx((ln(0.5 / 0.0625) + ln(0.4 / 0.25) + ln(0.15 / 0.1)) / 3, rel=1e-5)
    # append_space: each chunk also pays the probability that a space token comes next (student rows 1, 3;
    # teacher rows 2, 3); chunk 2 ends at the student's last position, so it is left out.
    appended, metrics = alm(student, signal, batch, divergence="abs", append_space=True, **masks)
    want = (abs(ln(0.5 * 0.25) - ln(0.0625 * 0.4)) + abs(ln(0.25 * 0.7) - ln(0.4 * 0.8))) / 2
    assert appended.item() == pytest.approx(want, rel=1e-5)
    assert metrics["alm/chunks_per_seq"] == 2
    # Merging at 0.5: the teacher's space probability after chunk 0 is 0.4, below it, so chunks 0 and 1 are
    # one (closed by chunk 1's 0.8); at 0.3 chunk 0 closes its own group, as without merging.
    merged, metrics = alm(
        student, signal, batch, divergence="abs", append_space=True, merge_by_space_prob=0.5, **masks
    )
    assert merged.item() == pytest.approx(abs(ln(0.5 * 0.25 * 0.7) - ln(0.0625 * 0.4 * 0.8)), rel=1e-5)
    assert metrics["alm/chunks_per_seq"] == 1
    low, _ = alm(
        student, signal, batch, divergence="abs", append_space=True, merge_by_space_prob=0.3, **masks
    )
    assert low.item() == pytest.approx(want, rel=1e-5)
    # Merging alone joins the same chunks and appends nothing; chunk 2 (after an end) stays by itself.
    only_merge, _ = alm(student, signal, batch, divergence="abs", merge_by_space_prob=0.5, **masks)
    assert only_merge.item() == pytest.approx(
        (abs(ln(0.5 * 0.25) - ln(0.0625 * 0.4)) + ln(1.5)) / 2, rel=1e-5
    )
    # A sparse teacher whose top-k holds every token gives the same; one without the space token cannot say
    # what follows chunk 1 (its row 3), so that chunk is left out.
    full = torch.arange(3).expand(1, 5, 3).int()
    sparse = TeacherSignal(topk_ids=full, topk_logprobs=signal.logits)
    got, _ = alm(student, sparse, batch, divergence="abs", append_space=True, **masks)
    assert got.item() == pytest.approx(want, rel=1e-5)
    no_space = full.clone()
    no_space[0, 3] = torch.tensor([0, 1, 0])
    got, _ = alm(student, TeacherSignal(topk_ids=no_space, topk_logprobs=signal.logits), batch,
                 divergence="abs", append_space=True, **masks)  # fmt: skip
    assert got.item() == pytest.approx(abs(ln(0.5 * 0.25) - ln(0.0625 * 0.4)), rel=1e-5)


@pytest.mark.parametrize(
    "name, space",
    [("alm", {}), ("alm", {"append_space": True, "merge_by_space_prob": 0.5}), ("uld", None)],
    ids=["alm", "alm-space", "uld"],
)
def test_a_batch_without_chunks_reports_the_same_metrics(name, space):
    """The trainer sums each metric over the ranks in one collective: a rank whose micro-batch has no
    usable chunk must name the same metrics as the others, or the ranks' collectives would not match."""
    student, signal, batch, masks = hand_built()
    params = {} if space is None else {"divergence": "abs", **space, **(masks if space else {})}
    loss, some = get_loss(name)(student, signal, batch, **params)
    batch["student_chunks"] = torch.full_like(batch["student_chunks"], -1)
    zero, none = get_loss(name)(student, signal, batch, **params)
    assert loss.item() > 0 and zero.item() == 0.0
    assert sorted(none) == sorted(some) and all(value == 0 for key, value in none.items() if "per_seq" in key)


def test_a_gap_between_chunks_closes_a_merge_group():
    from llmdistill.losses.alm import space_merge_groups

    ends = torch.tensor([False, True, False, False, True, False])
    breaks = torch.tensor([True, False, False, True, False, False])
    assert space_merge_groups(ends, breaks).tolist() == [0, 0, 1, 2, 2, 3]
    # In a batch: the teacher token between chunks 0 and 1 (row 1) belongs to no chunk, so they never merge.
    student, signal, batch, masks = hand_built()
    batch["teacher_chunks"] = torch.tensor([[0, -1, 1, 2, -1]])
    _, joined = get_loss("alm")(*hand_built()[:3], merge_by_space_prob=0.5, **masks)
    _, apart = get_loss("alm")(student, signal, batch, merge_by_space_prob=0.5, **masks)
    assert (joined["alm/chunks_per_seq"], apart["alm/chunks_per_seq"]) == (2, 3)


def test_debiasing_is_zero_at_a_match_and_needs_the_masks(embedded_tokenizer, tiny_llama):
    batch = batch_of(embedded_tokenizer, embedded_tokenizer)
    signal = run_teacher(tiny_llama, batch)
    student = run_student(tiny_llama, batch)
    space = align.space_token_mask(embedded_tokenizer)
    for divergence in ("binary_kl", "abs"):
        loss, metrics = get_loss("alm")(
            student, signal, batch, divergence=divergence, append_space=True, merge_by_space_prob=0.5,
            student_space_tokens=space, teacher_space_tokens=space,
        )  # fmt: skip
        assert abs(loss.item()) < 1e-4 and metrics["alm/student_tokens_per_chunk"] > 1.0
    with pytest.raises(LLMDistillError, match="space tokens"):
        get_loss("alm")(student, signal, batch, append_space=True)
    with pytest.raises(
        LLMDistillError, match=r"loss\.0\.merge_by_space_prob \(alm\): Input should be less than 1"
    ):
        Objective([LossTerm(name="alm", merge_by_space_prob=2.0)])


def test_a_run_gives_alm_its_space_tokens(tmp_path):
    from llmdistill.session import loss_defaults, preflight

    cfg = load_config(
        "configs/tiny/alm.yaml",
        [f"run.output_dir={tmp_path}", "loss=[{name: alm, append_space: true, merge_by_space_prob: 0.1}]"],
    )
    plan = preflight(cfg)
    defaults = loss_defaults(cfg, plan)
    assert defaults["student_space_tokens"].shape == (len(plan.student_tok),)
    assert defaults["teacher_space_tokens"].shape == (len(plan.teacher_tok),)
    eos = plan.teacher_tok.eos_token_id
    space = plan.teacher_tok.convert_tokens_to_ids("Ġ")
    letter = plan.teacher_tok.convert_tokens_to_ids("a")
    assert defaults["teacher_space_tokens"][[eos, space, letter]].tolist() == [True, True, False]
    objective = Objective(cfg.loss, plan.student_config, plan.teacher_config, defaults=defaults)
    ((_, _, _, params),) = objective.terms
    assert params["append_space"] and params["student_space_tokens"] is defaults["student_space_tokens"]
