"""Linear probes per layer: emotion against the control task, and selectivity."""

from __future__ import annotations

import pandas as pd
from matplotlib.lines import Line2D

from .style import (
    DEPTH_LABEL,
    band,
    chance_line,
    collect_legend,
    figure_style,
    legend_below,
    method_colors,
    method_label,
    method_order,
    model_title,
    new_subplots,
    rows,
)


def probing_figure(probing: pd.DataFrame, model: str, n_classes: int | None = None):
    """Linear-probe UAR per layer for emotion (solid) and the control task (dotted), and selectivity."""
    table = rows(probing, model=model)
    methods = method_order(table["method"])
    colors = method_colors(methods)
    with figure_style():
        fig, axes = new_subplots(1, 2, figsize=(10.5, 4.3), sharex=True)
        for method in methods:
            band(
                axes[0],
                rows(table, method=method, task="emotion", metric="uar"),
                color=colors[method],
                label=method_label(method),
            )
            band(
                axes[0],
                rows(table, method=method, task="control", metric="uar"),
                color=colors[method],
                ls=":",
                marker="x",
            )
            band(
                axes[1],
                rows(table, method=method, task="emotion", metric="selectivity_uar"),
                color=colors[method],
            )
        chance_line(axes[0], n_classes)
        axes[1].axhline(0, color="0.5", lw=0.8)
        axes[0].set_ylabel("probe UAR on the test fold (0–1)")
        axes[0].set_title("emotion task (solid) and control task (dotted, ×)")
        axes[1].set_ylabel("selectivity = UAR(emotion) − UAR(control)")
        axes[1].set_title("selectivity")
        for ax in axes:
            ax.set_xlabel(DEPTH_LABEL)
        handles, labels = collect_legend(axes)
        handles += [
            Line2D([], [], color="0.3", ls="-", marker="o", markersize=3.5),
            Line2D([], [], color="0.3", ls=":", marker="x", markersize=3.5),
        ]
        labels += ["emotion labels", "control: labels permuted within speaker"]
        legend_below(fig, handles, labels, ncols=3)
        fig.suptitle(model_title(model, table, "linear probes on pooled layer states"))
    return fig
