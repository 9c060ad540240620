"""Importance scores for pruning, all gathered on a calibration set and summed across ranks.

Depth: block importance (1 - cos(layer input, layer output), ShortGPT / Minitron), the loss increase when a
layer is skipped, and MAGNET's mean |gradient| per layer. Width (Minitron, activation based): attention heads
scored on the input to o_proj, MLP neurons on the input to down_proj, hidden channels on the outputs of every
RMSNorm that reads the residual stream. Every statistic is a sum plus a count, so ranks can add theirs with
all_reduce and the result does not depend on how the calibration set was split.

How a width score aggregates activations over the calibration tokens (`derive.aggregation`):
  mean      the mean over all tokens of |activation| (a head: of the L2 norm of its slice)
  minitron  ModelOpt's Minitron: per sequence the mean over its tokens, then the L2 norm over sequences:
            sqrt(sum_b (mean_t |a_bt|)^2) (a head: |a_bt| is the L2 norm over head_dim; hidden channels: the
            sum of that over the residual norms)
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from llmdistill.losses.divergences import summed_nll
from llmdistill.signal import forward_to_head

DEPTH_METHODS = ("block_importance", "perplexity", "magnet_grad")
AGGREGATIONS = ("mean", "minitron")
HIDDEN_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (no-op in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(t)
    return t


def decoder_layers(model):
    return model.model.layers


def residual_norms(model) -> dict[str, torch.nn.Module]:
    """The RMSNorms with weights on the hidden axis, by prefix: those that read the residual stream and, in
    Gemma-2/3, those that normalise the attention and MLP outputs before they are added to it."""
    norms = {"model.norm": model.model.norm}
    for i, layer in enumerate(decoder_layers(model)):
        for name in HIDDEN_NORMS:
            if hasattr(layer, name):
                norms[f"model.layers.{i}.{name}"] = getattr(layer, name)
    return norms


def _forward(model, batch):
    # Packed batch: position_ids restart at each document and no attention_mask is passed (block-causal).
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits


def batch_nll(model, batch) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood and the number of predicted tokens (losses' summed_nll)."""
    return summed_nll(forward_to_head(model, batch), batch)


@torch.no_grad()
def held_out_loss(model, batches) -> float:
    """Mean next-token loss (nats/token) over this rank's batches, reduced over all ranks."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=model.device)
    for batch in batches:
        nll, n = batch_nll(model, batch)
        total[0] += nll.double()
        total[1] += n
    all_reduce_(total)
    model.train(was_training)
    return float(total[0] / total[1].clamp(min=1))


def aggregate(magnitudes: torch.Tensor, aggregation: str) -> torch.Tensor:
    """One calibration batch's contribution to a width score: `magnitudes` [B, T, units] (|activation|, or a
    head's L2 norm) reduced to [units], a sum that `finish_aggregate` turns into the score once every batch
    and rank has added theirs (module docstring)."""
    if aggregation == "mean":
        return magnitudes.double().sum(dim=(0, 1))
    if aggregation == "minitron":
        return magnitudes.double().mean(dim=1).pow(2).sum(dim=0)
    raise ValueError(f"unknown aggregation {aggregation!r}; known: {AGGREGATIONS}")


def finish_aggregate(total: torch.Tensor, tokens: torch.Tensor, aggregation: str) -> torch.Tensor:
    return total / tokens.clamp(min=1) if aggregation == "mean" else total.sqrt()


@torch.no_grad()
def activation_scores(model, batches, aggregation: str = "mean") -> dict[str, torch.Tensor]:
    """One pass with hooks: block importance, head / neuron / channel activations and per-norm input energy.

    Returns (float64, on CPU), width scores aggregated as `aggregation` says (module docstring):
      block_importance [L]   mean (1 - cos(input, output)) of each decoder layer
      heads [L, n_heads]     L2 norm of each query head's slice of the o_proj input
      neurons [L, ffn]       |input to down_proj| (act(gate) * up: what the neuron actually writes)
      channels [hidden]      |output| of every residual RMSNorm, summed over the norms
      norm_energy {prefix: [hidden]}  mean squared input of each residual norm (rescaling)
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; known: {AGGREGATIONS}")
    cfg = model.config
    layers = decoder_layers(model)
    n_layers, n_heads = len(layers), cfg.num_attention_heads
    dev = model.device
    acc = {
        "block_importance": torch.zeros(n_layers, dtype=torch.float64, device=dev),
        "heads": torch.zeros(n_layers, n_heads, dtype=torch.float64, device=dev),
        "neurons": torch.zeros(n_layers, cfg.intermediate_size, dtype=torch.float64, device=dev),
    }
    norms = residual_norms(model)
    channels = {name: torch.zeros(cfg.hidden_size, dtype=torch.float64, device=dev) for name in norms}
    energy = {name: torch.zeros(cfg.hidden_size, dtype=torch.float64, device=dev) for name in norms}
    tokens = torch.zeros(1, dtype=torch.float64, device=dev)
    handles = []

    def on_layer(i):
        def hook(module, args, output):
            x_in = args[0]
            x_out = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
            acc["block_importance"][i] += (1 - cos).double().sum()

        return hook

    def on_o_proj(i):
        def hook(module, args):
            x = args[0]
            per_head = x.float().unflatten(-1, (n_heads, -1)).norm(dim=-1)  # [B, T, n_heads]
            acc["heads"][i] += aggregate(per_head, aggregation)

        return hook

    def on_down_proj(i):
        def hook(module, args):
            acc["neurons"][i] += aggregate(args[0].float().abs(), aggregation)

        return hook

    def on_norm(name):
        def hook(module, args, output):
            energy[name] += args[0].float().pow(2).double().sum(dim=(0, 1))
            channels[name] += aggregate(output.float().abs(), aggregation)

        return hook

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_hook(on_layer(i)))
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o_proj(i)))
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_down_proj(i)))
        for name, module in norms.items():
            handles.append(module.register_forward_hook(on_norm(name)))
        model.eval()
        for batch in batches:
            _forward(model, batch)
            tokens += batch["input_ids"].numel()
    finally:
        for h in handles:
            h.remove()
    for t in [*acc.values(), *channels.values(), *energy.values(), tokens]:
        all_reduce_(t)
    n = tokens.clamp(min=1)
    out = {"block_importance": (acc.pop("block_importance") / n).cpu()}
    out |= {k: finish_aggregate(v, tokens, aggregation).cpu() for k, v in acc.items()}
    out["channels"] = sum(finish_aggregate(v, tokens, aggregation) for v in channels.values()).cpu()
    out["norm_energy"] = {k: (v / n).cpu() for k, v in energy.items()}
    return out


@contextlib.contextmanager
def layers_skipped(model, skip: set[int]):
    """Temporarily run the model without some decoder layers (per-layer config lists are cut to match)."""
    inner = model.model
    original = inner.layers
    cfg = inner.config
    layer_types = getattr(cfg, "layer_types", None)
    keep = [i for i in range(len(original)) if i not in skip]
    inner.layers = torch.nn.ModuleList([original[i] for i in keep])
    if layer_types is not None:
        cfg.layer_types = [layer_types[i] for i in keep]
    try:
        yield
    finally:
        inner.layers = original
        if layer_types is not None:
            cfg.layer_types = layer_types


@torch.no_grad()
def perplexity_scores(model, batches, base_loss: float | None = None) -> torch.Tensor:
    """Increase of the calibration loss when each layer alone is skipped (higher: more important)."""
    if base_loss is None:
        base_loss = held_out_loss(model, batches)
    scores = []
    for i in range(len(decoder_layers(model))):
        with layers_skipped(model, {i}):
            scores.append(held_out_loss(model, batches) - base_loss)
    return torch.tensor(scores, dtype=torch.float64)


def gradient_magnitudes(model, batches, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Mean over calibration batches of |d loss / d parameter| (MAGNET's saliency), per parameter, all ranks.

    The absolute value is taken per micro-batch before summing, so gradients of opposite sign on different
    batches don't cancel into a spuriously small saliency. `names` restricts which parameters are tracked.
    """
    params = {n: p for n, p in model.named_parameters() if names is None or n in names}
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = torch.zeros(1, dtype=torch.float64, device=model.device)
    was_training = model.training
    model.eval()  # no dropout: the gradient of the deterministic loss
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            nll, n_tok = batch_nll(model, batch)
            (nll / max(n_tok, 1)).backward()
            for n, p in params.items():
                if p.grad is not None:
                    sums[n] += p.grad.detach().float().abs()
            count += 1
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])
        model.train(was_training)
    all_reduce_(count)
    for t in sums.values():
        all_reduce_(t)
    return {n: (t / count.clamp(min=1).float()).cpu() for n, t in sums.items()}


def magnet_grad_scores(model, batches) -> torch.Tensor:
    """MAGNET depth score: mean |gradient| over all parameters of each decoder layer."""
    grads = gradient_magnitudes(model, batches, [n for n, _ in model.named_parameters() if ".layers." in n])
    n_layers = len(decoder_layers(model))
    total = torch.zeros(n_layers, dtype=torch.float64)
    numel = torch.zeros(n_layers, dtype=torch.float64)
    for name, g in grads.items():
        i = int(name.split(".layers.", 1)[1].split(".", 1)[0])
        total[i] += g.double().sum()
        numel[i] += g.numel()
    return total / numel.clamp(min=1)


def depth_scores(model, batches, methods, activations: dict | None = None) -> dict[str, torch.Tensor]:
    """The requested per-layer scores, higher meaning more important."""
    out = {}
    for method in methods:
        if method == "block_importance":
            out[method] = (activations or activation_scores(model, batches))["block_importance"]
        elif method == "perplexity":
            out[method] = perplexity_scores(model, batches)
        elif method == "magnet_grad":
            out[method] = magnet_grad_scores(model, batches)
        else:
            raise ValueError(f"unknown depth method {method!r}; known: {DEPTH_METHODS}")
    return out


def combine_depth_scores(scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """Average of min-max normalised scores, so methods on different scales weigh the same."""
    parts = []
    for s in scores.values():
        s = s.double()
        span = s.max() - s.min()
        parts.append((s - s.min()) / span if span > 0 else torch.zeros_like(s))
    return torch.stack(parts).mean(0)
