"""How a batch becomes vLLM prompts, and vLLM's prompt log-probabilities a TeacherSignal (server and cache).

Packed rows hold several documents (position_ids restart at each one, and the in-process teacher attends only
within a document), so every document segment of a row is its own prompt.

Which tokens: the batch's own, or, when the batch carries the teacher's tokenization of the same text
(`teacher_input_ids`, a cross-tokenizer objective such as alm or uld), the teacher's: the signal is then
shaped like teacher positions [B, T_t, K], as the in-process teacher's is.

Off-by-one: the signal at position t is the teacher's distribution of the token AFTER input_ids[..t], which
is vLLM's prompt_logprobs[t - start + 1] for the segment starting at `start` (prompt_logprobs[0] is None). The
last position of a segment would need the next token, so when its target is valid (the row's final position,
whose next token is `targets[:, -1]`) that target is appended to the prompt. Positions whose target is -100
(document ends, and with chat data everything outside the answers) get a filler row (id 0, log-prob
LOGP_FILLER: all mass in the tail) that losses never read: every loss reads only positions whose target is
valid.

Only what is trained is scored and converted: a prompt ends at its segment's last valid target (template
tokens after an answer are never sent), and only valid positions of vLLM's answer are turned into the signal.
vLLM's `prompt_logprobs` has no per-position selection (an int K for every prompt token), so the prompt's
tokens before the first answer are still scored by the server and sent back; they are dropped on arrival.

vLLM returns the top K plus the actual next token (K + 1 entries when it ranks below K): the top K go to
`topk_ids` / `topk_logprobs`, the actual token's log-prob to `target_logprobs` (what alm needs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmdistill.config import LLMDistillError
from llmdistill.signal import IGNORE_INDEX, TeacherSignal

# A log-probability for "nothing here": exp() is 0 in fp32, yet finite, so sums over it stay finite.
LOGP_FILLER = -1e4


@dataclass
class Prompt:
    """One document segment of one row: tokens input_ids[row, start:start + n] (+ the row's final target)."""

    row: int
    start: int
    token_ids: list[int]


def scored_tokens(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, position_ids, targets) the teacher scores: its own tokenization when the batch carries one,
    else the batch's. The teacher's target at t is its token t + 1 when that continues the same document;
    its last position predicts nothing (the text after the window is not in the batch)."""
    if "teacher_input_ids" not in batch:
        return batch["input_ids"], batch["position_ids"], batch["targets"]
    ids, pos = batch["teacher_input_ids"], batch["teacher_position_ids"]
    targets = torch.full_like(ids, IGNORE_INDEX)
    # A document (and each padding token) starts at position 0: no target across that boundary.
    targets[:, :-1] = torch.where(pos[:, 1:] != 0, ids[:, 1:], IGNORE_INDEX)
    return ids, pos, targets


def segment_bounds(position_ids: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each document in a packed row: a new one begins wherever position_ids restart at 0."""
    starts = [t for t, p in enumerate(position_ids) if t == 0 or p == 0]
    return list(zip(starts, [*starts[1:], len(position_ids)], strict=True))


def build_prompts(input_ids: torch.Tensor, position_ids: torch.Tensor, targets: torch.Tensor) -> list[Prompt]:
    """The prompts that give a teacher signal at every valid position of a [B, T] batch."""
    prompts = []
    for row, (ids, pos, tgt) in enumerate(
        zip(input_ids.tolist(), position_ids.tolist(), targets.tolist(), strict=True)
    ):
        for start, end in segment_bounds(pos):
            valid = [t for t in range(start, end) if tgt[t] != IGNORE_INDEX]
            if not valid:
                continue  # nothing to predict (a one-token document at a boundary, padding, no answer)
            # Up to the last valid position and its target (the next token), so that position has a score.
            last = valid[-1]
            prompts.append(Prompt(row, start, [*ids[start : last + 1], tgt[last]]))
    return prompts


def top_k_entries(entries: dict[int, float], k: int) -> tuple[list[int], list[float]]:
    """The k most likely (id, log-prob), padded with fillers; vLLM's extra actual-token entry is not one."""
    best = sorted(entries.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    ids = [i for i, _ in best] + [0] * (k - len(best))
    logprobs = [lp for _, lp in best] + [LOGP_FILLER] * (k - len(best))
    return ids, logprobs


def signal_from_prompt_logprobs(
    prompts: list[Prompt],
    prompt_logprobs: list[list[dict[int, float] | None]],
    shape: tuple[int, int],
    k: int,
    targets: torch.Tensor | None = None,
) -> TeacherSignal:
    """Scatter each prompt's prompt_logprobs[j] (j >= 1) to batch position start + j - 1: top-k [B, T, K] and
    the actual next token's log-prob [B, T] (NaN where no prompt covers a position). With `targets` [B, T],
    only positions whose target is valid are converted (the rest keep the filler)."""
    b, t = shape
    ids = torch.zeros(b, t, k, dtype=torch.int32)
    logprobs = torch.full((b, t, k), LOGP_FILLER, dtype=torch.float32)
    actual = torch.full((b, t), float("nan"), dtype=torch.float32)
    wanted = None if targets is None else (targets != IGNORE_INDEX).tolist()
    for prompt, per_token in zip(prompts, prompt_logprobs, strict=True):
        if len(per_token) != len(prompt.token_ids):
            raise LLMDistillError(
                f"teacher returned {len(per_token)} prompt log-probs for a "
                f"{len(prompt.token_ids)}-token prompt"
            )
        for j in range(1, len(per_token)):
            pos = prompt.start + j - 1
            if pos >= t:
                break
            if wanted is not None and not wanted[prompt.row][pos]:
                continue
            top_ids, top_lp = top_k_entries(per_token[j], k)
            ids[prompt.row, pos] = torch.tensor(top_ids, dtype=torch.int32)
            logprobs[prompt.row, pos] = torch.tensor(top_lp, dtype=torch.float32)
            actual[prompt.row, pos] = per_token[j].get(prompt.token_ids[j], float("nan"))
    return TeacherSignal(topk_ids=ids, topk_logprobs=logprobs, target_logprobs=actual)


def score_batch(score, batch: dict, k: int) -> TeacherSignal:
    """`score(prompts, k)` -> per-prompt prompt_logprobs (a server, the offline engine), turned into the
    signal of the batch's scored tokens."""
    ids, pos, targets = scored_tokens(batch)
    prompts = build_prompts(ids, pos, targets)
    signal = signal_from_prompt_logprobs(prompts, score(prompts, k), tuple(ids.shape), k, targets)
    if "teacher_input_ids" in batch:
        signal.input_ids = ids
    return signal
