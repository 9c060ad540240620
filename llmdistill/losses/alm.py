"""Cross-tokenizer losses: Approximate Likelihood Matching (ALM, Minixhofer et al. 2025) and ULD (Boizard
et al. 2024) as the baseline.

Both read the chunk alignment the data pipeline put in the batch (llmdistill.align.pack_aligned):
`student_chunks` [B, T] and `teacher_chunks` [B, T_t] give, per position, the chunk of the token predicted
there (-1: none), with chunk ids shared by the two sides of a sequence. Teacher positions are the teacher's
own tokens (`teacher_input_ids`), so the signal is the teacher run on its own tokenization.

ALM: a chunk's log-likelihood under a model is the sum of the log-probabilities of its tokens (the actual
tokens, so a sparse teacher is enough when it gives the actual token's log-prob: vLLM's prompt log-probs do,
kept as `target_logprobs`; a top-k alone leaves a chunk with a token outside it unusable).
Each chunk log-likelihood l is binarised at temperature tau: a Bernoulli with p = exp(l / tau), and the
teacher's and student's Bernoullis are compared:
  binary_kl  KL(Bern(p_t) || Bern(p_s))  (zero at a match; the default)
  binary_ce  cross-entropy of Bern(p_s) against Bern(p_t)  (same gradient, plus the teacher's entropy)
  abs        |l_t - l_s|  (the absolute log-likelihood difference, no binarisation; tau is not used)

Scale, against tokenkit (the reference implementation): the binarised values are multiplied by tau, as
distillation losses multiply by T^2, so the gradient does not vanish as tau grows: for large tau the gradient
on a chunk's student log-likelihood tends to l_t / l_s - 1. tokenkit does not multiply, so at the default
tau = 100 this loss's gradient is 100x tokenkit's for the same weight: `alm` 1.0 beside `ce` 0.1 here is
tokenkit's 100 : 0.1. (tokenkit's recipes balance the terms' gradient magnitudes, GradMag, where the scale
cancels; `balance` does the same here.) `abs` is tokenkit's, unscaled: a gradient of +-1 per chunk, the same
order as the binarised ones'. The loss is the mean over the batch's usable chunks.

Debiasing (tokenkit's default `alm_mode: merge_by_space_prob+append_space`; off by default here). A chunk's
likelihood carries its tokenization's bias: a token boundary at the chunk's end says something about the text
after it, differently for each tokenizer. `append_space` compares instead the likelihood of "the chunk, then a
token that starts with whitespace or ends the document": each side's chunk log-likelihood gets log sum_v p(v |
text through the chunk) over its vocabulary's space tokens (`align.space_token_mask`). `merge_by_space_prob`
(a probability threshold; tokenkit's default is 0.1) first joins consecutive chunks until one whose teacher
space probability is above the threshold, so a chunk that ends inside a word does not get an unlikely space
appended: a group closes after such a chunk, and also before a chunk that does not follow on in the text (a
document or window start, a chunk left out). A group ending at the student's last position has no student
prediction after it and is left out when `append_space` is on. A sparse teacher gives the space probability of
its top-k only (a lower bound); where its top-k holds no space token the probability is unknown: the group is
left out (`append_space`) or not closed there (merging). The space-token masks come from the run
(`session.loss_defaults`), not from configs.

ULD: at the start of every aligned chunk both models predict the next text after the same prefix; compare the
two next-token distributions sorted by probability (L1 distance, the smaller vocabulary padded with zeros).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch.utils.checkpoint import checkpoint

from llmdistill.align import CHUNK_KINDS
from llmdistill.config import ConfigError
from llmdistill.losses.divergences import Temperature, log1mexp
from llmdistill.losses.registry import register
from llmdistill.signal import StudentOutput, TeacherSignal

# The parameters' rules, in the signatures (registry.check_params refuses a bad value before weights load).
Divergence = Literal["binary_kl", "binary_ce", "abs"]
Chunks = Literal[CHUNK_KINDS]
# Keeps exp(l / tau) below 1, where log(1 - p) is finite (a chunk the model is certain of).
EPSILON = 1e-6
ROWS = 4096  # student positions whose logits are formed at once


def binarised_divergence(teacher_ll: torch.Tensor, student_ll: torch.Tensor, temperature: float, kind: str):
    """Per-chunk divergence between chunk log-likelihoods (any shape, fp32)."""
    if kind == "abs":
        return (teacher_ll - student_ll).abs()
    a = teacher_ll / temperature - EPSILON
    x = student_ll / temperature - EPSILON
    p = torch.exp(a)
    cross = -(p * x + (1 - p) * log1mexp(x))
    if kind == "binary_ce":
        return temperature * cross
    entropy = -(p * a + (1 - p) * log1mexp(a))
    return temperature * (cross - entropy)


def _chunk_keys(chunks: str) -> tuple[str, str]:
    suffix = "chunks" if chunks == "unconstrained" else "space_chunks"
    return f"student_{suffix}", f"teacher_{suffix}"


def _check_batch(batch: dict, keys: tuple[str, str], name: str, signal: TeacherSignal) -> None:
    missing = [k for k in (*keys, "teacher_input_ids") if k not in batch]
    if missing:
        raise ConfigError(
            f"{name}: the batch has no {missing}; cross-tokenizer batches come from session.build_datasets "
            "when a cross-tokenizer loss is configured"
        )
    # Rows are read at teacher positions: a signal of the student's tokens would be read misaligned.
    scored = signal.logits if signal.logits is not None else signal.topk_logprobs
    if scored is not None and tuple(scored.shape[:2]) != tuple(batch["teacher_input_ids"].shape):
        raise ConfigError(
            f"{name}: the teacher signal covers {tuple(scored.shape[:2])} positions, not the teacher's own "
            f"tokens {tuple(batch['teacher_input_ids'].shape)}: its source did not score teacher_input_ids"
        )


def _student_target_logprobs(
    student: StudentOutput, rows: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """log q(target) at flat positions `rows`, computing the head on ROWS positions at a time."""
    hidden = student.hidden.reshape(-1, student.hidden.shape[-1])

    def block(h, t):
        return torch.log_softmax(student.logits_of(h).float(), -1).gather(1, t[:, None]).squeeze(1)

    out = []
    for i in range(0, rows.numel(), ROWS):
        r = rows[i : i + ROWS]
        h, t = hidden[r], targets[r]
        # Recomputed in the backward: only the [rows, H] hidden block is kept, never [rows, V] logits.
        out.append(checkpoint(block, h, t, use_reentrant=False) if h.requires_grad else block(h, t))
    return torch.cat(out) if out else hidden.new_zeros(0)


def _teacher_target_logprobs(signal: TeacherSignal, rows: torch.Tensor, targets: torch.Tensor):
    """log p(target) at flat teacher positions, and whether the teacher gave it (sparse: the actual token's
    log-prob where the source kept it, else whether the target is in the top-k)."""
    if signal.logits is None and signal.target_logprobs is not None:
        lp = signal.target_logprobs.reshape(-1)[rows].float()
        found = ~lp.isnan()
        return torch.where(found, lp, torch.zeros_like(lp)), found
    if signal.logits is not None:
        logits = signal.logits.reshape(-1, signal.logits.shape[-1])
        out = [
            torch.log_softmax(logits[rows[i : i + ROWS]].float(), -1)
            .gather(1, targets[rows[i : i + ROWS], None])
            .squeeze(1)
            for i in range(0, rows.numel(), ROWS)
        ]
        lp = torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)
        return lp, torch.ones_like(lp, dtype=torch.bool)
    ids = signal.topk_ids.reshape(-1, signal.topk_ids.shape[-1])[rows].long()
    logprobs = signal.topk_logprobs.reshape(-1, signal.topk_logprobs.shape[-1])[rows].float()
    match = ids == targets[rows, None]
    found = match.any(-1)
    return torch.where(match, logprobs, torch.zeros_like(logprobs)).sum(-1), found


def _shifted(ids: torch.Tensor) -> torch.Tensor:
    """targets[t] = ids[t + 1]; the last position gets 0 (never in a chunk)."""
    return torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], 1)


@register("alm", needs={"teacher"}, cross_tokenizer=True)
def alm(
    student: StudentOutput,
    signal: TeacherSignal,
    batch: dict,
    temperature: Temperature = 100.0,
    divergence: Divergence = "binary_kl",
    chunks: Chunks = "unconstrained",
    append_space: bool = False,
    merge_by_space_prob: Annotated[float, Field(gt=0, lt=1)] | None = None,
    student_space_tokens=None,
    teacher_space_tokens=None,
):
    """Approximate Likelihood Matching; see the module docstring."""
    keys = _chunk_keys(chunks)
    _check_batch(batch, keys, "alm", signal)
    s_chunk, t_chunk = batch[keys[0]], batch[keys[1]]
    n_seq = s_chunk.shape[0]
    width = int(max(s_chunk.max().item(), t_chunk.max().item(), -1)) + 1
    s_rows = (s_chunk.reshape(-1) >= 0).nonzero().squeeze(1)
    t_rows = (t_chunk.reshape(-1) >= 0).nonzero().squeeze(1)
    seq_s = torch.div(s_rows, s_chunk.shape[1], rounding_mode="floor")
    seq_t = torch.div(t_rows, t_chunk.shape[1], rounding_mode="floor")
    slot_s = seq_s * width + s_chunk.reshape(-1)[s_rows]
    slot_t = seq_t * width + t_chunk.reshape(-1)[t_rows]

    s_lp = _student_target_logprobs(student, s_rows, batch["targets"].reshape(-1))
    t_targets = _shifted(batch["teacher_input_ids"]).reshape(-1)
    t_lp, found = _teacher_target_logprobs(signal, t_rows, t_targets)
    slots = n_seq * width
    s_ll = torch.zeros(slots, device=s_lp.device).index_add(0, slot_s, s_lp)
    t_ll = torch.zeros(slots, device=s_lp.device).index_add(0, slot_t, t_lp.to(s_lp.device))
    s_count = torch.zeros(slots, device=s_lp.device).index_add(0, slot_s, torch.ones_like(s_lp))
    t_count = torch.zeros(slots, device=s_lp.device).index_add(0, slot_t, torch.ones_like(t_lp))
    missing = torch.zeros(slots, device=s_lp.device).index_add(0, slot_t, (~found).float())
    usable = (s_count > 0) & (t_count > 0) & (missing == 0)
    s_ll, t_ll, s_count, t_count = s_ll[usable], t_ll[usable], s_count[usable], t_count[usable]
    metrics = {}
    if append_space or merge_by_space_prob is not None:
        spans = (_slot_spans(slot_s, s_rows, slots), _slot_spans(slot_t, t_rows, slots))
        masks = _space_masks(student_space_tokens, teacher_space_tokens, merge_by_space_prob)
        s_ll, t_ll, s_count, t_count, metrics = _debiased(
            student, signal, usable, spans, (s_chunk.shape[1], t_chunk.shape[1]), width, masks,
            (s_ll, t_ll, s_count, t_count), append_space, merge_by_space_prob,
        )  # fmt: skip
    n = s_ll.numel()
    if n == 0:
        zero = student.hidden.sum() * 0.0  # keeps every rank's backward in step under ZeRO
        # The same names as below: the trainer sums each metric over the ranks in one collective.
        return zero, metrics | dict.fromkeys(CHUNK_METRICS, 0.0)
    s_ll, t_ll = s_ll.clamp(max=0.0), t_ll.clamp(max=0.0)
    loss = binarised_divergence(t_ll.detach(), s_ll, temperature, divergence).mean()
    values = (n / n_seq, -s_ll.detach().mean(), -t_ll.mean(), s_count.mean(), t_count.mean())
    return loss, metrics | dict(zip(CHUNK_METRICS, values, strict=True))  # tensors: read once per step


CHUNK_METRICS = (
    "alm/chunks_per_seq",
    "alm/student_chunk_nll",
    "alm/teacher_chunk_nll",
    "alm/student_tokens_per_chunk",
    "alm/teacher_tokens_per_chunk",
)


# ---------------------------------------------------------------------------------------------- debiasing


def _space_masks(student_mask, teacher_mask, threshold):
    if student_mask is None or teacher_mask is None:
        raise ConfigError(
            "alm: append_space / merge_by_space_prob need each tokenizer's space tokens, which a training "
            "run passes (session.loss_defaults); called directly, give student_space_tokens and "
            "teacher_space_tokens (align.space_token_mask)"
        )
    return torch.as_tensor(student_mask, dtype=torch.bool), torch.as_tensor(teacher_mask, dtype=torch.bool)


def _slot_spans(slot: torch.Tensor, rows: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (sequence, chunk) slot, the first and last flat position predicting one of its tokens."""
    first = torch.full((slots,), -1, dtype=torch.long, device=rows.device)
    first = first.scatter_reduce(0, slot, rows, reduce="amin", include_self=False)
    last = torch.full((slots,), -1, dtype=torch.long, device=rows.device)
    return first, last.scatter_reduce(0, slot, rows, reduce="amax", include_self=False)


def _fit(mask: torch.Tensor, size: int) -> torch.Tensor:
    """A vocabulary mask cut or padded (False) to a head's width (models may pad their vocabulary)."""
    return torch.nn.functional.pad(mask[:size], (0, max(0, size - mask.numel())))


def _student_space_logprobs(student: StudentOutput, rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log sum_v q(v) over the space tokens, at flat student positions `rows` (ROWS at a time)."""
    hidden = student.hidden.reshape(-1, student.hidden.shape[-1])

    def block(h):
        logits = student.logits_of(h).float()
        keep = _fit(mask.to(logits.device), logits.shape[-1])
        return torch.logsumexp(logits.masked_fill(~keep, float("-inf")), -1) - torch.logsumexp(logits, -1)

    out = []
    for i in range(0, rows.numel(), ROWS):
        h = hidden[rows[i : i + ROWS]]
        out.append(checkpoint(block, h, use_reentrant=False) if h.requires_grad else block(h))
    return torch.cat(out) if out else hidden.new_zeros(0)


def _teacher_space_logprobs(signal: TeacherSignal, rows: torch.Tensor, mask: torch.Tensor):
    """log sum_v p(v) over the space tokens at flat teacher positions, and whether it is known (a sparse
    teacher: the top-k's space tokens only, unknown when it has none)."""
    if signal.logits is not None:
        logits = signal.logits.reshape(-1, signal.logits.shape[-1])[rows].float()
        keep = _fit(mask.to(logits.device), logits.shape[-1])
        lp = torch.logsumexp(logits.masked_fill(~keep, float("-inf")), -1) - torch.logsumexp(logits, -1)
        return lp, torch.isfinite(lp)
    ids = signal.topk_ids.reshape(-1, signal.topk_ids.shape[-1])[rows].long()
    logprobs = signal.topk_logprobs.reshape(-1, signal.topk_logprobs.shape[-1])[rows].float()
    mask = mask.to(ids.device)
    space = mask[ids.clamp(0, mask.numel() - 1)] & (ids < mask.numel())
    lp = torch.logsumexp(logprobs.masked_fill(~space, float("-inf")), -1)
    return lp, torch.isfinite(lp)


def space_merge_groups(ends: torch.Tensor, breaks: torch.Tensor) -> torch.Tensor:
    """Group index of each chunk, chunks in text order: a group closes after a chunk in `ends` and before a
    chunk in `breaks` (one that does not follow on from the chunk before it)."""
    starts = breaks.clone()
    starts[1:] |= ends[:-1]
    starts[:1] = True
    return torch.cumsum(starts.long(), 0) - 1


def _debiased(student, signal, usable, spans, lengths, width, masks, values, append_space, threshold):
    """The usable chunks' (student ll, teacher ll, student tokens, teacher tokens), merged by the teacher's
    space probability and with the space log-probability appended as asked; see the module docstring."""
    (s_first, s_last), (t_first, t_last) = spans
    idx = usable.nonzero().squeeze(1)  # in text order: sequence-major, chunk ids in text order
    s_first, s_last, t_first, t_last = s_first[idx], s_last[idx], t_first[idx], t_last[idx]
    # The prediction after a chunk is made at the position that reads the chunk's last token.
    s_after_ok = s_last % lengths[0] + 1 < lengths[0]
    t_after_ok = t_last % lengths[1] + 1 < lengths[1]
    t_space, t_known = _teacher_space_logprobs(signal, torch.where(t_after_ok, t_last + 1, t_last), masks[1])
    t_known &= t_after_ok
    seq = torch.div(idx, width, rounding_mode="floor")
    breaks = torch.ones_like(idx, dtype=torch.bool)
    breaks[1:] = (seq[1:] != seq[:-1]) | (s_first[1:] != s_last[:-1] + 1) | (t_first[1:] != t_last[:-1] + 1)
    if threshold is not None:
        group = space_merge_groups(t_known & (t_space.exp() > threshold), breaks)
    else:
        group = torch.arange(idx.numel(), device=idx.device)
    n = int(group[-1]) + 1 if idx.numel() else 0
    merged = [torch.zeros(n, device=v.device, dtype=v.dtype).index_add(0, group, v) for v in values]
    last = torch.zeros(n, dtype=torch.long, device=idx.device)
    last = last.scatter_reduce(0, group, torch.arange(idx.numel(), device=idx.device), reduce="amax")
    keep = torch.ones(n, dtype=torch.bool, device=idx.device)
    metrics = {}
    if append_space:
        rows = torch.where(s_after_ok, s_last + 1, s_last)[last]
        merged[0] = merged[0] + _student_space_logprobs(student, rows, masks[0])
        t_add = torch.where(t_known, t_space, torch.zeros_like(t_space))[last]
        merged[1] = merged[1] + t_add.to(merged[1].device)
        keep = s_after_ok[last] & t_known[last]
        # Reported on every rank, kept chunks or not (the trainer sums each metric over the ranks).
        kept_prob = torch.where(keep, t_space[last].exp(), 0.0).sum()
        metrics["alm/teacher_space_prob"] = kept_prob / keep.sum().clamp(min=1)
    return (*(v[keep] for v in merged), metrics)


def _chunk_first_rows(chunk: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (sequence, chunk) slot, the first flat position predicting one of its tokens; and slot presence."""
    flat = chunk.reshape(-1)
    rows = (flat >= 0).nonzero().squeeze(1)
    slot = torch.div(rows, chunk.shape[1], rounding_mode="floor") * width + flat[rows]
    first = torch.full((chunk.shape[0] * width,), flat.numel(), dtype=torch.long, device=chunk.device)
    first = first.scatter_reduce(0, slot, rows, reduce="amin")
    return first, first < flat.numel()


@register("uld", needs={"teacher"}, cross_tokenizer=True)
def uld(
    student: StudentOutput,
    signal: TeacherSignal,
    batch: dict,
    temperature: Temperature = 1.0,
    chunks: Chunks = "unconstrained",
):
    """Universal logit distillation on aligned chunk starts; see the module docstring."""
    keys = _chunk_keys(chunks)
    _check_batch(batch, keys, "uld", signal)
    s_chunk, t_chunk = batch[keys[0]], batch[keys[1]]
    width = int(max(s_chunk.max().item(), t_chunk.max().item(), -1)) + 1
    s_first, s_has = _chunk_first_rows(s_chunk, width)
    t_first, t_has = _chunk_first_rows(t_chunk, width)
    both = s_has & t_has
    if not bool(both.any()):
        return student.hidden.sum() * 0.0, {"uld/positions_per_seq": 0.0}
    s_rows, t_rows = s_first[both], t_first[both]
    hidden = student.hidden.reshape(-1, student.hidden.shape[-1])
    if signal.logits is not None:
        t_logits = signal.logits.reshape(-1, signal.logits.shape[-1])[t_rows].float()
        t_sorted = torch.softmax(t_logits / temperature, -1).sort(-1, descending=True).values
    else:
        # A sparse teacher: its top-k probabilities renormalised, zero elsewhere (the tail is unknown).
        lp = signal.topk_logprobs.reshape(-1, signal.topk_logprobs.shape[-1])[t_rows].float()
        t_sorted = torch.softmax(lp / temperature, -1).sort(-1, descending=True).values

    def block(h, t_sorted):
        q = torch.softmax(student.logits_of(h).float() / temperature, -1).sort(-1, descending=True).values
        size = max(q.shape[-1], t_sorted.shape[-1])
        q = torch.nn.functional.pad(q, (0, size - q.shape[-1]))
        p = torch.nn.functional.pad(t_sorted, (0, size - t_sorted.shape[-1]))
        return (q - p).abs().sum(-1)

    out = []
    for i in range(0, s_rows.numel(), ROWS):
        h, p = hidden[s_rows[i : i + ROWS]], t_sorted[i : i + ROWS].to(hidden.device)
        out.append(checkpoint(block, h, p, use_reentrant=False) if h.requires_grad else block(h, p))
    distance = torch.cat(out)
    return distance.mean(), {"uld/positions_per_seq": distance.numel() / s_chunk.shape[0]}
