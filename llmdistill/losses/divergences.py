"""Token-level losses over the vocabulary, computed chunk by chunk over the valid positions.

Only `chunk_size` positions of student logits exist at a time in the forward pass, so a 128k vocabulary never
needs a [B*T, V] fp32 tensor for teacher and student together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmdistill.losses import register
from llmdistill.signal import IGNORE_INDEX, StudentOutput, TeacherSignal


def valid_positions(batch: dict) -> torch.Tensor:
    """Flat indices of the positions that have a target."""
    return (batch["targets"].reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


def _chunks(index: torch.Tensor, chunk_size: int):
    for start in range(0, index.numel(), chunk_size):
        yield index[start : start + chunk_size]


@register("ce")
def cross_entropy(
    student: StudentOutput, signal: TeacherSignal | None, batch: dict, label_smoothing: float = 0.0,
    chunk_size: int = 4096,
):
    """Next-token cross-entropy on the data's targets."""
    index = valid_positions(batch)
    hidden = student.hidden.reshape(-1, student.hidden.shape[-1])
    targets = batch["targets"].reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for c in _chunks(index, chunk_size):
        logits = student.head(hidden[c]).float()
        total = total + F.cross_entropy(logits, targets[c], reduction="sum", label_smoothing=label_smoothing)
    return total / max(index.numel(), 1), {}


@register("fkl", needs={"teacher"})
def forward_kl(
    student: StudentOutput, signal: TeacherSignal, batch: dict, temperature: float = 1.0, chunk_size: int = 4096
):
    """KL(teacher || student) at temperature T, scaled by T^2 (Hinton et al.) so gradients keep their size."""
    if signal.is_sparse:
        raise NotImplementedError("fkl on a top-k teacher signal is not implemented yet")
    index = valid_positions(batch)
    hidden = student.hidden.reshape(-1, student.hidden.shape[-1])
    teacher = signal.logits.reshape(-1, signal.logits.shape[-1])
    total = hidden.new_zeros((), dtype=torch.float32)
    for c in _chunks(index, chunk_size):
        s = student.head(hidden[c]).float()
        t = teacher[c].float()
        vocab = min(s.shape[-1], t.shape[-1])  # padded vocabularies: compare on the shared range
        log_p = F.log_softmax(t[:, :vocab] / temperature, dim=-1)
        log_q = F.log_softmax(s[:, :vocab] / temperature, dim=-1)
        total = total + (log_p.exp() * (log_p - log_q)).sum()
    return total / max(index.numel(), 1) * temperature**2, {}
