"""LoRA A/B activations and gradients, trained against untrained."""

from __future__ import annotations

import pandas as pd
from matplotlib.lines import Line2D

from .style import (
    DEPTH_LABEL,
    band,
    by_layer,
    collect_legend,
    empty_panel,
    figure_style,
    legend_below,
    lora_methods,
    method_colors,
    method_label,
    model_title,
    new_subplots,
    plain_log_axis,
    rows,
)


def ab_dynamics_figure(ab_dynamics: pd.DataFrame, model: str, energy_fraction: float = 0.9):
    """Energy ranks of A/B activations and gradients, trained (solid) against untrained (dashed), per layer.

    Top: A code a = A x, B output b = B a, weight-gradient norm ratio ‖∂L/∂B‖_F / ‖∂L/∂A‖_F.
    Bottom: ∂L/∂a, ∂L/∂b, and the cosine between the ΔW-space updates s²BBᵀG and s²GAᵀA.
    """
    table = rows(ab_dynamics, model=model)
    ranks = lora_methods(table["method"])
    colors = method_colors(table["method"])
    pct = f"{energy_fraction:.0%}"
    panels = [
        ("a_out", f"A code a = A·x:\ndirections holding {pct} energy"),
        ("b_out", f"B output b = B·a:\ndirections holding {pct} energy"),
        ("grad_norm_ratio_B_A", "weight-gradient norm ratio\n‖∂L/∂B‖_F / ‖∂L/∂A‖_F"),
        ("a_out_grad", f"gradient ∂L/∂a:\ndirections holding {pct} energy"),
        ("b_out_grad", f"gradient ∂L/∂b:\ndirections holding {pct} energy"),
        ("dW_cos", "cos(s²·B·Bᵀ·G, s²·G·Aᵀ·A)\n(ΔW-space updates via A and via B)"),
    ]
    with figure_style():
        fig, axes = new_subplots(2, 3, figsize=(12.5, 7.4), sharex=True)
        for ax, (quantity, label) in zip(axes.ravel(), panels, strict=True):
            for method in ranks:
                for state, ls in (("trained", "-"), ("untrained", "--")):
                    sel = by_layer(rows(table, method=method, quantity=quantity, state=state))
                    band(
                        ax,
                        sel,
                        color=colors[method],
                        ls=ls,
                        label=method_label(method) if state == "trained" else None,
                    )
            if quantity == "dW_cos":
                ax.axhline(0, color="0.5", lw=0.8)
            if quantity == "grad_norm_ratio_B_A":
                ax.axhline(1, color="0.5", lw=0.8)
                plain_log_axis(ax)
            ax.set_ylabel(label)
        for ax in axes[-1]:
            ax.set_xlabel(DEPTH_LABEL)
        if not ranks:
            empty_panel(axes[0, 0], "no LoRA runs")
        handles, labels = collect_legend(axes)
        handles += [Line2D([], [], color="0.3", ls="-"), Line2D([], [], color="0.3", ls="--")]
        labels += ["trained adapter and head", "untrained (fresh A, small random B, fresh head)"]
        legend_below(fig, handles, labels, ncols=min(len(labels), 4))
        fig.suptitle(
            model_title(
                model, table, "LoRA A/B activations and gradients on the training sample", offset=1
            )
        )
    return fig
