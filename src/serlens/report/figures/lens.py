"""Logit lens (and tuned lens): the trained head read off every layer."""

from __future__ import annotations

import pandas as pd

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
    rank_of,
    rows,
)


def logit_lens_figure(logit_lens: pd.DataFrame, model: str, n_classes: int | None = None):
    """Per-layer UAR, agreement with the final prediction and KL(p_L ‖ p_ℓ): frozen against each rank.

    One row per lens (logit lens; tuned lens when fitted). Each run is read with its own head
    on the encoder it classifies with (``base`` for frozen runs, ``adapted`` for LoRA runs).
    """
    table = rows(logit_lens, model=model)
    methods = [m for m in method_order(table["method"])]
    colors = method_colors(methods)
    lenses = [lens for lens in ("logit", "tuned") if lens in set(table["lens"])]
    metrics = [
        ("uar", "UAR of argmax p_ℓ (0–1)", "UAR against the labels"),
        (
            "agreement",
            "agreement with final prediction\n(share of utterances)",
            "agreement with the run's output",
        ),
        ("kl", "KL(p_L ‖ p_ℓ) (nats)", "KL divergence from the run's output"),
    ]
    with figure_style():
        fig, axes = new_subplots(
            max(len(lenses), 1),
            3,
            figsize=(11.5, 0.9 + 3.0 * max(len(lenses), 1)),
            squeeze=False,
            sharex=True,
        )
        for r, lens in enumerate(lenses):
            for c, (metric, label, title) in enumerate(metrics):
                ax = axes[r, c]
                for method in methods:
                    variant = "adapted" if rank_of(method) is not None else "base"
                    sel = rows(table, lens=lens, method=method, variant=variant, metric=metric)
                    band(ax, sel, color=colors[method], label=method_label(method))
                if metric == "uar":
                    chance_line(ax, n_classes)
                ax.set_ylabel(label)
                ax.set_title(title)
            axes[r, 0].annotate(
                f"{lens} lens",
                xy=(0, 0.5),
                xycoords="axes fraction",
                xytext=(-62, 0),
                textcoords="offset points",
                rotation=90,
                va="center",
                ha="center",
                fontweight="bold",
            )
        for ax in axes[-1]:
            ax.set_xlabel(DEPTH_LABEL)
        handles, labels = collect_legend(axes)
        legend_below(fig, handles, labels)
        fig.suptitle(model_title(model, table, "reading the trained head off every layer"))
    return fig
