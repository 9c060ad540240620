"""Losses on hidden states: feature alignment (`hidden_mse`, `hidden_cos`) and curriculum extraction.

Layer indices here are positions in HF's `hidden_states` tuple: 0 is the embeddings, i is the output of layer
i (the last entry is usually after the final norm). A layer map is a list of (teacher_index, student_index)
pairs. Config forms of `layer_map`:
- omitted: evenly spaced, student index i (1..L_s) <- teacher index round(i * L_t / L_s);
- a list of L_s ints: the teacher layer (0-based, as derivation's kept indices) each student layer came from,
  so student index i + 1 <- teacher index k_i + 1;
- a list of [teacher_index, student_index] pairs in hidden_states positions.
Only positions with a target (targets != -100) are compared, so padding never contributes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmdistill.config import ConfigError
from llmdistill.losses.registry import check_params, get_loss, register
from llmdistill.signal import IGNORE_INDEX


def _config_value(config, key: str, what: str) -> int:
    value = getattr(config, key, None) if config is not None else None
    if value is None and isinstance(config, dict):
        value = config.get(key)
    if value is None:
        raise ConfigError(f"{what}: needs the {key} of the student and teacher model configs")
    return int(value)


def layer_pairs(student_layers: int, teacher_layers: int, layer_map=None) -> list[tuple[int, int]]:
    """(teacher_index, student_index) pairs in hidden_states positions; see the module docstring."""
    if layer_map is None:
        return [(round(i * teacher_layers / student_layers), i) for i in range(1, student_layers + 1)]
    if all(isinstance(x, int) for x in layer_map):
        if len(layer_map) != student_layers:
            raise ConfigError(
                f"layer_map lists {len(layer_map)} teacher layers but the student has {student_layers} layers"
            )
        pairs = [(k + 1, i + 1) for i, k in enumerate(layer_map)]
    else:
        pairs = [tuple(int(v) for v in pair) for pair in layer_map]
        if any(len(p) != 2 for p in pairs):
            raise ConfigError(
                f"layer_map entries must be [teacher_index, student_index] pairs, got {layer_map}"
            )
    for t, s in pairs:
        if not (0 <= t <= teacher_layers and 0 <= s <= student_layers):
            raise ConfigError(
                f"layer_map pair ({t}, {s}) is out of range: teacher has hidden states 0..{teacher_layers}, "
                f"student 0..{student_layers}"
            )
    return pairs


def _valid_rows(batch: dict) -> torch.Tensor:
    return (batch["targets"].reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


def _rows(states, index: int, rows: torch.Tensor, who: str) -> torch.Tensor:
    if states is None:
        raise ConfigError(
            f"hidden-state loss: the {who} gave no hidden states (the trainer must ask for them)"
        )
    if index >= len(states):
        raise ConfigError(
            f"hidden-state loss: {who} has {len(states)} hidden states, layer map asks for {index}"
        )
    h = states[index]
    return h.reshape(-1, h.shape[-1]).index_select(0, rows).float()


def feature_distance(
    student: torch.Tensor, teacher: torch.Tensor, kind: str, normalize: bool
) -> torch.Tensor:
    if kind == "cos":
        return (1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)).mean()
    mse = (student - teacher).pow(2).mean()
    if normalize:
        # SquareHead (Kurtic et al.): MSE divided by the teacher feature's mean square, so layers of very
        # different scale weigh the same.
        mse = mse / teacher.pow(2).mean().clamp(min=1e-8)
    return mse


class _HiddenAlignment(torch.nn.Module):
    """Align mapped student layers with teacher layers; a learnable projection student -> teacher width."""

    kind = "mse"

    def __init__(
        self,
        student_config=None,
        teacher_config=None,
        layer_map=None,
        normalize: bool = False,
        projection: bool = True,
    ):
        super().__init__()
        name = f"hidden_{self.kind}"
        self.pairs = layer_pairs(
            _config_value(student_config, "num_hidden_layers", name),
            _config_value(teacher_config, "num_hidden_layers", name),
            layer_map,
        )
        self.normalize = normalize
        width_s = _config_value(student_config, "hidden_size", name)
        width_t = _config_value(teacher_config, "hidden_size", name)
        self.proj = torch.nn.ModuleList()
        if width_s != width_t:
            if not projection:
                raise ConfigError(f"{name}: widths differ ({width_s} vs {width_t}) and projection is off")
            for _ in self.pairs:
                layer = torch.nn.Linear(width_s, width_t, bias=False)
                # Orthonormal columns: starts as a norm-preserving embedding of the student's space.
                torch.nn.init.orthogonal_(layer.weight)
                self.proj.append(layer)

    def forward(self, student, signal, batch):
        rows = _valid_rows(batch)
        if signal is None or signal.hidden_states is None:
            raise ConfigError(f"hidden_{self.kind}: the teacher signal has no hidden states")
        total = 0.0
        metrics = {}
        for n, (t, s) in enumerate(self.pairs):
            hs = _rows(student.hidden_states, s, rows, "student")
            ht = _rows(signal.hidden_states, t, rows, "teacher")
            if len(self.proj):
                hs = self.proj[n](hs.to(self.proj[n].weight.dtype)).float()
            value = feature_distance(hs, ht, self.kind, self.normalize)
            metrics[f"hidden_{self.kind}/layer{s}"] = value.detach()  # read once per step by the trainer
            total = total + value
        return total / len(self.pairs), metrics


@register("hidden_mse", needs={"teacher", "teacher_hidden", "student_hidden"})
class HiddenMSE(_HiddenAlignment):
    """MSE between mapped hidden states (MAGNET-style feature alignment); normalize=True is SquareHead."""

    kind = "mse"


@register("hidden_cos", needs={"teacher", "teacher_hidden", "student_hidden"})
class HiddenCos(_HiddenAlignment):
    """1 - cosine similarity between mapped hidden states (normalize has no effect: cosine is scale-free)."""

    kind = "cos"


@register("curriculum", needs={"teacher", "teacher_hidden", "student_hidden"})
class Curriculum(torch.nn.Module):
    """Curriculum extraction: intermediate layers first, one stage at a time, then the output distribution.

    Stages are the layer map's pairs in order (default: evenly spaced, every student layer except the last,
    whose output the final stage trains). With steps_per_stage = [n_1, ..., n_S] (an int means the same n for
    all), at optimizer step `batch["step"]`:
      - step in [n_1 + ... + n_{k-1}, n_1 + ... + n_k): stage k, loss = MSE(student hidden_states[s_k],
        teacher hidden_states[t_k] @ R_k), R_k a FIXED random [H_t, H_s] Gaussian (entries N(0, 1/H_s), so
        norms are kept in expectation), drawn from `seed` and saved as a buffer; normalize=True divides by the
        target's mean square (SquareHead) so every stage starts near 1;
      - step >= n_1 + ... + n_S: the `final` loss (default fkl) with `final_params`, on the output
        distribution.
    Only the current stage's term is computed; the metric curriculum/stage reports k (S + 1 for the final
    one).
    """

    def __init__(
        self,
        student_config=None,
        teacher_config=None,
        steps_per_stage: int | list[int] = 100,
        layer_map=None,
        final: str = "fkl",
        final_params: dict | None = None,
        normalize: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        student_layers = _config_value(student_config, "num_hidden_layers", "curriculum")
        pairs = layer_pairs(
            student_layers, _config_value(teacher_config, "num_hidden_layers", "curriculum"), layer_map
        )
        if layer_map is None:
            pairs = [p for p in pairs if p[1] < student_layers]
        self.pairs = pairs
        steps = [steps_per_stage] * len(pairs) if isinstance(steps_per_stage, int) else list(steps_per_stage)
        if len(steps) != len(pairs) or any(n < 0 for n in steps):
            raise ConfigError(
                f"curriculum: steps_per_stage needs {len(pairs)} non-negative counts, got {steps}"
            )
        self.boundaries = [sum(steps[: k + 1]) for k in range(len(steps))]
        self.normalize = normalize
        final_fn = get_loss(final)
        if final in ("curriculum", "hidden_mse", "hidden_cos") or isinstance(final_fn, type):
            raise ConfigError(f"curriculum: final must be an output-distribution loss, got {final!r}")
        check_params("curriculum.final_params", final_fn, final_params or {})
        self.final_fn, self.final_params = final_fn, dict(final_params or {})
        width_s = _config_value(student_config, "hidden_size", "curriculum")
        width_t = _config_value(teacher_config, "hidden_size", "curriculum")
        generator = torch.Generator().manual_seed(seed)
        for k in range(len(pairs)):
            projection = torch.randn(width_t, width_s, generator=generator) / width_s**0.5
            self.register_buffer(f"projection{k}", projection, persistent=True)

    def stage(self, step: int) -> int:
        """0-based stage index; len(self.pairs) is the output-distribution stage."""
        for k, end in enumerate(self.boundaries):
            if step < end:
                return k
        return len(self.pairs)

    def forward(self, student, signal, batch):
        if "step" not in batch:
            raise ConfigError("curriculum: the batch has no 'step' (the trainer must set batch['step'])")
        k = self.stage(int(batch["step"]))
        metrics = {"curriculum/stage": float(k + 1)}
        if k == len(self.pairs):
            value, extra = self.final_fn(student, signal, batch, **self.final_params)
            return value, {**metrics, **extra}
        if signal is None or signal.hidden_states is None:
            raise ConfigError("curriculum: the teacher signal has no hidden states")
        rows = _valid_rows(batch)
        t, s = self.pairs[k]
        hs = _rows(student.hidden_states, s, rows, "student")
        target = _rows(signal.hidden_states, t, rows, "teacher") @ getattr(self, f"projection{k}").float()
        value = feature_distance(hs, target, "mse", self.normalize)
        # Zero-weighted use of the head and the final hidden state: every parameter is in the graph at every
        # stage, so data-parallel / ZeRO ranks always reduce the same set of gradients.
        value = value + 0.0 * student.head(student.hidden.reshape(-1, student.hidden.shape[-1])[:1]).sum()
        return value, metrics
