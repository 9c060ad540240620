"""The loss registry: losses register themselves by name with what they need from the trainer.

The package (llmdistill/losses/__init__.py) imports every built-in loss module, so the registry is full
whenever any part of llmdistill.losses has been imported. A new loss is one module here, listed there.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from pydantic import TypeAdapter, ValidationError
from pydantic.errors import PydanticSchemaGenerationError

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


# What the trainer passes a loss itself; every other parameter comes from the config.
TRAINER_ARGUMENTS = frozenset({"self", "student", "signal", "batch", "student_config", "teacher_config"})


def config_parameters(fn: Callable) -> dict[str, inspect.Parameter]:
    """The parameters a config may give the loss (its function's, or its class's __init__'s), with their
    annotations evaluated (the loss modules use `from __future__ import annotations`)."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        sig = inspect.signature(target, eval_str=True)
    except NameError:  # an annotation naming something only a type checker imports: left unchecked
        sig = inspect.signature(target)
    return {name: p for name, p in sig.parameters.items() if name not in TRAINER_ARGUMENTS}


def _value_problem(annotation, value) -> str | None:
    """What is wrong with `value` for a parameter of this annotation (strictly: "0.5" is no float), or None.

    The annotation is the rule: a type, a Literal of choices, or Annotated with pydantic constraints
    (`Annotated[float, Field(gt=0)]`), so each loss states a parameter's range once, in its signature, and
    this check refuses a bad value before any weights load."""
    if annotation is inspect.Parameter.empty or isinstance(annotation, str):
        return None
    try:
        TypeAdapter(annotation).validate_python(value, strict=True)
    except PydanticSchemaGenerationError:  # a type pydantic cannot check (not a config value)
        return None
    except ValidationError as err:
        return "; ".join(dict.fromkeys(e["msg"] for e in err.errors()))
    return None


def check_params(where: str, fn: Callable, params: dict) -> None:
    """Refuse parameters the loss does not take, and values its signature's annotations refuse; `where` is
    the term's place in the config (`loss.0`), each error names `<where>.<parameter>`."""
    accepted = config_parameters(fn)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"{where} ({fn.loss_name}): unknown parameter(s) {unknown}; {fn.loss_name} takes "
            f"{list(accepted) or 'none'}"
        )
    for key, value in params.items():
        problem = _value_problem(accepted[key].annotation, value)
        if problem:
            raise ConfigError(f"{where}.{key} ({fn.loss_name}): {problem} (got {value!r})")


def reads_teacher_per_position(fn: Callable) -> bool:
    """A token-level or hidden-state loss: it reads the teacher's signal position by position, on the
    student's tokens (so teacher and student must share the tokenizer)."""
    return "teacher" in fn.needs and not fn.cross_tokenizer


def check_terms(terms) -> None:
    """The objective's terms as a whole (config `loss` entries): known names, known parameters of valid
    values (check_params), and no cross-tokenizer term beside a term that reads the teacher per student
    position.

    A cross-tokenizer objective's teacher signal is computed on the teacher's own tokens; `fkl`, `sinkhorn`,
    `hidden_mse`, ... would read it with student rows. `ce` reads no teacher signal: it mixes with anything.
    """
    fns = [get_loss(t.name) for t in terms]
    for i, (term, fn) in enumerate(zip(terms, fns, strict=True)):
        check_params(f"loss.{i}", fn, term.params)
    cross = [t.name for t, fn in zip(terms, fns, strict=True) if fn.cross_tokenizer]
    per_position = [t.name for t, fn in zip(terms, fns, strict=True) if reads_teacher_per_position(fn)]
    if cross and per_position:
        raise ConfigError(
            f"loss: cross-tokenizer terms {cross} cannot be mixed with {per_position}, which read the "
            "teacher per student token (the teacher's signal is on its own tokens); keep one kind "
            "(ce mixes with either)"
        )
