"""What each block writes into the residual stream: per model, and across models on one depth axis."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import pandas as pd
from matplotlib.lines import Line2D

from .style import (
    COMPONENT_TITLES,
    DEPTH_LABEL,
    FROZEN_COLOR,
    LINESTYLES,
    band,
    collect_legend,
    empty_panel,
    figure_style,
    legend_below,
    lora_methods,
    method_colors,
    method_label,
    method_order,
    model_title,
    new_subplots,
    rows,
    spread_note,
)


def contributions_figure(contributions: pd.DataFrame, model: str):
    """Norm ratio ‖u‖/‖h‖ and cosine cos(u, h) per layer for u = a, m, a + m; then LoRA − frozen.

    ``contributions``: the aggregated table (``variant`` base / adapted / delta). Rows 1–2:
    the pre-trained encoder (frozen runs) and each rank's adapted encoder; rows 3–4: the
    per-fold difference adapted − base of each LoRA run.
    """
    table = rows(contributions, model=model)
    methods = method_order(table["method"])
    ranks = lora_methods(methods)
    colors = method_colors(methods)
    base_method = "frozen" if "frozen" in methods else (ranks[0] if ranks else None)
    components = [c for c in COMPONENT_TITLES if c in set(table["component"])]
    metric_labels = {"norm_ratio": "norm ratio ‖u‖ / ‖h‖", "cosine": "cosine cos(u, h)"}
    delta_labels = {"norm_ratio": "Δ norm ratio", "cosine": "Δ cosine"}
    n_rows = 4 if ranks else 2
    with figure_style():
        fig, axes = new_subplots(
            n_rows,
            len(components),
            figsize=(3.4 * len(components) + 0.8, 2.5 * n_rows + 0.8),
            squeeze=False,
            sharex=True,
        )
        for c, component in enumerate(components):
            for r, metric in enumerate(("norm_ratio", "cosine")):
                ax = axes[r, c]
                if base_method:
                    sel = rows(
                        table,
                        method=base_method,
                        variant="base",
                        component=component,
                        metric=metric,
                    )
                    band(ax, sel, color=FROZEN_COLOR, label="pre-trained encoder (frozen)")
                for method in ranks:
                    sel = rows(
                        table, method=method, variant="adapted", component=component, metric=metric
                    )
                    band(ax, sel, color=colors[method], label=f"adapted, {method_label(method)}")
                ax.set_ylabel(metric_labels[metric])
                if ranks:
                    ax_d = axes[r + 2, c]
                    ax_d.axhline(0, color="0.5", lw=0.8)
                    for method in ranks:
                        sel = rows(
                            table,
                            method=method,
                            variant="delta",
                            component=component,
                            metric=metric,
                        )
                        band(
                            ax_d,
                            sel,
                            color=colors[method],
                            label=f"adapted, {method_label(method)}",
                            ls="--",
                        )
                    ax_d.set_ylabel(f"{delta_labels[metric]}\n(LoRA − frozen)")
            axes[0, c].set_title(COMPONENT_TITLES[component])
            axes[-1, c].set_xlabel(DEPTH_LABEL)
        handles, labels = collect_legend(axes)
        legend_below(fig, handles, labels)
        fig.suptitle(
            model_title(model, table, "what each block writes into the residual stream h")
            + (
                "\nrows 3–4: per-fold difference adapted − pre-trained of the same LoRA run"
                if ranks
                else ""
            )
        )
    return fig


def contributions_depth_figure(contributions: pd.DataFrame, models: Sequence[str] | None = None):
    """LoRA − frozen difference of the contributions of every model on one depth axis.

    Colour = model (config order), line style = LoRA rank. Rows: norm ratio, cosine; columns:
    attention, MLP, whole block.
    """
    table = rows(contributions, variant="delta")
    models = [m for m in (models or dict.fromkeys(table["model"])) if m in set(table["model"])]
    ranks = lora_methods(table["method"])
    components = [c for c in COMPONENT_TITLES if c in set(contributions["component"])] or list(
        COMPONENT_TITLES
    )
    cmap = matplotlib.colormaps["viridis"]
    model_colors = {m: cmap(i / max(len(models) - 1, 1) * 0.85) for i, m in enumerate(models)}
    with figure_style():
        fig, axes = new_subplots(
            2,
            len(components),
            figsize=(3.4 * len(components) + 0.8, 5.8),
            squeeze=False,
            sharex=True,
        )
        if table.empty:
            for ax in axes.ravel():
                empty_panel(ax, "no LoRA runs: no LoRA − frozen difference")
        for c, component in enumerate(components):
            for r, (metric, label) in enumerate(
                (("norm_ratio", "Δ norm ratio ‖u‖/‖h‖"), ("cosine", "Δ cosine cos(u, h)"))
            ):
                ax = axes[r, c]
                if table.empty:
                    continue
                ax.axhline(0, color="0.5", lw=0.8)
                for model in models:
                    for k, method in enumerate(ranks):
                        sel = rows(
                            table, model=model, method=method, component=component, metric=metric
                        )
                        band(ax, sel, color=model_colors[model], ls=LINESTYLES[k % len(LINESTYLES)])
                ax.set_ylabel(f"{label}\n(LoRA − frozen)")
            axes[0, c].set_title(COMPONENT_TITLES[component])
            axes[-1, c].set_xlabel(DEPTH_LABEL)
        handles = [Line2D([], [], color=model_colors[m], lw=2) for m in models]
        labels = list(models)
        handles += [
            Line2D([], [], color="0.3", ls=LINESTYLES[k % len(LINESTYLES)])
            for k in range(len(ranks))
        ]
        labels += [method_label(m) for m in ranks]
        if handles:
            legend_below(fig, handles, labels, ncols=min(len(labels), 6))
        fig.suptitle(f"Adapter effect on layer contributions across models ({spread_note(table)})")
    return fig
