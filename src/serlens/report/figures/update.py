"""How the LoRA update grows over the epochs (``update_dynamics``)."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd

from .style import (
    empty_panel,
    figure_style,
    fold_note,
    lora_methods,
    method_label,
    new_subplots,
    rows,
)

PANELS = (
    ("delta_w_norm", "‖ΔW‖_F (size of the update)"),
    ("a_change", "‖A_e − A_0‖_F / ‖A_0‖_F\n(A's drift from its initialisation)"),
    ("a_init_phi", "φ(A_e, A_0): overlap with the initial\nrow space (1 = same subspace)"),
)


def update_figure(table: pd.DataFrame, model: str):
    """One row per LoRA method, one column per quantity; a line per layer (colour = depth),
    mean over runs at each epoch; epoch 0 is the initialisation."""
    table = rows(table, model=model)
    if "metric" in table:
        nulls = table[table["metric"] == "random_value"]
        table = table[table["metric"] == "value"]
    else:
        nulls = table.iloc[:0]
    methods = lora_methods(table["method"]) if len(table) else []
    cmap = matplotlib.colormaps["viridis"]
    with figure_style():
        fig, axes = new_subplots(
            max(len(methods), 1),
            len(PANELS),
            figsize=(12.5, 0.6 + 3.0 * max(len(methods), 1)),
            squeeze=False,
        )
        if not methods:
            empty_panel(axes[0, 0], "no LoRA run has adapter snapshots")
        for r, method in enumerate(methods):
            for c, (quantity, label) in enumerate(PANELS):
                ax = axes[r, c]
                sel = rows(table, method=method, quantity=quantity)
                for (layer, depth), line in sel.groupby(["layer", "depth"]):
                    line = line.sort_values("epoch")
                    ax.plot(
                        line["epoch"],
                        line["mean"],
                        color=cmap(float(depth)),
                        lw=1.3,
                        marker="o",
                        markersize=3,
                        label=f"layer {int(layer)}",
                    )
                null = rows(nulls, method=method, quantity=quantity)
                if len(null):
                    # far below the curves: a note, not a line that would flatten them
                    ax.text(
                        0.02,
                        0.04,
                        f"random subspace: φ = r/d = {np.nanmean(null['mean']):.3f}",
                        transform=ax.transAxes,
                        fontsize=8,
                        color="0.3",
                    )
                ax.set_xlabel("epoch (0 = initialisation)")
                ax.xaxis.get_major_locator().set_params(integer=True)
                if r == 0:
                    ax.set_title(label, fontsize=9.5)
                if c == 0:
                    ax.set_ylabel(method_label(method))
        if methods:
            handles, labels = axes[0, -1].get_legend_handles_labels()
            axes[0, -1].legend(handles, labels, fontsize=7, loc="best", ncols=2)
        fig.suptitle(
            f"{model}: how the LoRA update grows over training "
            f"(mean over {fold_note(table)}; colour = layer depth)"
        )
    return fig
