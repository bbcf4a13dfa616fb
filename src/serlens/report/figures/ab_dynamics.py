"""LoRA A/B activations and gradients, trained against an untrained baseline."""

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
    lora_methods,
    method_colors,
    method_label,
    model_title,
    new_subplots,
    plain_log_axis,
    rows,
)

#: What each untrained baseline is, for the legend (``analysis.untrained_baseline``).
BASELINE_LABELS = {
    "matched_scale": "untrained: random A, B scaled to the\ntrained ‖A‖_F, ‖B‖_F of each layer;\nthe trained head",
    "paper": "untrained (paper's baseline):\nA, B ~ N(0, σ²), a fresh head",
    None: "untrained baseline",
}
MATRICES = [
    ("a_out", "A code a = A·x\n(r-dim)"),
    ("b_out", "B output b = B·a\n(d-dim, rank ≤ r)"),
    ("a_out_grad", "gradient ∂L/∂a\n(r-dim)"),
    ("b_out_grad", "gradient ∂L/∂b\n(d-dim)"),
]


def _lines(ax, table, ranks, colors, quantity):
    drawn = False
    for method in ranks:
        for state, ls in (("trained", "-"), ("untrained", "--")):
            sel = rows(table, method=method, quantity=quantity, state=state)
            drawn |= len(sel) > 0
            band(
                ax,
                by_layer(sel),
                color=colors[method],
                ls=ls,
                label=method_label(method) if state == "trained" else None,
            )
    return drawn


def ab_dynamics_figure(
    ab_dynamics: pd.DataFrame,
    model: str,
    energy_fraction: float = 0.9,
    untrained_baseline: str | None = None,
):
    """Energy ranks of A/B activations and gradients, trained (solid) against untrained (dashed), per layer.

    Rows 1 and 2: the energy rank (directions holding ``energy_fraction`` of the energy) as a
    share of the largest rank the matrix can have (r for a, b and ∂L/∂a; d for ∂L/∂b),
    uncentred then centred (mean frame removed), for the A code a = A x, the B output
    b = B a, and the gradients ∂L/∂a, ∂L/∂b; a dotted line at ``energy_fraction`` is where a
    white (isotropic) matrix sits. Row 3: the weight-gradient norm ratio ‖∂L/∂B‖_F /
    ‖∂L/∂A‖_F, the cosine between the ΔW-space updates s²BBᵀG and s²GAᵀA, and the linear CKA
    of a with ∂L/∂b. The last panel holds the legend.
    """
    table = rows(ab_dynamics, model=model)
    ranks = lora_methods(table["method"])
    colors = method_colors(table["method"])
    pct = f"{energy_fraction:.0%}"
    with figure_style():
        fig, axes = new_subplots(3, 4, figsize=(15.0, 10.0), sharex=True)
        for col, (quantity, title) in enumerate(MATRICES):
            axes[0, col].set_title(title)
            for row, suffix in enumerate(("_frac", "_centred_frac")):
                ax = axes[row, col]
                drawn = _lines(ax, table, ranks, colors, quantity + suffix)
                ax.axhline(energy_fraction, color="0.45", ls=":", lw=1.1)
                ax.axhline(1.0, color="0.75", lw=0.8)
                ax.set_ylim(0, 1.05)
                if ranks and not drawn:  # a note only: empty_panel would clear the shared x ticks
                    ax.text(
                        0.5,
                        0.5,
                        f"no {quantity + suffix} rows\n(statistics of an older pass)",
                        ha="center",
                        va="center",
                        transform=ax.transAxes,
                        color="0.3",
                    )
        axes[0, 0].set_ylabel(f"uncentred: share of possible\ndirections holding {pct} energy")
        axes[1, 0].set_ylabel(f"centred (mean removed): share\nof directions holding {pct}")
        ax = axes[2, 0]
        _lines(ax, table, ranks, colors, "grad_norm_ratio_B_A")
        ax.axhline(1, color="0.5", lw=0.8)
        plain_log_axis(ax)
        ax.set_ylabel("weight-gradient norm ratio\n‖∂L/∂B‖_F / ‖∂L/∂A‖_F (log)")
        ax = axes[2, 1]
        _lines(ax, table, ranks, colors, "dW_cos")
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set_ylabel("cos(s²·B·Bᵀ·G, s²·G·Aᵀ·A)\n(ΔW updates via A and via B)")
        ax = axes[2, 2]
        _lines(ax, table, ranks, colors, "cka_a_code_vs_b_out_grad")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("linear CKA of a with ∂L/∂b\n(frames, 0 = unrelated)")
        for ax in axes[2, :3]:
            ax.set_xlabel(DEPTH_LABEL)
        for ax in axes[1]:
            ax.tick_params(labelbottom=True)
            ax.set_xlabel(DEPTH_LABEL)
        if not ranks:
            empty_panel(axes[0, 0], "no LoRA runs")
        legend_ax = axes[2, 3]
        legend_ax.set_axis_off()
        handles, labels = collect_legend(axes)
        handles += [
            Line2D([], [], color="0.3", ls="-"),
            Line2D([], [], color="0.3", ls="--"),
            Line2D([], [], color="0.45", ls=":"),
        ]
        labels += [
            "trained adapter and head",
            BASELINE_LABELS.get(untrained_baseline, f"untrained ({untrained_baseline})"),
            f"white (isotropic) matrix: ≈ {pct}",
        ]
        legend_ax.legend(handles, labels, loc="upper left", frameon=False, fontsize=8.5)
        legend_ax.text(
            0.0,
            0.0,
            "share = energy rank / largest possible rank:\n"
            "min(frames, r) for a, b and ∂L/∂a,\n"
            "min(frames, d) for ∂L/∂b (one frame less\n"
            "once centred); 1 / r = one direction",
            transform=legend_ax.transAxes,
            fontsize=8,
            color="0.25",
            va="bottom",
        )
        fig.suptitle(
            model_title(
                model, table, "LoRA A/B activations and gradients on the training sample", offset=1
            )
        )
    return fig
