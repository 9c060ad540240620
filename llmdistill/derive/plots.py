"""PNG plots of the importance scores (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import torch


def plot_scores(scores: dict, depth: dict[str, torch.Tensor], plan: dict, out_dir: Path) -> list[str]:
    """Per-layer scores, per-head heatmap, neuron histogram and sorted channel scores; returns file names."""
    import matplotlib  # lazy: matplotlib is needed only when derive.plots is on

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    fig, axes = plt.subplots(1, len(depth), figsize=(4 * len(depth), 3), squeeze=False)
    for ax, (method, s) in zip(axes[0], depth.items(), strict=True):
        colors = ["tab:blue" if i in plan["layers"] else "tab:red" for i in range(len(s))]
        ax.bar(range(len(s)), s.tolist(), color=colors)
        ax.set(title=f"{method} (red: dropped)", xlabel="layer")
    fig.tight_layout()
    fig.savefig(out_dir / "layers.png", dpi=100)
    plt.close(fig)
    written.append("layers.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    im = ax.imshow(scores["heads"].numpy(), aspect="auto", cmap="viridis")
    ax.set(title="attention head importance", xlabel="query head", ylabel="layer")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(out_dir / "heads.png", dpi=100)
    plt.close(fig)
    written.append("heads.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(scores["neurons"].flatten().log10().clamp(min=-8).numpy(), bins=60)
    ax.set(title="MLP neuron importance (all layers)", xlabel="log10 mean |activation|", ylabel="neurons")
    fig.tight_layout()
    fig.savefig(out_dir / "neurons.png", dpi=100)
    plt.close(fig)
    written.append("neurons.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(torch.sort(scores["channels"], descending=True).values.numpy())
    ax.axvline(len(plan["hidden"]) - 0.5, color="tab:red", linestyle="--", label="kept")
    ax.set(title="hidden channel importance (sorted)", xlabel="rank", ylabel="score")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "channels.png", dpi=100)
    plt.close(fig)
    written.append("channels.png")
    return written
