"""Figures: a stage's loss curve, and expert loading per MoE layer split by modality (as in the paper)."""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    return plt


def loss_curve(records: list[dict], path: Path, title: str) -> Path | None:
    """Total, LM and (if any) aux loss against the step, from the Trainer's log records."""
    rows = [r for r in records if "loss" in r]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label="loss (total)", lw=1.2)
    if any("lm_loss" in r for r in rows):
        ax.plot(steps, [r.get("lm_loss") for r in rows], label="LM loss", lw=1, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    if any("aux_loss" in r for r in rows):
        aux = ax.twinx()
        aux.plot(steps, [r.get("aux_loss") for r in rows], color="tab:red", lw=1, label="aux loss (sum of layers)")
        aux.set_ylabel("aux loss", color="tab:red")
        aux.legend(loc="upper center", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def expert_loading(routing: dict, path: Path, title: str = "expert loading") -> Path | None:
    """Stacked bars: for each MoE layer, the share of top-k assignments each expert gets, text vs image."""
    layers = routing.get("load", {})
    if not layers:
        return None
    plt = _pyplot()
    modalities = [m for m in ("text", "image") if any(m in v for v in layers.values())]
    fig, axes = plt.subplots(1, len(modalities), figsize=(4.5 * len(modalities), 3.5), sharey=True, squeeze=False)
    names = sorted(layers, key=int)
    num_experts = routing["num_experts"]
    colors = plt.get_cmap("tab10").colors
    for ax, modality in zip(axes[0], modalities):
        bottom = [0.0] * len(names)
        for e in range(num_experts):
            share = [layers[n].get(modality, [0.0] * num_experts)[e] for n in names]
            ax.bar(names, share, bottom=bottom, color=colors[e % 10], label=f"expert {e}")
            bottom = [b + s for b, s in zip(bottom, share)]
        ax.axhline(0.5, color="k", lw=0.5, ls=":")
        ax.set_title(f"{modality} tokens ({routing['tokens'].get(modality, 0)})")
        ax.set_xlabel("MoE layer")
    axes[0][0].set_ylabel(f"share of top-{routing['top_k']} assignments")
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
