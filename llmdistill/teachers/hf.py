"""The teacher in-process: an HF model (a DeepSpeed inference engine under ZeRO-3) run on the student's
batch."""

from __future__ import annotations

import logging

import torch

from llmdistill.config import ConfigError
from llmdistill.signal import TeacherSignal, head_signal, packed_attention_kwargs
from llmdistill.teachers.base import Capabilities, TeacherSource, register_source

log = logging.getLogger("llmdistill.teachers.hf")


@register_source("hf")
class HFTeacher(TeacherSource):
    # Under ZeRO-3 the forward is a collective: every rank calls it in step, so it never fails on one rank
    # alone.
    capabilities = Capabilities(full_logits=True, hidden_states=True, cross_tokenizer=True)
    score_on_device = True

    def __init__(self, model, hidden_states: bool = False):
        self.model = model  # an HF model, or a DeepSpeed engine wrapping one
        self.hidden_states = hidden_states
        self.fused = True  # until the model shows its logits are not its head's output
        self.head_checked = False  # the fused form's check, on the first batch only

    @classmethod
    def build(cls, cfg, model, needs, student):
        return cls(model, hidden_states="teacher_hidden" in needs)

    @torch.no_grad()
    def signal(self, batch: dict) -> TeacherSignal:
        # Cross-tokenizer batches carry the teacher's own tokenization of the same text; alm/uld read logits.
        cross = "teacher_input_ids" in batch
        input_ids = batch["teacher_input_ids"] if cross else batch["input_ids"]
        position_ids = batch["teacher_position_ids"] if cross else batch["position_ids"]
        if not cross and self.fused:
            # The fused form: final hidden states and the LM head, so [B, T, V] teacher logits never exist;
            # the losses apply the head chunk by chunk beside the student's.
            try:
                signal = head_signal(
                    self.model, input_ids, position_ids, self.hidden_states, check=not self.head_checked
                )
                self.head_checked = True
                return signal
            except ConfigError as err:  # logits that are not the head's output (soft-capping): full logits
                log.warning(f"{err}; using full teacher logits")
                self.fused = False
        model = self.model.module if hasattr(self.model, "module") else self.model
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            output_hidden_states=self.hidden_states,
            use_cache=False,
            **packed_attention_kwargs(model, position_ids),
        )
        hidden = list(out.hidden_states) if self.hidden_states else None
        return TeacherSignal(logits=out.logits, hidden_states=hidden, input_ids=input_ids if cross else None)
