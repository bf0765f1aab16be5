"""PNG figures of routing and training curves (matplotlib, Agg backend: no display).

Legend: E experts, M modalities.

- ``plot_modality_routing``: the LIMoE-paper view. One panel per MoE layer; each
  expert is a bar split into the fraction of its tokens that are image vs text,
  experts ordered from most-image to most-text, with the expert's share of all
  tokens written under it. Shows which experts specialise in a modality.
- ``plot_expert_load``: a layers x experts heatmap of the fraction of tokens each
  expert received (for single-modality tasks).
- ``plot_history``: training loss and the eval metrics over steps.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

MODALITY_NAMES = ("image", "text")
_COLOURS = ("#e07b39", "#3a7dc9", "#59a14f", "#b07aa1")


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_modality_routing(by_layer: Dict[str, torch.Tensor], path: str, *, step: Optional[int] = None,
                          modality_names: Sequence[str] = MODALITY_NAMES, title: str = "",
                          normalize_modalities: bool = True) -> str:
    """Stacked bars of each expert's per-modality token fraction, one panel per layer.

    ``by_layer`` maps a layer name to its kept-token counts [M, E]. With
    ``normalize_modalities`` (default) each modality's counts are first divided by
    that modality's total, so a bar reads the same whatever the batch's image/text
    mix (an eval set with few text prompts would otherwise paint every expert as an
    image expert); an even bar means the expert serves both modalities alike.
    Returns ``path``.
    """
    if not by_layer:
        raise ValueError("plot_modality_routing: no layers with per-modality counts to plot")
    names = list(by_layer)
    width = max(6.0, 0.45 * max(c.shape[1] for c in by_layer.values()) + 2)
    fig, axes = plt.subplots(len(names), 1, figsize=(width, 2.6 * len(names) + 0.8), squeeze=False,
                             layout="constrained")
    for ax, name in zip(axes[:, 0], names):
        counts = by_layer[name].double()  # [M, E]
        M, E = counts.shape
        per_expert = counts.sum(0)
        mixed = counts / counts.sum(1, keepdim=True).clamp_min(1) if normalize_modalities else counts
        frac = mixed / mixed.sum(0).clamp_min(1e-30)
        order = torch.argsort(frac[0], descending=True, stable=True) if M > 1 else torch.arange(E)
        share = per_expert / per_expert.sum().clamp_min(1)
        bottom = torch.zeros(E, dtype=torch.float64)
        xs = list(range(E))
        for m in range(M):
            label = modality_names[m] if m < len(modality_names) else f"modality {m}"
            vals = frac[m, order]
            ax.bar(xs, vals.tolist(), bottom=bottom.tolist(), color=_COLOURS[m % len(_COLOURS)],
                   label=label, width=0.85)
            bottom += vals
        ax.set_xticks(xs)
        ax.set_xticklabels([f"e{int(e)}\n{100 * float(share[e]):.0f}%" for e in order], fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("modality share" if normalize_modalities else "token fraction")
        ax.set_title(name, fontsize=9, loc="left")
        idle = int((per_expert == 0).sum())
        if idle:
            ax.text(0.99, 0.95, f"{idle} idle", transform=ax.transAxes, ha="right", va="top", fontsize=8)
    axes[-1, 0].set_xlabel("expert (and its share of all kept tokens), most image-heavy first", fontsize=8)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", fontsize=8, ncol=M)
    head = title or "Expert routing by modality"
    fig.suptitle(head + (f" (step {step})" if step is not None else ""), fontsize=11)
    return _save(fig, path)


def plot_expert_load(by_layer: Dict[str, torch.Tensor], path: str, *, step: Optional[int] = None,
                     title: str = "") -> str:
    """Heatmap of each layer's load fraction per expert (``by_layer``: name -> counts [E])."""
    if not by_layer:
        raise ValueError("plot_expert_load: no layers to plot")
    names = list(by_layer)
    rows = []
    for n in names:
        c = by_layer[n].double()
        rows.append((c / c.sum().clamp_min(1)).tolist())
    E = len(rows[0])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * E + 2.5), 0.45 * len(names) + 1.6), layout="constrained")
    im = ax.imshow(rows, aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xticks(range(E))
    ax.set_xticklabels([str(e) for e in range(E)], fontsize=7)
    ax.set_xlabel("expert")
    fig.colorbar(im, ax=ax, label="fraction of kept tokens")
    head = title or f"Tokens per expert (uniform = {1 / max(E, 1):.3f})"
    ax.set_title(head + (f" (step {step})" if step is not None else ""), fontsize=10)
    return _save(fig, path)


def plot_history(history: List[Dict[str, float]], path: str, *, title: str = "") -> str:
    """Training loss (and every eval metric) against step. ``history`` rows carry ``step``
    plus ``train/...`` or ``eval/...`` keys."""
    train = [(h["step"], h["train/loss"]) for h in history if "train/loss" in h]
    evals: Dict[str, List] = {}
    for h in history:
        for k, v in h.items():
            if k.startswith("eval/"):
                evals.setdefault(k[5:], []).append((h["step"], v))
    panels = 1 + len(evals)
    cols = min(3, panels)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False, layout="constrained")
    flat = list(axes.reshape(-1))
    ax = flat[0]
    if train:
        ax.plot(*zip(*train), color=_COLOURS[1])
    ax.set_title("train loss", fontsize=10)
    ax.set_xlabel("step")
    for ax, (k, pts) in zip(flat[1:], sorted(evals.items())):
        ax.plot(*zip(*pts), marker="o", color=_COLOURS[0])
        ax.set_title(f"eval {k}", fontsize=10)
        ax.set_xlabel("step")
    for ax in flat[panels:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_routing(routing: Sequence, plot_dir: str, step: int, *, title: str = "") -> Optional[str]:
    """The routing figure of an eval: by modality when the layers saw modality ids, else the load heatmap.

    ``routing``: ``moe.trainer.telemetry.LayerRouting`` per MoE layer. Returns the PNG path.
    """
    by_mod = {r.name: r.by_modality for r in routing if r.by_modality is not None}
    if by_mod and any(int(c.sum()) > 0 for c in by_mod.values()):
        path = os.path.join(plot_dir, f"routing_by_modality_step_{step:08d}.png")
        return plot_modality_routing(by_mod, path, step=step, title=f"{title}: eval routing by modality")
    counts = {r.name: r.tokens_per_expert for r in routing}
    return plot_expert_load(counts, os.path.join(plot_dir, f"expert_load_step_{step:08d}.png"), step=step)
