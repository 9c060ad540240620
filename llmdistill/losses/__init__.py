"""The objective: a weighted list of losses, each registered by name.

A loss is `fn(student: StudentOutput, signal: TeacherSignal | None, batch: dict, **params) -> (scalar,
metrics)`. A loss with learnable state (a projection between widths) is an `nn.Module` class registered the
same way; it is built with `student_config=` and `teacher_config=` plus its params, and its forward has the
function's signature. Config entries look like `{name: fkl, weight: 1.0, temperature: 2.0}`; unknown names and
parameters are errors.
"""

from __future__ import annotations

import inspect

import torch

from llmdistill.config import ConfigError, LossTerm

# Importing the built-in loss modules runs their @register decorators: a new loss module is listed here.
from llmdistill.losses import alm, divergences, features, sinkhorn  # noqa: F401
from llmdistill.losses.balance import combine_gradients, parse_balance
from llmdistill.losses.divergences import backpropagated_twice, fused_head_terms, shared_vocab
from llmdistill.losses.registry import check_terms, get_loss, loss_names, reads_teacher_per_position, register
from llmdistill.signal import StudentOutput

__all__ = ["Objective", "get_loss", "loss_names", "register"]


class Objective(torch.nn.Module):
    """sum_i weight_i * loss_i, with each term's value in the metrics.

    `balance` (None, a dict or the config's BalanceConfig): combine the terms' gradients w.r.t. the student's
    final hidden state with magnitude normalisation and PCGrad projection instead of a plain sum; see
    llmdistill.losses.balance for what it does and costs. Without `balance`, the terms that have a fused head
    form (`fkl`, `jsd`, `ce`, ...: the loss's `head_term`) share one chunked pass of the student's LM head
    instead of one pass each. A non-finite total raises FloatingPointError naming the term,
    `batch["step"]`, the batch (`batch["batch_index"]` when the trainer sets it) and which input is bad.
    """

    def __init__(
        self, terms: list[LossTerm], student_config=None, teacher_config=None, balance=None, defaults=None
    ):
        """`defaults`: parameter values from the run's context (e.g. `layer_map` from a derivation's kept
        layers), given to each term whose loss takes that parameter and whose config does not set it."""
        super().__init__()
        if not terms:
            raise ConfigError("loss: the objective needs at least one term")
        check_terms(terms)
        self.terms = []
        self.stateful = torch.nn.ModuleDict()
        names = [term.name for term in terms]
        for i, term in enumerate(terms):
            fn = get_loss(term.name)
            accepted = inspect.signature(fn.__init__ if inspect.isclass(fn) else fn).parameters
            params = {k: v for k, v in (defaults or {}).items() if k in accepted} | term.params
            # A name used twice gets its index, so the metrics of both survive.
            key = term.name if names.count(term.name) == 1 else f"{term.name}.{i}"
            if inspect.isclass(fn):
                module = fn(student_config=student_config, teacher_config=teacher_config, **params)
                self.stateful[str(i)] = module
                self.terms.append((key, term.weight, self.stateful[str(i)], {}))
            else:
                self.terms.append((key, term.weight, fn, params))
        self._names = names
        self.balance = parse_balance(balance, terms)
        # check_terms refused a cross-tokenizer term beside these, so every term that reads the teacher per
        # position is checked, whatever else the objective holds.
        if any(reads_teacher_per_position(get_loss(name)) for name in names):
            vocab_s = getattr(student_config, "vocab_size", None)
            vocab_t = getattr(teacher_config, "vocab_size", None)
            if vocab_s is not None and vocab_t is not None:
                shared_vocab(int(vocab_s), int(vocab_t))  # raises, pointing to `alm`, on different tokenizers

    @property
    def needs(self) -> frozenset[str]:
        return frozenset().union(*(get_loss(name).needs for name in self._names))

    @property
    def cross_tokenizer(self) -> bool:
        return any(get_loss(name).cross_tokenizer for name in self._names)

    def forward(self, student, signal, batch, check: bool = True) -> tuple[torch.Tensor, dict]:
        """(total, metrics): metrics hold each term's value as `loss/<name>` (a 0-d tensor, left on the
        device) and the terms' own figures.

        `check`: raise FloatingPointError (explain) when the total is not finite, at the cost of one wait for
        the device. The trainer passes False: it reads one flag per micro-batch, agreed over the ranks, and
        asks `explain` only when that flag is set.
        """
        if self.balance is not None and torch.is_grad_enabled() and student.hidden.requires_grad:
            total, metrics = self._balanced(student, signal, batch)
        else:
            total, metrics = self._summed(student, signal, batch)
        # A non-finite term makes the weighted sum non-finite (0 * inf is NaN too), so the total's flag
        # covers every term.
        if check and not bool(torch.isfinite(total)):
            raise FloatingPointError(self.explain(total, metrics, student, signal, batch))
        return total, metrics

    def _summed(self, student, signal, batch):
        values: dict[str, torch.Tensor] = {}
        extras: dict = {}
        total = 0.0
        # The terms with a fused head form share one pass of the student's head (fused_head_terms).
        shared = [term for term in self.terms if hasattr(term[2], "head_term")]
        if len(shared) > 1:
            head_terms = [fn.head_term(student, signal, batch, **params) for _, _, fn, params in shared]
            total, shared_values = fused_head_terms(student, batch, head_terms, [w for _, w, _, _ in shared])
            values |= {key: value for (key, *_), value in zip(shared, shared_values.unbind(), strict=True)}
        for key, weight, fn, params in self.terms:
            if key in values:
                continue
            value, extra = fn(student, signal, batch, **params)
            total = total + weight * value
            values[key] = value
            extras.update(extra)
        return total, self._metrics(values, extras)

    def _balanced(self, student, signal, batch):
        leaf = student.hidden.detach().requires_grad_(True)
        proxy = StudentOutput(
            hidden=leaf,
            head=student.head,
            hidden_states=student.hidden_states,
            logit_softcap=student.logit_softcap,
        )
        total = 0.0
        values: dict[str, torch.Tensor] = {}
        extras: dict = {}
        grads, weights, names = [], [], []
        for key, weight, fn, params in self.terms:
            # Each term is backpropagated for its own gradient here, and again through the total.
            with backpropagated_twice():
                value, extra = fn(proxy, signal, batch, **params)
            total = total + weight * value
            values[key] = value
            extras.update(extra)
            if value.requires_grad:
                (grad,) = torch.autograd.grad(value, leaf, retain_graph=True, allow_unused=True)
                if grad is not None:
                    grads.append(grad)
                    weights.append(weight)
                    names.append(key)
        if grads:
            combined, extra = combine_gradients(grads, weights, names, self.balance)
            extras.update(extra)
            link = (student.hidden * combined.detach()).sum()
            total = total + (link - link.detach())
        return total, self._metrics(values, extras)

    def _metrics(self, values: dict[str, torch.Tensor], extras: dict) -> dict:
        """`loss/<name>` of every term in the config's order (fp32 0-d tensors, no wait for the device), then
        the terms' own figures."""
        ordered = {f"loss/{key}": values[key].detach().float() for key, *_ in self.terms}
        return ordered | extras

    def explain(self, total, metrics, student, signal, batch) -> str:
        """Why the total is not finite, in one line: the first non-finite term, `batch["step"]`, the batch
        (`batch["batch_index"]` when the trainer sets it) and which input is bad. It reads the device (counts
        over every input), so it runs only once something is known to be wrong."""
        step = batch.get("step", "?")
        where = f"batch {batch['batch_index']}" if "batch_index" in batch else "batch"
        shape = tuple(batch["input_ids"].shape) if "input_ids" in batch else None
        bad_terms = [key for key, *_ in self.terms if not bool(torch.isfinite(metrics[f"loss/{key}"]))]
        if not bad_terms:
            return (
                f"the loss is {float(total)} at step {step}, {where} (input_ids {shape}): every term is "
                "finite, their weighted sum overflowed (the loss weights? dtype?)"
            )
        key = bad_terms[0]
        bad = []
        for what, tensor in _inputs_to_check(student, signal):
            # -inf teacher logits are legitimate (masked tokens); NaN or +inf anywhere is not.
            if what.startswith("teacher") and "logit" in what:
                broken = torch.isnan(tensor) | torch.isposinf(tensor)
            else:
                broken = ~torch.isfinite(tensor)
            count = int(broken.sum())
            if count:
                bad.append(f"{what} has {count} NaN/inf values")
        cause = "; ".join(bad) or "inputs are finite, so the loss itself overflowed (temperature? dtype?)"
        value = metrics[f"loss/{key}"].item()
        return f"loss {key} is {value} at step {step}, {where} (input_ids {shape}): {cause}"


def _inputs_to_check(student, signal):
    yield "student hidden", student.hidden.detach()
    if signal is not None:
        if signal.logits is not None:
            yield "teacher logits", signal.logits
        if signal.final_hidden is not None:
            yield "teacher final hidden state", signal.final_hidden
        if signal.topk_logprobs is not None:
            yield "teacher top-k logprobs", signal.topk_logprobs
        for i, h in enumerate(signal.hidden_states or ()):
            yield f"teacher hidden state {i}", h
    for i, h in enumerate(student.hidden_states or ()):
        yield f"student hidden state {i}", h.detach()
