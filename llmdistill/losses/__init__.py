"""The objective: a weighted list of losses, each registered by name.

A loss is `fn(student: StudentOutput, signal: TeacherSignal | None, batch: dict, **params) -> (scalar, metrics)`.
A loss with learnable state (a projection between widths) is an `nn.Module` class registered the same way; it is
built with `student_config=` and `teacher_config=` plus its params, and its forward has the function's signature.
Config entries look like `{name: fkl, weight: 1.0, temperature: 2.0}`; unknown names and parameters are errors.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from llmdistill.config import ConfigError, LossTerm

_REGISTRY: dict[str, Callable] = {}


def register(name: str, needs: frozenset[str] | set[str] = frozenset(), cross_tokenizer: bool = False):
    """Register a loss under `name`.

    `needs` says what the trainer must provide: "teacher" (a TeacherSignal), "teacher_hidden", "student_hidden".
    `cross_tokenizer` marks losses that accept teacher and student with different tokenizers.
    """

    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"loss {name!r} registered twice")
        fn.loss_name, fn.needs, fn.cross_tokenizer = name, frozenset(needs), cross_tokenizer
        _REGISTRY[name] = fn
        return fn

    return wrap


def loss_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_loss(name: str) -> Callable:
    _load_builtin()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown loss {name!r}; known losses: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def _load_builtin():
    # Importing the modules runs their @register decorators.
    from llmdistill.losses import divergences  # noqa: F401


def _check_params(where: str, fn: Callable, params: dict) -> None:
    target = fn.__init__ if inspect.isclass(fn) else fn
    sig = inspect.signature(target)
    skip = {"self", "student", "signal", "batch", "student_config", "teacher_config"}
    known = [p for p in sig.parameters if p not in skip]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown parameter(s) {unknown}; {fn.loss_name} takes {known or 'none'}")


class Objective(torch.nn.Module):
    """sum_i weight_i * loss_i, with each term's value in the metrics."""

    def __init__(self, terms: list[LossTerm], student_config=None, teacher_config=None):
        super().__init__()
        if not terms:
            raise ConfigError("loss: the objective needs at least one term")
        self.terms = []
        self.stateful = torch.nn.ModuleDict()
        for i, term in enumerate(terms):
            fn = get_loss(term.name)
            _check_params(f"loss.{i} ({term.name})", fn, term.params)
            if inspect.isclass(fn):
                self.stateful[str(i)] = fn(student_config=student_config, teacher_config=teacher_config, **term.params)
                self.terms.append((term.name, term.weight, self.stateful[str(i)], {}))
            else:
                self.terms.append((term.name, term.weight, fn, term.params))

    @property
    def needs(self) -> frozenset[str]:
        return frozenset().union(*(get_loss(name).needs for name, *_ in self.terms))

    @property
    def cross_tokenizer(self) -> bool:
        return any(get_loss(name).cross_tokenizer for name, *_ in self.terms)

    def forward(self, student, signal, batch) -> tuple[torch.Tensor, dict[str, float]]:
        total = 0.0
        metrics: dict[str, float] = {}
        for name, weight, fn, params in self.terms:
            value, extra = fn(student, signal, batch, **params)
            if not torch.isfinite(value):
                raise FloatingPointError(f"loss {name} is {value.item()} (non-finite)")
            total = total + weight * value
            metrics[f"loss/{name}"] = value.detach().float().item()
            metrics.update(extra)
        return total, metrics
