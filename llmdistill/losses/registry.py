"""The loss registry: losses register themselves by name with what they need from the trainer.

The package (llmdistill/losses/__init__.py) imports every built-in loss module, so the registry is full
whenever any part of llmdistill.losses has been imported. A new loss is one module here, listed there.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from llmdistill.config import ConfigError

_REGISTRY: dict[str, Callable] = {}


def register(name: str, needs: frozenset[str] | set[str] = frozenset(), cross_tokenizer: bool = False):
    """Register a loss under `name`.

    `needs` says what the trainer must provide: "teacher" (a TeacherSignal), "teacher_hidden",
    "student_hidden". `cross_tokenizer` marks losses that accept teacher and student with different
    tokenizers.
    """

    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"loss {name!r} registered twice")
        fn.loss_name, fn.needs, fn.cross_tokenizer = name, frozenset(needs), cross_tokenizer
        _REGISTRY[name] = fn
        return fn

    return wrap


def loss_names() -> list[str]:
    return sorted(_REGISTRY)


def get_loss(name: str) -> Callable:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown loss {name!r}; known losses: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def check_params(where: str, fn: Callable, params: dict) -> None:
    """Refuse parameters the loss (its function, or its class's __init__) does not take."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    sig = inspect.signature(target)
    skip = {"self", "student", "signal", "batch", "student_config", "teacher_config"}
    known = [p for p in sig.parameters if p not in skip]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown parameter(s) {unknown}; {fn.loss_name} takes {known or 'none'}")
